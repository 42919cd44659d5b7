"""The GPU benchmark (issue #29): a random-weight bf16 model shaped like a 1B Llama (hidden
2048, 16 layers, 32 query / 8 KV heads, head dim 64, vocab 32000) at a 32k-token prompt.

- kernels: the score op against SDPA on the same shapes (every query causal, and the last
  32 queries) with both FLOP rates; compaction of 16 layers' kept rows (budget 0.1) against
  a device copy of the same bytes;
- prefill: ``model.generate(max_new_tokens=1)`` plain vs under ``kvpolicy.apply`` (snapkv,
  pyramidkv: the last 32 queries; h2o: every query) at budget 0.1, rounds alternated, the
  median overhead; peak GPU memory of each;
- compress: ``kvpolicy.compress`` with kvzip at budget 0.1 on an 8k-token context, whole
  (the paper's rule) and with ``chunk_size=512``, against a plain prefill of the same
  context (issue #26: at most 2.3x), rounds alternated, the median ratio; peak GPU memory;
- decode ms/token: snapkv at budget 0.1 of 32k against the full cache at 32k and at 3.2k
  (the floor: what the kept size costs), eager (rounds alternated) and compiled
  (``apply(compile=True)``: CUDA graphs; the floor: transformers' static cache compiled the
  same way, one run each after its warm-up steps); peak GPU memory of each.

    python benchmarks/gpu.py --out DIR [--dry-run]

Writes DIR/gpu_bench.json and DIR/gpu_bench.md after every section (a run cut short keeps
what it measured), each goal beside its number. --dry-run: CPU, fp32, 512 tokens, 2 tiny
layers, the kernels numpy-interpreted: the same code for CI, its numbers mean nothing.
Timing: CUDA events around back-to-back kernel calls; torch.cuda.synchronize around
generate calls and decode steps; warm-up first.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback
from unittest import mock

DRY_RUN = "--dry-run" in sys.argv[1:]
if DRY_RUN:  # the kernels run interpreted on CPU tensors: set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
from transformers import (DynamicCache, LlamaConfig, LlamaForCausalLM, StoppingCriteria,  # noqa: E402
                          StoppingCriteriaList)

import kvpolicy  # noqa: E402
from kvpolicy.apply import compile_config  # noqa: E402
from kvpolicy.models import CACHE_ARG  # noqa: E402
from kvpolicy_kernels import accumulate_scores, compact_layers  # noqa: E402

SIZES = dict(hidden=2048, layers=16, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
             vocab=32000, tokens=32768, steps=64, warmup=8, rounds=3, reps=10,
             compress_tokens=8192, compress_chunk=512)
DRY_SIZES = dict(hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128,
                 vocab=1000, tokens=512, steps=4, warmup=2, rounds=1, reps=1,
                 compress_tokens=256, compress_chunk=64)
BUDGET = 0.1
WINDOW = 32  # the queries window policies score
PREFILL_GOALS = {"snapkv": 0.03, "pyramidkv": 0.03, "h2o": 0.30}  # overhead at most
GOALS = dict(score_rate=0.5, compaction=0.8, decode_floor=1.05, compress=2.3)
DEVICE = "cpu" if DRY_RUN else "cuda"
DTYPE = torch.float32 if DRY_RUN else torch.bfloat16
GIB = 2**30


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def reset_peak() -> None:
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    """torch.cuda.max_memory_allocated since reset_peak, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated() / GIB if DEVICE == "cuda" else None


def timed(run) -> tuple[float, float | None]:
    """(seconds, peak GiB) of ``run()`` without grad, the device synchronized around it."""
    reset_peak()
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        run()
    sync()
    return time.perf_counter() - start, peak_gib()


def alternate(configs: dict, rounds: int) -> dict:
    """{name: [result per round]}: every configuration called once per round, in order (as
    benchmarks/test_bench_ratios.alternate, which ``python -P`` leaves unimportable)."""
    results = {name: [] for name in configs}
    for _ in range(rounds):
        for name, run in configs.items():
            results[name].append(run())
    return results


