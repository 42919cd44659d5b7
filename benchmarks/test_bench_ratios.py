"""The speed goals as ratios, every configuration alternated in one process (A B C A B C
...) and each ratio the median over rounds of the ratio within a round, so the drift of a
shared machine cancels:

- prefill overhead per policy: policy prefill / plain prefill - 1 (4k prompt);
- decode cost of what is kept: decode ms/token at context N and budget b over full-cache
  decode at context b*N (N = 4k, b = 0.1), eager and compiled;
- compiled decode speedup: eager / compiled ms/token of the same policy configuration.

    python benchmarks/test_bench_ratios.py [--tokens 4096] [--rounds 3] [--steps 48]

prints the tables docs/performance.md carries. Under pytest (CI: KVPOLICY_BENCH_FAST=1,
a 1k prompt) the ratios go to the benchmark JSON, checked by benchmarks/regression.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pytest
import torch
from test_bench_decode import Stamps  # benchmarks/ is on sys.path (pytest and script alike)
from transformers import DynamicCache, StoppingCriteriaList

import kvpolicy
from kvpolicy.apply import compile_config
from kvpolicy.tools.embedded import load_smollm2, needle_prompt

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
TOKENS = 1024 if FAST else 4096
ROUNDS = 3
STEPS = 12 if FAST else 48  # timed decode steps
WARMUP = 3  # decode steps before them (compilation, allocator)
BUDGET = 0.1
PREFILL_POLICIES = ["snapkv", "vlcache", "spankv", "pyramidkv", "uniform", "h2o", "prefixkv"]
DECODE_POLICY = "snapkv"


def prefill_seconds(model, inputs: dict, policy: str | None) -> float:
    """One prompt forward (last position's logits only) into a fresh cache."""
    with torch.no_grad():
        if policy is None:
            cache = DynamicCache(config=model.config)
            start = time.perf_counter()
            model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start
        with kvpolicy.apply(model, policy, BUDGET) as handle:
            cache = handle.new_cache(1)
            start = time.perf_counter()
            model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
            return time.perf_counter() - start


def decode_ms(model, inputs: dict, policy: str | None, compiled: bool, steps: int) -> float:
    """Mean ms per decode step over ``steps`` steps after WARMUP ones, in one generate."""
    stamps = Stamps()
    kwargs = dict(max_new_tokens=1 + WARMUP + steps, do_sample=False,
                  stopping_criteria=StoppingCriteriaList([stamps]))
    with torch.no_grad():
        if policy is None:
            if compiled:  # transformers' own static cache, compiled
                kwargs.update(cache_implementation="static", compile_config=compile_config(model.device))
            model.generate(**inputs, **kwargs)
        else:
            with kvpolicy.apply(model, policy, BUDGET, compile=compiled):
                model.generate(**inputs, **kwargs)
    t = stamps.times[WARMUP:]  # after the first token and the warm-up steps
    return 1000 * (t[-1] - t[0]) / (len(t) - 1)


def alternate(configs: dict, rounds: int) -> dict[str, list[float]]:
    """{name: [value per round]}: every configuration once per round, in order."""
    values = {name: [] for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            values[name].append(run())
    return values


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def prefill_overheads(model, tok, tokens: int, rounds: int) -> dict[str, float]:
    """{policy: median over rounds of policy prefill / plain prefill - 1}."""
    inputs = needle_prompt(tok, tokens, 0.5)
    prefill_seconds(model, needle_prompt(tok, 64, 0.5), None)  # warm-up
    configs = {"plain": lambda: prefill_seconds(model, inputs, None)}
    configs.update({p: (lambda p=p: prefill_seconds(model, inputs, p)) for p in PREFILL_POLICIES})
    times = alternate(configs, rounds)
    out = {p: median_ratio(times[p], times["plain"]) - 1 for p in PREFILL_POLICIES}
    out["plain_s"] = statistics.median(times["plain"])
    return out


def decode_ratios(model, tok, tokens: int, rounds: int, steps: int) -> dict[str, float]:
    """Decode at context ``tokens`` under DECODE_POLICY at BUDGET against the full cache at
    BUDGET x tokens, eager and compiled, and compiled against eager."""
    long = needle_prompt(tok, tokens, 0.5)
    n = long["input_ids"].shape[1]  # the text's tokens plus the template's and the question's
    short = needle_prompt(tok, round(BUDGET * n) - (n - tokens), 0.5)  # BUDGET x n in all
    configs = {
        "full_short_eager": lambda: decode_ms(model, short, None, False, steps),
        "policy_eager": lambda: decode_ms(model, long, DECODE_POLICY, False, steps),
        "full_short_compiled": lambda: decode_ms(model, short, None, True, steps),
        "policy_compiled": lambda: decode_ms(model, long, DECODE_POLICY, True, steps),
    }
    ms = alternate(configs, rounds)
    return {
        "decode_of_full_at_kept_size_eager_ratio": median_ratio(ms["policy_eager"], ms["full_short_eager"]),
        "decode_of_full_at_kept_size_compiled_ratio": median_ratio(ms["policy_compiled"],
                                                                   ms["full_short_compiled"]),
        "compiled_decode_speedup": median_ratio(ms["policy_eager"], ms["policy_compiled"]),
        **{f"{k}_ms": statistics.median(v) for k, v in ms.items()},
    }


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(threads=min(2, os.cpu_count() or 1))


def test_bench_prefill_overhead_alternated(benchmark, smollm2):
    model, tok = smollm2
    result = benchmark.pedantic(prefill_overheads, args=(model, tok, TOKENS, ROUNDS), rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_overhead" if k in PREFILL_POLICIES else k: v
                                 for k, v in result.items()}, prompt=TOKENS)


def test_bench_decode_ratios_alternated(benchmark, smollm2):
    model, tok = smollm2
    result = benchmark.pedantic(decode_ratios, args=(model, tok, TOKENS, ROUNDS, STEPS), rounds=1, iterations=1)
    benchmark.extra_info.update(result, prompt=TOKENS, budget=BUDGET, policy=DECODE_POLICY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--only", choices=["prefill", "decode"])
    a = parser.parse_args()
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {a.tokens}, "
          f"{a.rounds} rounds alternated, load {os.getloadavg()[0]:.2f}", flush=True)
    if a.only != "decode":
        over = prefill_overheads(model, tok, a.tokens, a.rounds)
        print(f"\nplain prefill {over.pop('plain_s'):.2f} s (median)\n\n| policy | prefill overhead |\n|---|---|")
        for p, v in over.items():
            print(f"| {p} | {100 * v:+.1f}% |", flush=True)
    if a.only != "prefill":
        ratios = decode_ratios(model, tok, a.tokens, a.rounds, a.steps)
        print(f"\n| decode ({DECODE_POLICY}, budget {BUDGET}, {a.steps} steps) | value |\n|---|---|")
        for k, v in ratios.items():
            print(f"| {k} | {v:.3f} |", flush=True)
    print(f"\nload after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
