"""Fixtures for the vLLM plugin tests: the embedded SmolLM2 exported to a Hugging Face
folder, prompts of several lengths, and the session's shared in-process engine."""
import os
import sys

import pytest

# Engines built by LLM(...) run in this process (scheduler visible) with a 1 GiB KV pool
# unless a test fixes the number of blocks; the servers of test_vllm_serve run vLLM's
# multiprocessing engine.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def pytest_collection_modifyitems(items):
    """The eager-mode test, whose in-process engine's shutdown tears down vLLM's process-wide
    parallel state (which the session engine needs), runs after every other test."""
    items.sort(key=lambda item: item.name == "test_eager_mode")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): a SmolLM2 of these tests' own, so that the exported weights and
    the HF references do not depend on what other test modules did to the shared one."""
    from kvpolicy.tools.embedded import load_smollm2

    try:
        return load_smollm2(threads=1)  # vLLM runs in this process too: no oversubscription
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def hf_dir(smollm2, tmp_path_factory):
    """A Hugging Face folder holding the embedded SmolLM2 (float32)."""
    from smollm2_hf import export_smollm2

    return export_smollm2(*smollm2, str(tmp_path_factory.mktemp("smollm2-hf")))


@pytest.fixture(scope="session")
def prompts(smollm2):
    """Chat-templated prompts (token id lists) of the lengths in WORDS, shortest first."""
    from vllm_support import WORDS, chat_prompt

    return [chat_prompt(smollm2[1], w, "Summarize the text above in one sentence.") for w in WORDS]


@pytest.fixture(scope="session")
def engine(hf_dir, prompts):
    """The session's engine in vLLM's default mode: SnapKV 0.1 by default (tests pick other
    policies per request), 128-token prefill chunks, 32-token blocks, a pool 8 blocks short
    of holding the three prompts at full size."""
    from vllm_support import close, make_llm, small_pool_args

    llm = make_llm(hf_dir, {"policy": "snapkv", "budget": 0.1}, **small_pool_args(prompts))
    yield llm
    close(llm)
