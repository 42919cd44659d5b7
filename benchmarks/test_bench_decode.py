"""Decode ms/token of the embedded SmolLM2 at a long prompt: full cache vs each policy at
budget 0.1, eager and compiled, with the KV bytes each holds, and the goal's reference
(full-cache eager decode at a 0.8k prompt). KVPOLICY_BENCH_FAST=1: a 1k prompt, fewer
steps, fewer configurations (CI).

Each configuration is one ``generate`` (one prefill). Decode ms/token is the mean of the
decode steps after the first WARMUP ones: the first compiled step compiles, and the first
eager steps warm the allocator, so both modes are reported on the same steady steps.
Compiled runs cover full, h2o and vlcache only (KVPOLICY_BENCH_COMPILED=all for every
policy): on a 2-core CPU each 8k configuration costs about a minute of prefill alone.
``loadavg`` (the 1-minute load average before the run) is recorded with each result."""
import os
import time

import pytest
import torch

import kvpolicy
from kvpolicy.apply import compile_config
from kvpolicy.demo import built_in, measure, needle_prompt

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
PROMPT = 1024 if FAST else 8192
STEPS = 8 if FAST else 32  # timed decode steps
WARMUP = 2  # decode steps before them, not timed (compile, allocator)
SHORT = 800  # the goal's reference: full-cache decode at a 0.8k prompt
COMPILED = (["full", *built_in()] if os.environ.get("KVPOLICY_BENCH_COMPILED") == "all"
            else ["full", "h2o", "vlcache"])
# Most informative first (the run may be cut short on a loaded machine): the goal's pair,
# then compiled, then the other policies eager.
FIRST = [("full", "eager"), ("h2o", "eager"), ("vlcache", "eager"), ("vlcache", "compiled"),
         ("h2o", "compiled"), ("full", "compiled")]
CONFIGS = (FIRST[:3] + [("vlcache", "compiled")] if FAST
           else FIRST + [c for c in [(p, m) for m in ("eager", "compiled") for p in ["full", *built_in()]]
                         if c not in FIRST and (c[1] == "eager" or c[0] in COMPILED)])


@pytest.fixture(scope="module")
def smollm2():
    from kvpolicy.evaluation.runner import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_model("smollm2")


def loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


def decode(model, tok, tokens: int, policy: str, mode: str) -> dict:
    """One greedy generate of WARMUP + STEPS new tokens; measure()'s result plus the mean
    ms/token of the last STEPS decode steps (``steady_ms``)."""
    inputs = needle_prompt(tok, tokens, 0.5)
    kwargs = {}
    if mode == "compiled" and policy == "full":  # transformers' own static cache, compiled
        kwargs = dict(cache_implementation="static", compile_config=compile_config(model.device))
    stamps: list[float] = []
    pre = model.register_forward_pre_hook(lambda *a: stamps.append(time.perf_counter()))
    post = model.register_forward_hook(lambda *a: stamps.append(time.perf_counter()))
    try:
        if policy == "full":
            result = measure(model, tok, inputs, 1 + WARMUP + STEPS, policy, **kwargs)
        else:
            with kvpolicy.apply(model, policy, 0.1, compile=mode == "compiled"):
                result = measure(model, tok, inputs, 1 + WARMUP + STEPS, policy)
    finally:
        pre.remove()
        post.remove()
    steps = [b - a for a, b in zip(stamps[::2], stamps[1::2])][1 + WARMUP:]  # [0] is the prefill
    result["steady_ms"] = 1000 * sum(steps) / max(1, len(steps))
    result["prompt"] = inputs["input_ids"].shape[1]
    return result


def report(benchmark, result: dict, mode: str, load: float) -> None:
    benchmark.extra_info.update(prompt=result["prompt"], decode_ms_per_token=result["steady_ms"],
                                decode_ms_all_steps=result["decode_ms"], kv_bytes=result["kv_bytes"],
                                prefill_s=result["prefill_s"], loadavg=load)
    print(f"\n{result['name']:<13}{mode:<9} prompt {result['prompt']:>5}  KV {result['kv_bytes'] / 2**20:8.2f} MiB"
          f"  prefill {result['prefill_s']:7.2f} s  decode {result['steady_ms']:7.1f} ms/token"
          f" (all steps {result['decode_ms']:.1f})  load {load:.2f}", flush=True)


def test_bench_decode_full_short_prompt(benchmark, smollm2):
    """The goal's reference point: full-cache eager decode at a 0.8k prompt (runs first)."""
    model, tok = smollm2
    load = loadavg()
    result = benchmark.pedantic(decode, args=(model, tok, SHORT, "full", "eager"), rounds=1, iterations=1)
    report(benchmark, result, "eager", load)


@pytest.mark.parametrize("policy, mode", CONFIGS)
def test_bench_decode(benchmark, smollm2, policy, mode):
    model, tok = smollm2
    load = loadavg()
    result = benchmark.pedantic(decode, args=(model, tok, PROMPT, policy, mode), rounds=1, iterations=1)
    report(benchmark, result, mode, load)
