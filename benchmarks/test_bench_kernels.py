"""Kernel benchmarks on SmolLM2 shapes (9 query heads, 3 KV heads, head dim 64, 30 layers).

Without a GPU the ops take their reference path (CPU). KVPOLICY_BENCH_FAST=1 skips the
expensive full-prompt (Q = N) score runs at 4k and 8k. Bandwidth figures are relative to the
copy bandwidth of this machine, measured in the same run (one large ``Tensor.copy_``).
Torch runs on one thread (``KVPOLICY_BENCH_THREADS`` to change): on a shared 2-core machine
two OpenMP threads stall whenever another process holds a core.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

from kvpolicy_kernels import accumulate_scores, attention_and_scores, attention_with_lse, compact_layers

FAST = os.environ.get("KVPOLICY_BENCH_FAST") == "1"
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 9, 3, 64, 30
SCALING = HEAD_DIM**-0.5


@pytest.fixture(scope="module", autouse=True)
def threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("KVPOLICY_BENCH_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def copy_bandwidth() -> float:
    """Bytes per second of a 512 MiB fp32 copy (read + write), best of 5."""
    src = torch.randn(128 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu x{torch.get_num_threads()} threads"


@pytest.mark.parametrize("queries", ["full", 32])
@pytest.mark.parametrize("n", [1024, 4096, 8192])
def test_bench_accumulate_scores(benchmark, n, queries):
    q_len = n if queries == "full" else queries
    if FAST and q_len == n and n > 1024:
        pytest.skip("KVPOLICY_BENCH_FAST=1: full-prompt scores only at 1k")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen)
    heavy = q_len * n > 2**22
    benchmark.pedantic(accumulate_scores, args=(query, key), kwargs=dict(scaling=SCALING),
                       rounds=1 if heavy else 5, warmup_rounds=0 if heavy else 1)
    if benchmark.stats is None:  # --benchmark-disable: a smoke run, nothing to report
        return
    causal_pairs = q_len * n - q_len * (q_len - 1) / 2
    benchmark.extra_info.update(
        device=device_name(), n=n, queries=q_len,
        logit_gflop_per_s=2 * HEADS * causal_pairs * HEAD_DIM / benchmark.stats.stats.median / 1e9)


@pytest.mark.parametrize("n", [1024, 2048])
def test_bench_scores_reusing_lse(benchmark, n):
    """All-query (Q = N) scoring against one causal SDPA pass of the same shapes, alternated in
    one process (A B C A B C ..., medians over 3 rounds): scores recomputing the softmax
    statistics, scores from the lse of ``attention_with_lse``, that attention itself, and
    ``attention_and_scores`` (output and scores in one pass, what the CPU prefill runs)."""
    if FAST and n > 1024:
        pytest.skip("KVPOLICY_BENCH_FAST=1: only at 1k")
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)
    key, value = (torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) for _ in range(2))
    _, lse = attention_with_lse(query, key, value, scaling=SCALING, is_causal=True)
    runs = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            query, key, value, is_causal=True, enable_gqa=True, scale=SCALING),
        "attention_with_lse": lambda: attention_with_lse(query, key, value, scaling=SCALING, is_causal=True),
        "scores": lambda: accumulate_scores(query, key, scaling=SCALING),
        "scores_lse": lambda: accumulate_scores(query, key, scaling=SCALING, lse=lse),
        "one_pass": lambda: attention_and_scores(query, key, value, scaling=SCALING, is_causal=True),
    }
    times = {name: [] for name in runs}

    def alternate():
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    alternate()  # warm-up
    times = {name: [] for name in runs}
    benchmark.pedantic(alternate, rounds=3, warmup_rounds=0)
    median = {name: sorted(t)[len(t) // 2] for name, t in times.items()}
    benchmark.extra_info.update(
        device=device_name(), n=n, **{f"{name}_s": t for name, t in median.items()},
        scores_over_sdpa=median["scores"] / median["sdpa"],
        scores_lse_over_sdpa=median["scores_lse"] / median["sdpa"],
        attention_with_lse_over_sdpa=median["attention_with_lse"] / median["sdpa"],
        one_pass_over_sdpa=median["one_pass"] / median["sdpa"])


@pytest.mark.parametrize("n", [1024, 8192])
def test_bench_compact_30_layers(benchmark, copy_bandwidth, n):
    """30 layers, about 10% of n kept per layer (ragged 5-15%), K and V, fp32."""
    gen = torch.Generator().manual_seed(0)
    keys = [torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    values = [torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen) for _ in range(LAYERS)]
    kept = [int(n * (0.05 + 0.1 * torch.rand(1, generator=gen).item())) for _ in range(LAYERS)]
    keep = [torch.rand(1, KV_HEADS, n, generator=gen).argsort(-1)[..., :m].sort(-1).values for m in kept]
    dst_keys = [torch.empty(1, KV_HEADS, m + 64, HEAD_DIM) for m in kept]
    dst_values = [torch.empty(1, KV_HEADS, m + 64, HEAD_DIM) for m in kept]
    benchmark.pedantic(compact_layers, args=(keys, values, keep, dst_keys, dst_values),
                       rounds=20, warmup_rounds=2)
    if benchmark.stats is None:
        return
    rows = KV_HEADS * sum(kept)
    bytes_moved = 2 * rows * HEAD_DIM * 4 * 2 + rows * 8  # K and V read + written, indices read
    achieved = bytes_moved / benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=device_name(), n=n, kept_rows=rows, bytes_moved=bytes_moved,
        achieved_gb_per_s=achieved / 1e9, copy_gb_per_s=copy_bandwidth / 1e9,
        fraction_of_copy_bandwidth=achieved / copy_bandwidth)


PEAK_SCRIPT = """
import sys, torch
from kvpolicy_kernels import accumulate_scores, attention_and_scores

