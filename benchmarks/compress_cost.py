"""Time of ``kvpolicy.compress`` against a plain prefill of the same context, the cost #26
bounds for KVzip (its reconstruction passes repeat the context once more): the plain
prefill (``model(ids, past_key_values=DynamicCache, logits_to_keep=1)``) and ``compress``
under each policy alternate in one process, each ratio the median over rounds of the
ratio within a round.

    python benchmarks/compress_cost.py [--tokens 2000] [--policies kvzip,snapkv]
        [--budget 0.1] [--chunk 0] [--rounds 3]

prints one table row per policy (docs/quality.md carries them). ``--chunk N`` passes
``chunk_size=N`` to compress (0: the whole prompt at once).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.tools.embedded import load_smollm2, needle_prompt


def seconds(run) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--policies", default="kvzip,snapkv")
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--chunk", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args()
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = needle_prompt(tok, a.tokens, 0.5)["input_ids"]
    policies = a.policies.split(",")
    params = {"kvzip": {"tokenizer": tok}}

    def plain():
        model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True, logits_to_keep=1)

    def compress(policy):
        return lambda: kvpolicy.compress(model, ids, policy, budget=a.budget, chunk_size=a.chunk or None,
                                         **params.get(policy, {}))

    runs = {"prefill": plain, **{p: compress(p) for p in policies}}
    for run in runs.values():  # warm-up: allocator, first-call paths
        seconds(run)
    times = {name: [] for name in runs}
    for _ in range(a.rounds):
        for name, run in runs.items():
            times[name].append(seconds(run))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, context {ids.shape[1]} tokens, "
          f"budget {a.budget}, chunk_size {a.chunk or None}, {a.rounds} rounds alternated, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| run | median s | x plain prefill |")
    print("|---|---:|---:|")
    for name, t in times.items():
        ratio = statistics.median(x / p for x, p in zip(t, times["prefill"]))
        print(f"| {name} | {statistics.median(t):.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
