"""Per-head budgets against per-layer ones at the same kept entries, measured as users run
them: a raw text prompt through ``model.generate`` under ``kvpolicy.apply(model, policy,
budget, per_head=...)`` (AdaKV's split keeps each layer's entries, so both plans hold the
same count), both configurations alternated in one process, medians of the per-round
ratios (the harness of test_bench_ratios.py). Memory: each plan compressed in its own
process; the cache's ``nbytes`` and the growth of the process's resident set it leaves
after the prefill (glibc's heap trimmed before each reading, as peak_memory.py does),
beside the bytes a layout padding every head to the longest would hold.

    python benchmarks/per_head.py [--tokens 4000] [--rounds 3] [--new-tokens 34] [--budget 0.1]

prints the tables docs/performance.md carries.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

import torch
from peak_memory import status_bytes  # benchmarks/ is on sys.path (script)
from test_bench_decode import Stamps
from test_bench_ratios import SKIPPED, alternate, median_ratio, raw_prompt
from transformers import StoppingCriteriaList

import kvpolicy
from kvpolicy.tools.embedded import load_smollm2



def timed(model, ids, policy: str, budget: float, per_head: bool, new_tokens: int) -> tuple[float, float]:
    """(prefill seconds until the first token, decode ms/token after SKIPPED steps)."""
    stamps = Stamps()
    start = time.perf_counter()
    with torch.no_grad(), kvpolicy.apply(model, policy, budget, per_head=per_head):
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       stopping_criteria=StoppingCriteriaList([stamps]))
    t = stamps.times[SKIPPED:]
    return stamps.times[0] - start, 1000 * (t[-1] - t[0]) / (len(t) - 1)


def memory_child(policy: str, budget: float, per_head: bool, tokens: int) -> None:
    """Print the json of one compress: nbytes, resident growth, entries, padded bytes."""
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = raw_prompt(tok, tokens)
    with torch.no_grad():
        kvpolicy.compress(model, ids[:, :64], policy, 0.5, per_head=per_head)  # warm-up
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_bytes("VmRSS:")
    with torch.no_grad():
        cache = kvpolicy.compress(model, ids, policy, budget, per_head=per_head, max_new_tokens=34)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    held = status_bytes("VmRSS:") - before
    layer = next(layer for layer in cache.layers if layer.scored)
    per_entry = 2 * layer.keys.shape[-1] * layer.keys.element_size()
    entries = [int(c.sum()) for c in cache.plan.entries]
    padded = sum(int(c.max()) * c.numel() for c in cache.plan.entries) * per_entry
    print(json.dumps(dict(nbytes=cache.nbytes(), held=held, entries=sum(entries),
                          entry_bytes=sum(entries) * per_entry, padded=padded)))


def memory(policy: str, budget: float, per_head: bool, tokens: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", policy, str(budget), str(int(per_head)),
                          str(tokens)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=34)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--policy", default="snapkv")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, budget, per_head, tokens = args.child
        memory_child(policy, float(budget), per_head == "1", int(tokens))
        return
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ids = raw_prompt(tok, args.tokens)
    run = lambda per_head: lambda: timed(model, ids, args.policy, args.budget, per_head,  # noqa: E731
                                         args.new_tokens)
    run(True)()  # warm-up
    values = alternate({"per-layer": run(False), "per-head": run(True)}, args.rounds)
    layer, head = values["per-layer"], values["per-head"]
    print(f"{args.policy} budget {args.budget}, {ids.shape[1]}-token raw prompt, {args.new_tokens} new "
          f"tokens, {args.rounds} alternated rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| | per-layer | per-head | per-head / per-layer |\n|---|---|---|---|")
    for name, i, unit in (("prefill (s)", 0, "{:.2f}"), ("decode (ms/token)", 1, "{:.1f}")):
        a = [v[i] for v in layer]
        b = [v[i] for v in head]
        print(f"| {name} | {unit.format(sorted(a)[len(a) // 2])} | {unit.format(sorted(b)[len(b) // 2])} "
              f"| {median_ratio(b, a):.3f} |")
    print("\n| plan | nbytes (MiB) | resident growth (MiB) | kept entries' K/V (MiB) | "
          "every head padded to the longest (MiB) |\n|---|---|---|---|---|")
    for per_head in (False, True):
        m = memory(args.policy, args.budget, per_head, args.tokens)
        mib = lambda x: f"{x / 2**20:.2f}"  # noqa: E731
        print(f"| {'per-head' if per_head else 'per-layer'} | {mib(m['nbytes'])} | {mib(m['held'])} | "
              f"{mib(m['entry_bytes'])} | {mib(m['padded'])} |")


if __name__ == "__main__":
    main()
