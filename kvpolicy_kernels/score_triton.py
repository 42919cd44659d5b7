"""Triton score accumulation: flash-style, two passes, never a [Q, N] matrix in memory.

Logits are the model's: scaling * q.k, then softcap * tanh(. / softcap) when HAS_SOFTCAP
(tanh built from exp: libdevice's tanh does not run in the interpreter). Pass 1 (grid B*H x
query blocks): online softmax over key tiles gives each query row its maximum logit and
log-sum-exp (fp32 [B, H, Q]); with HAS_SINKS, exp(sink[h]) joins the sum. The key mask is
[B, N], or [B, G, N] when the KV heads hold different keys (per-head plans): read with a head
stride (0 for [B, N]), query head h sees the keys of KV head h // (H // G). Rows not counted
or with no visible key in their head get lse = +inf (sink alone: lse = sink), and add 0 later. A caller
that already has the lse (``lse`` argument) skips pass 1, or runs it for the row maximum
only when tau > 0 (NEED_LSE = False). Pass 2 (grid B*G x key blocks): each program owns one
key tile, loops over the g query heads of its KV head and the query tiles that can see the
tile, recomputes the logits and adds the column sums of exp(logit - lse): every output
element has a single writer, so no atomics. The same pass counts probabilities below tau x row maximum
into one partial per program, summed afterwards. Memory O(B * H * Q + B * G * N).

Tiles enter ``tl.dot`` in DOT_DTYPE with fp32 accumulation: the input dtype, except bf16
under TRITON_INTERPRET=1, whose interpreter computes bf16 dots on raw bit patterns
(triton-lang/triton#11584), so there tiles are upcast to fp32 first (same products: bf16 x
bf16 is exact in fp32). Everything else is the same code on CUDA and in the interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .backend import is_interpreted

BLOCK_Q = 64
BLOCK_N = 64
FP32_COLUMN_SUMS_WARPS = 8  # 4 warps spill fp32 tiles (ptxas: 264 bytes on sm_80), 8 do not
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _visible(rows, cols, b, kv, Q, N, key_mask_ptr, s_mb, s_mg, query_mask_ptr,
             HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr):
    """bool [BLOCK_Q, BLOCK_N]: key col is causal, real for KV head kv (key mask element
    b * s_mb + kv * s_mg + col: s_mg = 0 for a [B, N] mask) and seen by a counted query row."""
    in_range = (rows < Q)[:, None] & (cols < N)[None, :]
    ok = in_range & (cols[None, :] <= (N - Q + rows)[:, None])
    if HAS_KEY_MASK:
        ok &= (tl.load(key_mask_ptr + b * s_mb + kv * s_mg + cols, mask=cols < N, other=0) != 0)[None, :]
    if HAS_QUERY_MASK:
        ok &= (tl.load(query_mask_ptr + b * Q + rows, mask=rows < Q, other=0) != 0)[:, None]
    return ok


@triton.jit
def _logits(q, k, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """fp32 [BLOCK_Q, BLOCK_N]: scaling * q k^T, tanh-capped at +-softcap if HAS_SOFTCAP."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling
    if HAS_SOFTCAP:
        t = tl.exp(-2.0 * tl.abs(s) / softcap)  # tanh|x| = (1 - t) / (1 + t), no overflow
        capped = softcap * (1.0 - t) / (1.0 + t)
        s = tl.where(s < 0, -capped, capped)
    return s


@triton.jit
def _row_stats_kernel(
    q_ptr, k_ptr, key_mask_ptr, query_mask_ptr, sinks_ptr, lse_ptr, max_ptr,
    s_qb, s_qh, s_qq, s_qd, s_kb, s_kg, s_kn, s_kd, s_mb, s_mg,
    H, G, Q, N, D, scaling, softcap,
    HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SINKS: tl.constexpr, NEED_LSE: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, pid_q = tl.program_id(0), tl.program_id(1)
    b, h = pid_bh // H, pid_bh % H
    kv = h // (H // G)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qq + dims[None, :] * s_qd,
                mask=(rows < Q)[:, None] & (dims < D)[None, :], other=0.0).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    causal_end = tl.minimum(N, N - Q + (pid_q + 1) * BLOCK_Q)
    for start in range(0, causal_end, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * s_kb + kv * s_kg + cols[:, None] * s_kn + dims[None, :] * s_kd,
                    mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0).to(DOT_DTYPE)
        s = _logits(q, k, scaling, softcap, HAS_SOFTCAP)
        vis = _visible(rows, cols, b, kv, Q, N, key_mask_ptr, s_mb, s_mg, query_mask_ptr,
                       HAS_KEY_MASK, HAS_QUERY_MASK)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if NEED_LSE:
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-masked rows stay finite
            l_i = l_i * tl.exp(m_i - shift) + tl.sum(tl.exp(s - shift[:, None]), 1)
        m_i = m_new
    if NEED_LSE:
        if HAS_SINKS:  # l_i is relative to m_i (0 when no key is visible)
            sink = tl.load(sinks_ptr + h)
            top = tl.maximum(m_i, sink)
            lse = top + tl.log(l_i * tl.exp(m_i - top) + tl.exp(sink - top))
        else:
            lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("inf"))
        tl.store(lse_ptr + pid_bh * Q + rows, lse, mask=rows < Q)
    tl.store(max_ptr + pid_bh * Q + rows, m_i, mask=rows < Q)


