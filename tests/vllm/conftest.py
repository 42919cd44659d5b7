"""Fixtures for the vLLM plugin tests: the embedded SmolLM2 exported to a Hugging Face
folder and prompts of several lengths."""
import os
import sys

import pytest

# Engines run in this process (one vLLM import, starts in seconds, scheduler visible) with
# a 1 GiB KV pool unless a test fixes the number of blocks.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): a SmolLM2 of these tests' own, so that the exported weights and
    the HF references do not depend on what other test modules did to the shared one."""
    from kvpolicy.tools.embedded import load_smollm2

    try:
        return load_smollm2(threads=min(2, os.cpu_count() or 1))
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