def status_kib(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))

mode, n = sys.argv[1], int(sys.argv[2])
query, key = torch.randn(1, {heads}, n, {dim}), torch.randn(1, {kv}, n, {dim})
value = torch.randn(1, {kv}, n, {dim})
open("/proc/self/clear_refs", "w").write("5")  # resets the peak resident set (VmHWM)
before = status_kib("VmRSS:")
if mode == "accumulate_scores":
    accumulate_scores(query, key, scaling={scaling})
elif mode == "attention_and_scores":
    attention_and_scores(query, key, value, scaling={scaling}, is_causal=True)
elif mode == "sdpa":
    torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, enable_gqa=True)
else:  # eager attention, as transformers' eager_attention_forward
    k = key.repeat_interleave({heads} // {kv}, 1)
    logits = query @ k.transpose(-1, -2) * {scaling}
    logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    torch.softmax(logits, -1) @ value.repeat_interleave({heads} // {kv}, 1)
print((status_kib("VmHWM:") - before) * 1024)
""".format(heads=HEADS, kv=KV_HEADS, dim=HEAD_DIM, scaling=SCALING)


def peak_extra_bytes(mode: str, n: int) -> int:
    """Peak resident memory above the inputs during one call, in a fresh process (Linux)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, mode, str(n)], env=env,
                         capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_peak_memory_scores_8k(benchmark):
    """Score accumulation at N = 8k, alone or in one pass with the attention, holds no N x N
    buffer: its extra peak memory stays near the reference's chunk bound and far below eager
    attention, which materialises [H, N, N] (eager is skipped with KVPOLICY_BENCH_FAST=1).
    The time is that of the subprocesses."""
    n = 8192
    modes = ("accumulate_scores", "attention_and_scores", "sdpa")
    modes = modes if FAST else modes + ("eager",)
    peaks = benchmark.pedantic(lambda: {mode: peak_extra_bytes(mode, n) for mode in modes},
                               rounds=1, warmup_rounds=0)
    n_by_n = HEADS * n * n * 4
    chunk_buffer = HEADS * 128 * n * 4  # one fp32 [H, chunk, N] block of the reference
    benchmark.extra_info.update(device=device_name(), n=n, n_by_n_bytes=n_by_n,
                                **{f"peak_extra_bytes_{mode}": peak for mode, peak in peaks.items()})
    assert peaks["accumulate_scores"] < 8 * chunk_buffer < n_by_n / 4
    assert peaks["attention_and_scores"] < 8 * chunk_buffer
    assert FAST or peaks["eager"] >= n_by_n
