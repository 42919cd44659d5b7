"""Time of ``kvpolicy.compress`` against a plain prefill of the same context, the cost #26
bounds for KVzip (its reconstruction passes repeat the context once more): the plain
prefill (``model(ids, cache=DynamicCache, logits_to_keep=1)``; ``past_key_values=``
before transformers 5.25) and ``compress`` under each policy alternate in one process,
each ratio the median over rounds of the ratio within a round.

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
from test_bench_ratios import alternate, median_ratio  # benchmarks/ is on sys.path
from transformers import DynamicCache

import kvpolicy
from kvpolicy.models import CACHE_ARG
from kvpolicy.tools.embedded import load_smollm2, needle_prompt
from kvpolicy.tools.params import tokenizer_for


def timed(run):
    """A configuration for ``alternate``: the seconds of one ``run()`` without grad."""
    def seconds() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            run()
        return time.perf_counter() - start
    return seconds


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
    runs = {"prefill": timed(lambda: model(ids, **{CACHE_ARG: DynamicCache(config=model.config)},
                                           use_cache=True, logits_to_keep=1))}
    for policy in a.policies.split(","):
        runs[policy] = timed(lambda policy=policy: kvpolicy.compress(
            model, ids, policy, budget=a.budget, chunk_size=a.chunk or None, **tokenizer_for(policy, tok)))
    alternate(runs, 1)  # warm-up: allocator, first-call paths
    times = alternate(runs, a.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, context {ids.shape[1]} tokens, "
          f"budget {a.budget}, chunk_size {a.chunk or None}, {a.rounds} rounds alternated, "
          f"load {os.getloadavg()[0]:.2f}\n")
    print("| run | median s | x plain prefill |")
    print("|---|---:|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.2f} | {median_ratio(t, times['prefill']):.2f} |")


if __name__ == "__main__":
    main()
