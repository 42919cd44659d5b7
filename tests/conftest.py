import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests/strategies.py for the property tests

# Without a GPU the Triton kernels run numpy-interpreted; TRITON_INTERPRET must be set before
# triton is first imported, so it is set here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- the embedded SmolLM2 model (end-to-end tests), loaded once per session ------------
import pytest  # noqa: E402

from kvpolicy.tools.embedded import chat_prompt, load_smollm2  # noqa: E402

NEW_TOKENS = 30


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, eval mode, 2 threads; skips the
    test when the embedded model is not installed."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return load_smollm2(threads=min(2, os.cpu_count() or 1))
    except ModuleNotFoundError as exc:
        pytest.skip(str(exc))


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
