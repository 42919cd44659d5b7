"""Decode ms/token of the embedded SmolLM2 at a long prompt: full cache vs each policy at
budget 0.1, eager and compiled, with the KV bytes each holds, and the goal's reference
(full-cache eager decode at a 0.8k prompt). KVPOLICY_BENCH_FAST=1: a 1k prompt, fewer
steps, fewer configurations (CI).

Each configuration is one ``generate`` (one prefill), timed by a stopping criterion (model
hooks would break the compiled graph). Decode ms/token is the mean of the
decode steps after the first WARMUP ones: the first compiled step compiles, and the first
eager steps warm the allocator, so both modes are reported on the same steady steps.
Compiled runs cover full, h2o and vlcache only (KVPOLICY_BENCH_COMPILED=all for every
policy): on a 2-core CPU each 8k configuration costs about a minute of prefill alone.
``loadavg`` (the 1-minute load average before the run) is recorded with each result."""
import os
import time

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import kvpolicy
from kvpolicy.apply import compile_config
from kvpolicy.models import output_cache
from kvpolicy.tools.demo import built_in
from kvpolicy.tools.embedded import load_smollm2, needle_prompt

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
    return load_smollm2(threads=min(2, os.cpu_count() or 1))


def loadavg() -> float:
    try:
        return float(open("/proc/loadavg").read().split()[0])
    except OSError:
        return float("nan")


class Stamps(StoppingCriteria):
    """Stamps the time after every generation step; never stops. Runs outside the compiled
    forward (model hooks would be traced by torch.compile and break its fullgraph)."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate(model, tok, inputs: dict, policy: str, **kwargs) -> dict:
    """One greedy generate of 1 + WARMUP + STEPS new tokens: KV bytes, prefill seconds (with
    the first token) and the mean ms/token of the last STEPS decode steps."""
    stamps = Stamps()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=1 + WARMUP + STEPS, do_sample=False,
                             return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([stamps]),
                             **kwargs)
    cache = output_cache(out)
    if hasattr(cache, "nbytes"):
        kv_bytes = cache.nbytes()
    else:
        kv_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    t = stamps.times
    steps = [b - a for a, b in zip(t, t[1:])][WARMUP:]
    return dict(name=policy, prompt=inputs["input_ids"].shape[1], kv_bytes=kv_bytes, prefill_s=t[0] - start,
                steady_ms=1000 * sum(steps) / max(1, len(steps)),
                decode_ms=1000 * (t[-1] - t[0]) / max(1, len(t) - 1))


def decode(model, tok, tokens: int, policy: str, mode: str) -> dict:
    inputs = needle_prompt(tok, tokens, 0.5)
    if policy == "full":
        kwargs = {}
        if mode == "compiled":  # transformers' own static cache, compiled
            kwargs = dict(cache_implementation="static", compile_config=compile_config(model.device))
        return generate(model, tok, inputs, policy, **kwargs)
    with kvpolicy.apply(model, policy, 0.1, compile=mode == "compiled"):
        return generate(model, tok, inputs, policy)


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
