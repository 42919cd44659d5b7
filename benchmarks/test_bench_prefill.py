"""Prefill of the embedded SmolLM2: the policy's overhead (score + allocate + compact) as a
fraction of the model's own prefill, and peak memory with vs without a policy (the score
op never materialises N x N). KVPOLICY_BENCH_FAST=1: shorter prompts (CI)."""
import json
import os
import resource
import subprocess
import sys
import time

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.demo import needle_prompt

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
LENGTHS = [256, 1024] if FAST else [1024, 4096]
PEAK_LENGTH = 1024 if FAST else 4096


def load():
    from kvpolicy.evaluation.runner import load_model

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return load_model("smollm2")


@pytest.fixture(scope="module")
def smollm2():
    return load()


def prefill(model, inputs, cache) -> float:
    """Seconds of one prompt forward into ``cache`` (only the last position's logits)."""
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return time.perf_counter() - start


@pytest.mark.parametrize("tokens", LENGTHS)
@pytest.mark.parametrize("policy", ["vlcache", "h2o"])
def test_bench_prefill_overhead(benchmark, smollm2, policy, tokens):
    model, tok = smollm2
    inputs = needle_prompt(tok, tokens, 0.5)
    plain = min(prefill(model, inputs, DynamicCache(config=model.config)) for _ in range(2))
    with kvpolicy.apply(model, policy, 0.1) as handle:
        benchmark.pedantic(lambda: prefill(model, inputs, handle.new_cache(1)), rounds=2, iterations=1)
    policy_s = benchmark.stats.stats.min
    benchmark.extra_info.update(prompt=inputs["input_ids"].shape[1], model_prefill_s=plain,
                                policy_prefill_s=policy_s, overhead=policy_s / plain - 1)


@pytest.mark.parametrize("policy", ["full", "h2o"])
def test_bench_prefill_peak_memory(benchmark, policy):
    """Peak RSS growth of one prefill, measured in a fresh process."""
    child = [sys.executable, __file__, policy, str(PEAK_LENGTH)]
    result = benchmark.pedantic(lambda: json.loads(subprocess.run(
        child, check=True, capture_output=True, text=True).stdout.splitlines()[-1]), rounds=1, iterations=1)
    benchmark.extra_info.update(result)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child_main(policy: str, tokens: int) -> None:
    model, tok = load()
    inputs = needle_prompt(tok, tokens, 0.5)
    prefill(model, needle_prompt(tok, 64, 0.5), DynamicCache(config=model.config))  # warm up
    before = peak_rss()
    if policy == "full":
        prefill(model, inputs, DynamicCache(config=model.config))
    else:
        with kvpolicy.apply(model, policy, 0.1) as handle:
            prefill(model, inputs, handle.new_cache(1))
    print(json.dumps({"policy": policy, "prompt": inputs["input_ids"].shape[1],
                      "peak_growth_mib": (peak_rss() - before) / 2**20}))


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]))
