"""Long-range recall on raw text: no chat template, no question. A passage of the docs
sits at the start of ``context`` tokens of other docs text; the prompt ends with the
passage's first ``cue`` tokens again, and the model, teacher-forced, must reproduce the
rest of it. Score: top-1 accuracy of the passage's next tokens, full cache vs a policy
(prefilled under ``kvpolicy.apply``, then one-token decode steps, as ``generate`` runs).

    python -m kvpolicy.tools.eval.recall --policies spankv,snapkv --budgets 0.1 --samples 8
"""
from __future__ import annotations

import argparse
import json
import random

import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.models import CACHE_ARG

from ..embedded import load_smollm2
from .command import parse_policies
from .corpus import corpus_lines, cut_document

SEED = 20_261_123


def build(tokenizer, n: int, context: int, passage: int, cue: int, seed: int = SEED):
    """``n`` (prompt ids [1, N], target ids [passage - cue]) pairs, deterministic per seed."""
    out = []
    for i in range(n):
        rng = random.Random(seed + i)
        source = ("pydoc", "stdlib")[i % 2]
        lines = corpus_lines(source)
        start = rng.randrange(len(lines))
        text = " ".join(lines[start:start + 40])
        ids = tokenizer(text, add_special_tokens=False).input_ids[:passage]
        filler = tokenizer("\n".join(cut_document(rng, tokenizer, context - passage, source)),
                           add_special_tokens=False).input_ids[:context - passage - cue]
        prompt = ids + filler + ids[:cue]
        out.append((torch.tensor([prompt]), ids[cue:]))
    return out


@torch.no_grad()
def top1(model, prompt, target, cache) -> float:
    """Fraction of ``target`` tokens that are the argmax given the ones before."""
    logits = model(input_ids=prompt, use_cache=True, logits_to_keep=1, **{CACHE_ARG: cache}).logits[0, -1]
    hits = 0
    for i, tok in enumerate(target):
        hits += int(logits.argmax()) == tok
        if i + 1 < len(target):
            logits = model(input_ids=torch.tensor([[tok]]), use_cache=True, logits_to_keep=1,
                           **{CACHE_ARG: cache}).logits[0, -1]
    return hits / len(target)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="spankv", help="comma list; NAME:KEY=VALUE sets parameters")
    p.add_argument("--budgets", default="0.1")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--passage", type=int, default=64)
    p.add_argument("--cue", type=int, default=8)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    model, tok = load_smollm2(threads=1)
    data = build(tok, args.samples, args.context, args.passage, args.cue)
    full = [top1(model, x, y, DynamicCache(config=model.config)) for x, y in data]
    rows = [{"policy": "full", "budget": 1.0, "top1": sum(full) / len(full), "per_sample": full}]
    print(f"full 1.0 top1 {rows[0]['top1']:.3f}", flush=True)
    for label, name, params in parse_policies(args.policies):
        for budget in (float(b) for b in args.budgets.split(",")):
            with kvpolicy.apply(model, name, budget=budget, **params) as h:
                acc = [top1(model, x, y, h.new_cache(len(y))) for x, y in data]
            rows.append({"policy": label, "budget": budget, "top1": sum(acc) / len(acc), "per_sample": acc,
                         "of_full": sum(acc) / max(sum(full), 1e-9)})
            print(f"{label} {budget:g} top1 {rows[-1]['top1']:.3f} ({rows[-1]['of_full']:.0%} of full)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "seed": SEED, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
