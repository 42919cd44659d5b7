"""Decode cost of quantized prompt rows (``bits``), measured the way a user runs generate:
``kvpolicy.apply(model, "snapkv", budget, bits=b[, compile=True])`` then
``model.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False)`` on a raw text
prompt (benchmarks/test_bench_ratios.py's harness: decode ms/token after the first two
steps, timed by a stopping criterion); 16 bits and each quantized width alternated in one
process, each ratio the median over rounds of the ratio within a round. Both plans keep the
same tokens (the plan does not depend on ``bits``).

    python benchmarks/quantized_decode.py [--tokens 4000] [--budget 0.5] [--bits 4]
        [--rounds 3] [--new-tokens 34] [--compiled]

prints one table row per configuration (docs/performance.md carries them).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from test_bench_decode import Stamps  # benchmarks/ is on sys.path (pytest and script alike)
from test_bench_ratios import SKIPPED, alternate, median_ratio, raw_prompt
from transformers import StoppingCriteriaList

import kvpolicy
from kvpolicy.tools.embedded import load_smollm2


def decode_ms(model, ids: torch.Tensor, budget: float, bits: int, compiled: bool,
              new_tokens: int) -> float:
    """Decode ms/token (after SKIPPED steps) of one greedy generate under snapkv."""
    stamps = Stamps()
    with torch.no_grad(), kvpolicy.apply(model, "snapkv", budget, bits=bits, compile=compiled):
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([stamps]))
    t = stamps.times[SKIPPED:]
    return 1000 * (t[-1] - t[0]) / (len(t) - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--budget", type=float, default=0.5)
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=34)
    parser.add_argument("--compiled", action="store_true", help="compile=True (warmed once first)")
    a = parser.parse_args()
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = raw_prompt(tok, a.tokens)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {ids.shape[1]}, "
          f"snapkv {a.budget}, {a.new_tokens} new tokens, {'compiled' if a.compiled else 'eager'}, "
          f"{a.rounds} rounds alternated, load {os.getloadavg()[0]:.2f}", flush=True)
    configs = {b: (lambda b=b: decode_ms(model, ids, a.budget, b, a.compiled, a.new_tokens))
               for b in [16, *a.bits]}
    if a.compiled:
        start = time.perf_counter()
        for run in configs.values():
            run()
        print(f"warm-up (compiles) {time.perf_counter() - start:.0f} s", flush=True)
    ms = alternate(configs, a.rounds)
    print("\n| bits | decode ms/token (median) | / 16 bits (median of per-round ratios) | rounds |\n"
          "|---|---:|---:|---|")
    for b, values in ms.items():
        print(f"| {b} | {statistics.median(values):.1f} | {median_ratio(values, ms[16]):.3f} | "
              f"{', '.join(f'{v:.1f}' for v in values)} |")
    print(f"\nload after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
