"""Prefill of the embedded SmolLM2: the policy's overhead (score + allocate + compact) as a
fraction of the model's own prefill, and peak memory with vs without a policy (the score
op never materialises N x N). KVPOLICY_BENCH_FAST=1: shorter prompts (CI)."""
import gc
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import DynamicCache

import kvpolicy
from kvpolicy.models import CACHE_ARG
from kvpolicy.tools.embedded import load_smollm2, needle_prompt

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
LENGTHS = [256, 1024] if FAST else [1024, 4096]
PEAK_LENGTH = 1024 if FAST else 4096


def load():
    return load_smollm2(threads=min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def smollm2():
    return load()


def prefill(model, inputs, cache) -> float:
    """Seconds of one prompt forward into ``cache`` (only the last position's logits)."""
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs, **{CACHE_ARG: cache}, use_cache=True, logits_to_keep=1)
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


PEAK_POLICY = "h2o"  # scores every prompt query: the case that could build an N x N matrix


def test_bench_prefill_peak_memory(benchmark):
    """Peak resident memory added by one prefill of PEAK_LENGTH tokens, plain model
    (DynamicCache) vs h2o at budget 0.1, measured in a fresh process after loading and a
    warm-up (see ``child_main``). The policy's extra peak stays far below one [H, N, N]
    fp32 attention matrix: the score op never materialises N x N."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    child = [sys.executable, __file__, PEAK_POLICY, str(PEAK_LENGTH)]
    result = benchmark.pedantic(lambda: json.loads(subprocess.run(
        child, check=True, capture_output=True, text=True, env=env).stdout.splitlines()[-1]),
        rounds=1, iterations=1)
    n = result["prompt"]
    n_by_n = result["heads"] * n * n * 4  # one fp32 [H, N, N] attention matrix
    extra = result["peak_growth_policy"] - result["peak_growth_full"]
    result.update(n_by_n_bytes=n_by_n, policy_extra_bytes=extra, policy_extra_of_n_by_n=extra / n_by_n)
    benchmark.extra_info.update(result)
    print(f"\nprefill peak growth at {n} tokens: full {result['peak_growth_full'] / 2**20:.1f} MiB, "
          f"{PEAK_POLICY} {result['peak_growth_policy'] / 2**20:.1f} MiB; H*N*N*4 = {n_by_n / 2**20:.0f} MiB")
    kv = result["kv_bytes_full"]
    assert kv / 2 < result["peak_growth_full"]  # the measurement sees the prefill (its KV at least)
    assert extra < n_by_n / 4


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith(field))


def peak_growth(run) -> int:
    """Peak resident bytes above the current ones while ``run()`` runs (Linux: writing 5 to
    clear_refs resets VmHWM, the peak, to the current resident set). The caller's
    MALLOC_MMAP_THRESHOLD_ keeps large blocks out of glibc's heap, so memory freed while
    loading the model is not silently reused (which would hide growth)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_bytes("VmRSS:")
    run()
    return status_bytes("VmHWM:") - before


def child_main(policy: str, tokens: int) -> None:
    model, tok = load()
    inputs = needle_prompt(tok, tokens, 0.5)
    with kvpolicy.apply(model, policy, 0.1) as handle:  # warm up both paths (lazy inits)
        prefill(model, needle_prompt(tok, 64, 0.5), handle.new_cache(1))
    prefill(model, needle_prompt(tok, 64, 0.5), DynamicCache(config=model.config))
    caches = {}

    def full():
        caches["full"] = DynamicCache(config=model.config)
        prefill(model, inputs, caches["full"])

    def with_policy():
        with kvpolicy.apply(model, policy, 0.1) as handle:
            caches["policy"] = handle.new_cache(1)
            prefill(model, inputs, caches["policy"])

    growth_full = peak_growth(full)
    kv_full = sum(layer.keys.nbytes + layer.values.nbytes for layer in caches.pop("full").layers)
    growth_policy = peak_growth(with_policy)
    kv_policy = caches.pop("policy").nbytes()
    print(json.dumps({"policy": policy, "prompt": inputs["input_ids"].shape[1],
                      "heads": model.config.num_attention_heads,
                      "peak_growth_full": growth_full, "peak_growth_policy": growth_policy,
                      "kv_bytes_full": kv_full, "kv_bytes_policy": kv_policy}))


if __name__ == "__main__":
    child_main(sys.argv[1], int(sys.argv[2]))