def kernel_ms(fn, reps: int) -> float:
    """Mean ms per call of ``fn`` over ``reps`` back-to-back calls after one warm-up call:
    CUDA events on CUDA, wall time on CPU."""
    fn()
    sync()
    if DEVICE != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return 1000 * (time.perf_counter() - start) / reps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def build_model(s: dict) -> LlamaForCausalLM:
    """Random weights (seed 0) in DTYPE on DEVICE, eval mode; pad 0, bos 1, eos 2."""
    config = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                         vocab_size=s["vocab"], max_position_embeddings=s["tokens"] + 1024,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device(DEVICE):
        return LlamaForCausalLM(config).to(DTYPE).eval()


def prompt(s: dict, tokens: int) -> torch.Tensor:
    """int64 [1, tokens] ids of ordinary tokens on DEVICE."""
    gen = torch.Generator().manual_seed(tokens)
    return torch.randint(3, s["vocab"], (1, tokens), generator=gen).to(DEVICE)


# ---- kernels -------------------------------------------------------------------------
def scores_vs_sdpa(s: dict) -> list[dict]:
    """The score op (every query counted, lse recomputed: the CUDA prefill path) and causal
    SDPA on query [1, H, Q, D], key/value [1, G, N, D] laid out as HF's projections (K/V
    expanded to H heads for SDPA, outside the timing). FLOPs: 4 * H * D * visible pairs for
    both (score: two QK^T passes; SDPA: QK^T and PV)."""
    N, H, G, D = s["tokens"], s["heads"], s["kv_heads"], s["head_dim"]
    gen = torch.Generator(DEVICE).manual_seed(0)
    q = torch.randn(1, N, H, D, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    k = torch.randn(1, N, G, D, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    v = torch.randn(1, N, G, D, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
    k_all, v_all = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
    rows = []
    for name, Q in (("every query", N), (f"last {WINDOW} queries", WINDOW)):
        query = q[:, :, N - Q:]
        pairs = Q * (N - Q) + Q * (Q + 1) // 2
        score = kernel_ms(lambda: accumulate_scores(query, k, scaling=D**-0.5), s["reps"])
        sdpa = kernel_ms(lambda: F.scaled_dot_product_attention(
            query, k_all, v_all, is_causal=Q == N), s["reps"])
        sdpa_pairs = pairs if Q == N else Q * N  # the last rows see (nearly) every key
        score_rate, sdpa_rate = 4 * H * D * pairs / score / 1e9, 4 * H * D * sdpa_pairs / sdpa / 1e9
        ratio = score_rate / sdpa_rate
        rows.append(dict(queries=name, Q=Q, N=N, score_ms=score, score_tflops=score_rate, sdpa_ms=sdpa,
                         sdpa_tflops=sdpa_rate, ratio=ratio, goal=GOALS["score_rate"],
                         met=ratio >= GOALS["score_rate"]))
    return rows


def compaction_vs_copy(s: dict) -> dict:
    """compact_layers over every layer's K and V [1, G, N, D] (HF's layout), BUDGET x N
    sorted random rows kept per (layer, head), into contiguous [1, G, n + 64, D] buffers,
    against ``copy_`` of a contiguous tensor of the kept rows' size. Bytes: rows read and
    written plus the int64 indices (compaction); read and written (copy)."""
    L, N, G, D = s["layers"], s["tokens"], s["kv_heads"], s["head_dim"]
    n = round(BUDGET * N)
    gen = torch.Generator(DEVICE).manual_seed(0)
    src = [torch.randn(1, N, G, D, generator=gen, device=DEVICE, dtype=DTYPE).transpose(1, 2)
           for _ in range(2 * L)]
    keep = [torch.rand(1, G, N, generator=gen, device=DEVICE).argsort(-1)[..., :n].sort(-1).values
            for _ in range(L)]
    dst = [torch.empty(1, G, n + 64, D, device=DEVICE, dtype=DTYPE) for _ in range(2 * L)]
    ms = kernel_ms(lambda: compact_layers(src[:L], src[L:], keep, dst[:L], dst[L:]), s["reps"])
    rows_bytes = 2 * L * G * n * D * src[0].element_size()
    moved = 2 * rows_bytes + L * G * n * 8
    flat = torch.empty(rows_bytes // src[0].element_size(), device=DEVICE, dtype=DTYPE)
    out = torch.empty_like(flat)
    copy_ms = kernel_ms(lambda: out.copy_(flat), s["reps"])
    gbs, copy_gbs = moved / ms / 1e6, 2 * rows_bytes / copy_ms / 1e6
    return dict(layers=L, kept_rows=n, bytes_moved=moved, compact_ms=ms, compact_gbs=gbs, copy_ms=copy_ms,
                copy_gbs=copy_gbs, ratio=gbs / copy_gbs, goal=GOALS["compaction"],
                met=gbs / copy_gbs >= GOALS["compaction"])


def kernels(s: dict) -> dict:
    """The Triton kernels (interpreted in a dry run) against SDPA and a device copy."""
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "triton"}):
        return dict(scores=scores_vs_sdpa(s), compaction=compaction_vs_copy(s))


# ---- prefill and decode --------------------------------------------------------------
def prefill(model, ids: torch.Tensor, policy: str | None) -> tuple[float, float | None]:
    """(seconds, peak GiB) of generate(max_new_tokens=1): the prefill, its compaction under
    ``policy`` at BUDGET (None: plain, DynamicCache) and the first token."""
    handle = None if policy is None else kvpolicy.apply(model, policy, BUDGET)
    try:
        return timed(lambda: model.generate(ids, max_new_tokens=1, do_sample=False))
    finally:
        if handle is not None:
            handle.remove()


def prefills(model, s: dict) -> dict:
    """Per configuration the median seconds and peak GiB; per policy the median over rounds
    of its overhead on the plain prefill of the same round."""
    ids = prompt(s, s["tokens"])
    configs = [None, *PREFILL_GOALS]
    for policy in configs:  # warm-up: kernels compiled, allocator grown
        prefill(model, ids[:, :1024], policy)
    runs = alternate({p: functools.partial(prefill, model, ids, p) for p in configs}, s["rounds"])
    out = {"plain": dict(seconds=statistics.median(t for t, _ in runs[None]), peak_gib=runs[None][0][1])}
    for policy, target in PREFILL_GOALS.items():
        overhead = statistics.median(t / plain[0] - 1 for (t, _), plain in zip(runs[policy], runs[None]))
        out[policy] = dict(seconds=statistics.median(t for t, _ in runs[policy]),
                           peak_gib=runs[policy][0][1], overhead=overhead, goal=target,
                           met=overhead <= target)
    return out


class Stamps(StoppingCriteria):
    """The time after every generation step (device synchronized); never stops."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        sync()
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def decode_ms(model, ids: torch.Tensor, s: dict, policy: str | None,
              compiled: bool) -> tuple[float, float | None]:
    """(mean ms per decode step over s["steps"] steps after s["warmup"] ones, peak GiB) of
    one greedy generate: ``policy`` at BUDGET through apply (compile=compiled), or the full
    cache (compiled: transformers' static cache with apply's compile configuration)."""
    reset_peak()
    stamps = Stamps()
    new = 1 + s["warmup"] + s["steps"]
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False,
                  stopping_criteria=StoppingCriteriaList([stamps]))
    if policy is None and compiled:
        kwargs.update(cache_implementation="static", compile_config=compile_config(model.device))
    handle = None if policy is None else kvpolicy.apply(model, policy, BUDGET, compile=compiled)
    try:
        with torch.no_grad():
            model.generate(ids, **kwargs)
    finally:
        if handle is not None:
            handle.remove()
    t = stamps.times[s["warmup"]:]  # after the prefill's token and the warm-up steps
    return 1000 * (t[-1] - t[0]) / (len(t) - 1), peak_gib()


def decodes(model, s: dict) -> dict:
    """snapkv at BUDGET of N tokens, the full cache at N and at BUDGET x N (the floor):
    eager alternated over rounds (medians), then compiled once each."""
    long, short = prompt(s, s["tokens"]), prompt(s, round(BUDGET * s["tokens"]))
    configs = {"snapkv_N": (long, "snapkv"), "full_N": (long, None), "full_floor": (short, None)}
    runs = alternate({name: functools.partial(decode_ms, model, ids, s, policy, False)
                      for name, (ids, policy) in configs.items()}, s["rounds"])
    out = {f"{name}_eager": dict(ms=statistics.median(m for m, _ in r), peak_gib=r[0][1])
           for name, r in runs.items()}
    ratio = statistics.median(a[0] / b[0] for a, b in zip(runs["snapkv_N"], runs["full_floor"]))
    out["ratio_eager"] = dict(value=ratio, goal=GOALS["decode_floor"], met=ratio <= GOALS["decode_floor"])
    for name in ("snapkv_N", "full_floor"):
        ms, peak = decode_ms(model, configs[name][0], s, configs[name][1], True)
        out[f"{name}_compiled"] = dict(ms=ms, peak_gib=peak)
    ratio = out["snapkv_N_compiled"]["ms"] / out["full_floor_compiled"]["ms"]
    out["ratio_compiled"] = dict(value=ratio, goal=GOALS["decode_floor"], met=ratio <= GOALS["decode_floor"])
    return out


# ---- compress (kvzip) -----------------------------------------------------------------
class StandInTokenizer:
    """KVzip builds its repeat prompt with the model's tokenizer; the GPU machine downloads
    none and the weights are random, so one id per character, no chat template (the
    passes' lengths are what the timing needs)."""

    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [3 + ord(c) % 890 for c in text]}


def compress_costs(model, s: dict) -> dict:
    """kvzip's ``kvpolicy.compress`` at BUDGET of s["compress_tokens"] tokens, whole and
    with chunk_size=s["compress_chunk"], against a plain prefill of the same ids
    (``model(ids, DynamicCache, logits_to_keep=1)``), rounds alternated after a warm-up
    round: per configuration the median seconds and the peak GiB, per kvzip run the median
    of its rounds' ratios to the plain prefill of the same round."""
    ids, tok, chunk = prompt(s, s["compress_tokens"]), StandInTokenizer(), s["compress_chunk"]
    runs = {"plain prefill": lambda: model(ids, **{CACHE_ARG: DynamicCache(config=model.config)},
                                           use_cache=True, logits_to_keep=1),
            "kvzip, whole context": lambda: kvpolicy.compress(model, ids, "kvzip", BUDGET, tokenizer=tok),
            f"kvzip, chunk_size={chunk}": lambda: kvpolicy.compress(model, ids, "kvzip", BUDGET,
                                                                     tokenizer=tok, chunk_size=chunk)}
    try:
        for run in runs.values():
            timed(run)
        times = alternate({name: functools.partial(timed, run) for name, run in runs.items()},
                          s["rounds"])
    finally:
        kvpolicy.detach(model)
    plain = times["plain prefill"]
    out = {"tokens": s["compress_tokens"]}
    for name, r in times.items():
        out[name] = dict(seconds=statistics.median(t for t, _ in r), peak_gib=r[0][1])
        if name != "plain prefill":
            ratio = statistics.median(t / p for (t, _), (p, _) in zip(r, plain))
            out[name].update(ratio=ratio, goal=GOALS["compress"], met=ratio <= GOALS["compress"])
    return out


# ---- report ---------------------------------------------------------------------------
def table(header: list[str], rows: list[list]) -> list[str]:
    return [f"| {' | '.join(header)} |", "|" + "---|" * len(header),
            *(f"| {' | '.join(map(str, row))} |" for row in rows), ""]


def goal(x: dict, sign: str, percent: bool = False) -> str:
    """The goal beside a number: "≥ 0.5 met", "≤ 3% NOT met"."""
    target = f"{100 * x['goal']:.0f}%" if percent else x["goal"]
    return f"{sign} {target} {'met' if x['met'] else 'NOT met'}"


def gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(r: dict) -> str:
    """The tables of ``r`` (the JSON) measured so far, goals beside the numbers."""
    s = r["sizes"]
    title = "# kvpolicy GPU benchmark" + (" (DRY RUN: CPU, tiny sizes; not measurements)" if DRY_RUN else "")
    lines = [title, "", f"{r['device']}; torch {r['torch']}, triton {r['triton']}, transformers "
             f"{r['transformers']}; {r['date']}. Random weights, {r['dtype']}, hidden {s['hidden']}, "
             f"{s['layers']} layers, {s['heads']} / {s['kv_heads']} heads, head dim {s['head_dim']}; "
             f"prompt N = {s['tokens']} tokens; budget {BUDGET}.", ""]
    lines += [f"**{name} failed**: `{x['error']}`\n" for name, x in r.items()
              if isinstance(x, dict) and "error" in x]
    k = r.get("kernels", {})
    if "scores" in k:
        lines += table(["score op vs SDPA", "score ms", "TFLOP/s", "SDPA ms", "TFLOP/s", "rate ratio", "goal"],
                       [[x["queries"], f"{x['score_ms']:.3f}", f"{x['score_tflops']:.1f}",
                         f"{x['sdpa_ms']:.3f}", f"{x['sdpa_tflops']:.1f}", f"{x['ratio']:.2f}", goal(x, "≥")]
                        for x in k["scores"]])
        c = k["compaction"]
        lines += table(["compaction", "MB moved", "ms", "GB/s", "copy GB/s", "ratio", "goal"],
                       [[f"{c['layers']} layers x {c['kept_rows']} rows, K and V",
                         f"{c['bytes_moved'] / 1e6:.1f}", f"{c['compact_ms']:.3f}", f"{c['compact_gbs']:.0f}",
                         f"{c['copy_gbs']:.0f}", f"{c['ratio']:.2f}", goal(c, "≥")]])
    p = r.get("prefill", {})
    if "plain" in p:
        lines += table(["prefill (generate, 1 token)", "seconds", "overhead", "peak GiB", "goal"],
                       [[name, f"{x['seconds']:.3f}", f"{100 * x['overhead']:+.1f}%" if "goal" in x else "",
                         gib(x["peak_gib"]), goal(x, "≤", percent=True) if "goal" in x else ""]
                        for name, x in p.items() if isinstance(x, dict)])
    d = r.get("decode", {})
    if "ratio_eager" in d:
        lines += table(["decode", "ms/token", "peak GiB"],
                       [[name, f"{x['ms']:.2f}", gib(x["peak_gib"])] for name, x in d.items() if "ms" in x])
        lines += table(["snapkv at N, budget 0.1 / full cache at 0.1 N", "value", "goal"],
                       [[name[6:], f"{d[name]['value']:.3f}", goal(d[name], "≤")]
                        for name in ("ratio_eager", "ratio_compiled") if name in d])
    c = r.get("compress", {})
    if "tokens" in c:
        lines += table([f"compress, {c['tokens']} tokens, budget {BUDGET}", "seconds", "x plain prefill",
                        "peak GiB", "goal"],
                       [[name, f"{x['seconds']:.3f}", f"{x['ratio']:.2f}" if "ratio" in x else "1.00",
                         gib(x["peak_gib"]), goal(x, "≤") if "goal" in x else ""]
                        for name, x in c.items() if isinstance(x, dict)])
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu_bench.json and gpu_bench.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, interpreted kernels")
    args = parser.parse_args()
    if not DRY_RUN and not torch.cuda.is_available():
        parser.error("no CUDA device; use --dry-run")
    s = DRY_SIZES if DRY_RUN else SIZES
    os.makedirs(args.out, exist_ok=True)
    r = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (dry run)",
             torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
             date=time.strftime("%Y-%m-%d %H:%M:%S"), dtype=str(DTYPE), budget=BUDGET, sizes=s,
             seconds={})
    failed = False
    model = functools.cache(lambda: build_model(s))
    sections = dict(kernels=lambda: kernels(s), prefill=lambda: prefills(model(), s),
                    compress=lambda: compress_costs(model(), s), decode=lambda: decodes(model(), s))
    for name, run in sections.items():
        start = time.perf_counter()
        try:
            r[name] = run()
        except Exception as exc:  # keep the other sections' numbers
            traceback.print_exc()
            r[name], failed = {"error": f"{type(exc).__name__}: {exc}"}, True
        r["seconds"][name] = time.perf_counter() - start
        with open(os.path.join(args.out, "gpu_bench.json"), "w") as f:
            json.dump(r, f, indent=2)
        with open(os.path.join(args.out, "gpu_bench.md"), "w") as f:
            f.write(markdown(r))
        print(f"{name}: {r['seconds'][name]:.1f} s", flush=True)
    print(markdown(r))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
