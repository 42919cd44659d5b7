"""Decode ms/token of the embedded SmolLM2 at a long prompt: full cache vs each policy at
budget 0.1, eager and compiled, with the KV bytes each holds. KVPOLICY_BENCH_FAST=1: a
1k prompt, fewer steps, fewer configurations (CI)."""
import os

import pytest
import torch

import kvpolicy
from kvpolicy.apply import compile_config
from kvpolicy.demo import built_in, measure, needle_prompt

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
PROMPT = 1024 if FAST else 8192
STEPS = 8 if FAST else 24
SHORT = 800  # the goal's reference: full-cache decode at a 0.8k prompt
CONFIGS = ([("full", "eager"), ("h2o", "eager"), ("vlcache", "eager"), ("vlcache", "compiled")] if FAST
           else [(p, m) for p in ["full", *built_in()] for m in ("eager", "compiled")])


@pytest.fixture(scope="module")
def smollm2():
    from kvpolicy.evaluation.runner import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_model("smollm2")


def decode(model, tok, tokens: int, policy: str, mode: str) -> dict:
    inputs = needle_prompt(tok, tokens, 0.5)
    kwargs = {}
    if mode == "compiled" and policy == "full":  # transformers' own static cache, compiled
        kwargs = dict(cache_implementation="static", compile_config=compile_config(model.device))
    if policy == "full":
        return measure(model, tok, inputs, STEPS + 1, policy, **kwargs)
    with kvpolicy.apply(model, policy, 0.1, compile=mode == "compiled"):
        return measure(model, tok, inputs, STEPS + 1, policy)


@pytest.mark.parametrize("policy, mode", CONFIGS)
def test_bench_decode(benchmark, smollm2, policy, mode):
    model, tok = smollm2
    if mode == "compiled":  # compile outside the timed run (one warm-up generate)
        decode(model, tok, PROMPT, policy, mode)
    result = benchmark.pedantic(decode, args=(model, tok, PROMPT, policy, mode), rounds=1, iterations=1)
    benchmark.extra_info.update(prompt=PROMPT, decode_ms_per_token=result["decode_ms"],
                                kv_bytes=result["kv_bytes"], prefill_s=result["prefill_s"])


def test_bench_decode_full_short_prompt(benchmark, smollm2):
    """The goal's reference point: full-cache eager decode at a 0.8k prompt."""
    model, tok = smollm2
    result = benchmark.pedantic(decode, args=(model, tok, SHORT, "full", "eager"), rounds=1, iterations=1)
    benchmark.extra_info.update(prompt=SHORT, decode_ms_per_token=result["decode_ms"],
                                kv_bytes=result["kv_bytes"])

