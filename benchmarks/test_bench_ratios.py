"""The speed goals as ratios, measured the way a user runs ``generate``: a raw text prompt
(no chat template), ``model.generate(ids, max_new_tokens=N, min_new_tokens=N,
do_sample=False, stopping_criteria=[a clock])`` under ``kvpolicy.apply(model, policy,
budget=0.1[, compile=True])``; the prefill is the time until the first token, a decode step
the time between two tokens after the first two steps; every configuration alternated in
one process (A B C A B C ...), each ratio the median over rounds of the ratio within a
round, so the drift of a shared machine cancels; the compiled configurations warmed once
before the rounds.

- prefill overhead per policy: policy prefill / plain prefill - 1 (4k prompt);
- decode cost of what is kept: decode ms/token at context N and budget b over full-cache
  decode at context b*N (N = 4k, b = 0.1), eager and compiled;
- compiled decode speedup: eager / compiled ms/token of the same policy configuration.

    python benchmarks/test_bench_ratios.py [--tokens 4000] [--rounds 3] [--new-tokens 34]

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
from transformers import StoppingCriteriaList

import kvpolicy
from kvpolicy.apply import compile_config
from kvpolicy.tools.embedded import docs_topics, load_smollm2
from kvpolicy.tools.params import tokenizer_for

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
TOKENS = 1000 if FAST else 4000
ROUNDS = 3
NEW_TOKENS = 14 if FAST else 34
SKIPPED = 2  # decode steps not timed (the first: allocation, compiled graph's first replay)
BUDGET = 0.1
PREFILL_POLICIES = ["snapkv", "vlcache", "spankv", "pyramidkv", "uniform", "h2o", "prefixkv", "kvzip"]
DECODE_POLICY = "snapkv"


def raw_prompt(tok, tokens: int) -> torch.Tensor:
    """input_ids [1, tokens]: the first ``tokens`` tokens of the embedded docs, as plain text."""
    text = " ".join(" ".join(docs_topics()).split())
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"][:tokens]])


def generate_times(model, ids: torch.Tensor, policy: str | None, compiled: bool,
                   new_tokens: int, **params) -> tuple[float, float]:
    """(prefill seconds until the first token, decode ms/token after SKIPPED steps) of one
    greedy generate of ``new_tokens`` tokens; policy None: the plain model (compiled: with
    transformers' own static cache); params: the policy's (kvzip: its tokenizer)."""
    stamps = Stamps()
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  stopping_criteria=StoppingCriteriaList([stamps]))
    start = time.perf_counter()
    with torch.no_grad():
        if policy is None:
            if compiled:
                kwargs.update(cache_implementation="static", compile_config=compile_config(model.device))
            model.generate(ids, **kwargs)
        else:
            with kvpolicy.apply(model, policy, BUDGET, compile=compiled, **params):
                model.generate(ids, **kwargs)
    t = stamps.times[SKIPPED:]
    return stamps.times[0] - start, 1000 * (t[-1] - t[0]) / (len(t) - 1)


def alternate(configs: dict, rounds: int) -> dict[str, list[float]]:
    """{name: [value per round]}: every configuration once per round, in order."""
    values = {name: [] for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            values[name].append(run())
    return values


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def prefill_overheads(model, tok, tokens: int, rounds: int, new_tokens: int) -> dict[str, float]:
    """{policy: median over rounds of policy prefill / plain prefill - 1}."""
    ids = raw_prompt(tok, tokens)
    generate_times(model, ids[:, :64], None, False, new_tokens)  # warm-up
    configs = {"plain": lambda: generate_times(model, ids, None, False, new_tokens)[0]}
    configs.update({p: (lambda p=p: generate_times(model, ids, p, False, new_tokens,
                                                   **tokenizer_for(p, tok))[0])
                    for p in PREFILL_POLICIES})
    times = alternate(configs, rounds)
    out = {p: median_ratio(times[p], times["plain"]) - 1 for p in PREFILL_POLICIES}
    out["plain_s"] = statistics.median(times["plain"])
    return out


def linear_floor_ms(model, repeats: int = 10) -> float:
    """ms to run every nn.Linear of the model once on one token: the weight reads a decode
    step cannot avoid (no attention, no norms, no framework)."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(1, m.in_features, dtype=m.weight.dtype) for m in linears]
    with torch.no_grad():
        for _ in range(2):
            for m, x in zip(linears, inputs):
                m(x)
        start = time.perf_counter()
        for _ in range(repeats):
            for m, x in zip(linears, inputs):
                m(x)
    return 1000 * (time.perf_counter() - start) / repeats


def decode_ratios(model, tok, tokens: int, rounds: int, new_tokens: int) -> dict[str, float]:
    """Decode at context ``tokens`` under DECODE_POLICY at BUDGET against the full cache at
    BUDGET x tokens, eager and compiled, and compiled against eager."""
    long, short = raw_prompt(tok, tokens), raw_prompt(tok, round(BUDGET * tokens))
    configs = {
        "linear_floor": lambda: linear_floor_ms(model),
        "full_short_eager": lambda: generate_times(model, short, None, False, new_tokens)[1],
        "policy_eager": lambda: generate_times(model, long, DECODE_POLICY, False, new_tokens)[1],
        "full_short_compiled": lambda: generate_times(model, short, None, True, new_tokens)[1],
        "policy_compiled": lambda: generate_times(model, long, DECODE_POLICY, True, new_tokens)[1],
    }
    for name in ("full_short_compiled", "policy_compiled"):
        configs[name]()  # compile before the rounds
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
    result = benchmark.pedantic(prefill_overheads, args=(model, tok, TOKENS, ROUNDS, NEW_TOKENS), rounds=1, iterations=1)
    benchmark.extra_info.update({f"{k}_overhead" if k in PREFILL_POLICIES else k: v
                                 for k, v in result.items()}, prompt=TOKENS)


def test_bench_decode_ratios_alternated(benchmark, smollm2):
    model, tok = smollm2
    result = benchmark.pedantic(decode_ratios, args=(model, tok, TOKENS, ROUNDS, NEW_TOKENS), rounds=1, iterations=1)
    benchmark.extra_info.update(result, prompt=TOKENS, budget=BUDGET, policy=DECODE_POLICY)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--only", choices=["prefill", "decode"])
    a = parser.parse_args()
    model, tok = load_smollm2(threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompt {a.tokens}, "
          f"{a.rounds} rounds alternated, load {os.getloadavg()[0]:.2f}", flush=True)
    if a.only != "decode":
        over = prefill_overheads(model, tok, a.tokens, a.rounds, a.new_tokens)
        print(f"\nplain prefill {over.pop('plain_s'):.2f} s (median)\n\n| policy | prefill overhead |\n|---|---|")
        for p, v in over.items():
            print(f"| {p} | {100 * v:+.1f}% |", flush=True)
    if a.only != "prefill":
        ratios = decode_ratios(model, tok, a.tokens, a.rounds, a.new_tokens)
        print(f"\n| decode ({DECODE_POLICY}, budget {BUDGET}, {a.new_tokens} new tokens) | value |\n|---|---|")
        for k, v in ratios.items():
            print(f"| {k} | {v:.3f} |", flush=True)
    print(f"\nload after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