@triton.jit
def _column_sums_kernel(
    q_ptr, k_ptr, key_mask_ptr, query_mask_ptr, lse_ptr, max_ptr, scores_ptr, below_ptr,
    s_qb, s_qh, s_qq, s_qd, s_kb, s_kg, s_kn, s_kd, s_mb, s_mg,
    H, G, Q, N, D, scaling, softcap, tau,
    HAS_KEY_MASK: tl.constexpr, HAS_QUERY_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_DTYPE: tl.constexpr, COUNT_BELOW: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bg, pid_n = tl.program_id(0), tl.program_id(1)
    b, kv = pid_bg // G, pid_bg % G
    group = H // G
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + b * s_kb + kv * s_kg + cols[:, None] * s_kn + dims[None, :] * s_kd,
                mask=(cols < N)[:, None] & (dims < D)[None, :], other=0.0).to(DOT_DTYPE)
    acc = tl.zeros([BLOCK_N], tl.float32)
    below = tl.zeros([BLOCK_N], tl.int32)
    first_row = tl.maximum(pid_n * BLOCK_N - (N - Q), 0)  # earlier rows cannot see this tile
    for j in range(group):
        h = kv * group + j
        for q_start in range((first_row // BLOCK_Q) * BLOCK_Q, Q, BLOCK_Q):
            rows = q_start + tl.arange(0, BLOCK_Q)
            q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qq + dims[None, :] * s_qd,
                        mask=(rows < Q)[:, None] & (dims < D)[None, :], other=0.0).to(DOT_DTYPE)
            lse = tl.load(lse_ptr + (b * H + h) * Q + rows, mask=rows < Q, other=float("inf"))
            s = _logits(q, k, scaling, softcap, HAS_SOFTCAP)
            vis = _visible(rows, cols, b, kv, Q, N, key_mask_ptr, s_mb, s_mg, query_mask_ptr,
                           HAS_KEY_MASK, HAS_QUERY_MASK)
            p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
            acc += tl.sum(p, 0)
            if COUNT_BELOW:
                m = tl.load(max_ptr + (b * H + h) * Q + rows, mask=rows < Q, other=float("-inf"))
                row_max = tl.exp(m - lse)
                below += tl.sum((vis & (p < tau * row_max[:, None])).to(tl.int32), 0)
    tl.store(scores_ptr + pid_bg * N + cols, acc, mask=cols < N)
    if COUNT_BELOW:
        tl.store(below_ptr + pid_bg * tl.num_programs(1) + pid_n, tl.sum(below, 0).to(tl.float32))


def accumulate_scores_triton(
    query: Tensor, key: Tensor, scaling: float, tau: float,
    key_mask: Tensor | None, query_mask: Tensor | None,
    softcap: float = 0.0, sinks: Tensor | None = None, lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as ``accumulate_scores_ref`` (key_mask bool [B, N] or per KV head
    [B, G, N], query_mask bool [B, Q]; query and key
    fp32, bf16 or fp16, last dimension of any stride; sinks float [H]; lse fp32 [B, H, Q]).
    Returns (scores, below), fp32."""
    B, H, Q, D = query.shape
    G, N = key.shape[1], key.shape[2]
    dev = key.device
    given = lse is not None
    lse = lse.float().contiguous() if given else torch.empty(B, H, Q, dtype=torch.float32, device=dev)
    row_max = torch.empty(B, H, Q, dtype=torch.float32, device=dev)
    scores = torch.empty(B, G, N, dtype=torch.float32, device=dev)
    n_blocks = triton.cdiv(N, BLOCK_N)
    below = torch.zeros(B * G, n_blocks, dtype=torch.float32, device=dev)
    key_mask_arg = key_mask.contiguous() if key_mask is not None else None
    query_mask_arg = query_mask.contiguous() if query_mask is not None else None
    sinks_arg = sinks.float().contiguous() if sinks is not None else None
    bf16_interpreted = query.dtype == torch.bfloat16 and is_interpreted(_row_stats_kernel)
    dot_dtype = tl.float32 if bf16_interpreted else _TL_DTYPES[query.dtype]
    common = dict(HAS_KEY_MASK=key_mask is not None, HAS_QUERY_MASK=query_mask is not None,
                  HAS_SOFTCAP=softcap > 0, DOT_DTYPE=dot_dtype, BLOCK_Q=BLOCK_Q,
                  BLOCK_N=BLOCK_N, BLOCK_D=max(16, triton.next_power_of_2(D)))
    mask_strides = (0, 0) if key_mask is None else (
        (key_mask_arg.stride(0), 0) if key_mask.dim() == 2 else key_mask_arg.stride()[:2])
    strides = (*query.stride(), *key.stride(), *mask_strides)
    if not given or tau > 0:
        wrap_triton(_row_stats_kernel)[(B * H, triton.cdiv(Q, BLOCK_Q))](
            query, key, key_mask_arg, query_mask_arg, sinks_arg, lse, row_max, *strides,
            H, G, Q, N, D, scaling, softcap, HAS_SINKS=sinks is not None, NEED_LSE=not given,
            **common)
    wrap_triton(_column_sums_kernel)[(B * G, n_blocks)](
        query, key, key_mask_arg, query_mask_arg, lse, row_max, scores, below, *strides,
        H, G, Q, N, D, scaling, softcap, tau, COUNT_BELOW=tau > 0, **common,
        num_warps=FP32_COLUMN_SUMS_WARPS if query.dtype == torch.float32 else 4)
    return scores, below.sum(1).reshape(B, G)
