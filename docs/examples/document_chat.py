"""Document chat with a compressed cache, on the embedded SmolLM2-135M-Instruct:

1. compress a document once, before its questions are known (``kvpolicy.compress``);
2. answer several questions, each from a copy of that cache;
3. continue one answer as a chat: the cache ``generate`` returned carries the next turn.

    python docs/examples/document_chat.py [--policy snapkv] [--budget 0.2] [--words 1200]

Written for transformers >= 5.25 (``cache=``); before it the keyword is ``past_key_values``.
"""
from __future__ import annotations

import argparse

import torch

import kvpolicy
from kvpolicy.tools.embedded import docs_topics, load_smollm2

FACTS = "The door code is 582914. The locker number is 3307."
QUESTIONS = ["What is the door code mentioned in the text above? Answer with the number only.",
             "What is the locker number mentioned in the text above? Answer with the number only."]


def user_turn(tok, text: str, generation_prompt: bool) -> torch.Tensor:
    """input_ids [1, n] of one user message in the chat template."""
    return tok.apply_chat_template([{"role": "user", "content": text}], return_tensors="pt",
                                   add_generation_prompt=generation_prompt, return_dict=True)["input_ids"]


def run(model, tok, policy: str = "snapkv", budget: float = 0.2, words: int = 1200,
        new_tokens: int = 24) -> list[str]:
    """The answers to QUESTIONS and one follow-up turn; prints what each step keeps."""
    text = " ".join(" ".join(docs_topics()).split()[:words])
    half = len(text) // 2
    doc = user_turn(tok, f"{text[:half]} {FACTS} {text[half:]}", generation_prompt=False)
    cache = kvpolicy.compress(model, doc, policy, budget=budget)  # the model need not be patched
    print(f"document: {doc.shape[1]} tokens, kept per layer {cache.kept[0]}..{max(cache.kept)}, "
          f"{cache.nbytes() / 2**20:.1f} MiB")
    replies = []
    for question in QUESTIONS:
        ids = torch.cat([doc, user_turn(tok, question, generation_prompt=True)[:, 1:]], -1)
        out = model.generate(ids, cache=cache.copy(), max_new_tokens=new_tokens,
                             do_sample=False, return_dict_in_generate=True)
        replies.append(tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"Q: {question}\nA: {replies[-1]!r}")
    follow = user_turn(tok, "And the door code? Answer with the number only.", generation_prompt=True)[:, 1:]
    ids = torch.cat([out.sequences, follow], -1)  # the last answer's cache carries the chat
    again = model.generate(ids, cache=out.cache, max_new_tokens=new_tokens,
                           do_sample=False)
    replies.append(tok.decode(again[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"follow-up: {replies[-1]!r}")
    return replies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--words", type=int, default=1200)
    a = parser.parse_args()
    with torch.no_grad():
        run(*load_smollm2(), policy=a.policy, budget=a.budget, words=a.words)
