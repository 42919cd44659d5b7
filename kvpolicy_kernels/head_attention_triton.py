"""Triton decode attention over flat per-head slots (the CUDA path of ``head_attention``).

Layout (issue #27): a layer whose KV heads keep different tokens stores every kept row of a
batch row in one flat run of T slots, keys [B, T, D] and values [B, T, Dv], with heads
int [B, T] naming the KV head of each slot (< 0: none) and visible bool [B, T] the slots the
decode query may see. Query head h reads the visible slots of KV head h // (H // G).

Grid: one program per (batch row, KV head) and block of BLOCK_H = 16 query heads of its
group, B * G * ceil(g / 16) programs: a program handles the g = H // G query heads of its
group together as the rows of one [16, D] query tile (16: the smallest ``tl.dot`` tile; g
padded to it). Why not one program per query head: the g heads of a group read the same
slots, so a per-query-head grid would load every K/V row g times (g = 3-8 in GQA models) for
a memory-bound op; here each row is loaded once per group (once per 16 heads when g > 16,
MQA), and the padded rows of the dot cost tensor-core cycles that decode has to spare. The
fixed 16 rows bound the registers whatever g is, so the launch configurations are the ones
compiled ahead of time (tests/test_kernel_aot.py). Each slot
belongs to one KV head, so over the G programs of a batch row every kept K/V row is read by
exactly one program: the loads are predicated on ``heads == kv & visible``, a slot of
another head costs only its tag (the heads int and visible bool), and a tile with no slot of
the program's head is skipped whole (one branch on the tile's tags: no K/V load, no dot, no
exp). Per-head segments laid out contiguously (a kept prompt) therefore cost each program
only its own segment plus T tags; interleaved slots (a decode region, one slot per head per
token) cost each program its own rows, predicated, within shared tiles.

Per tile: logits = scaling * q k^T in fp32 (``tl.dot`` in DOT_DTYPE with fp32 accumulation,
``input_precision="ieee"`` for fp32), tanh-capped at +-softcap when HAS_SOFTCAP (tanh built
from exp, see ``score_triton._logits``), then the online softmax: the running row maximum
m, the row sum l relative to m, and the fp32 accumulator of p @ V, rescaled by exp(m_old -
m_new) (``_probs`` and ``_accumulate``, shared with quantized_attention_triton). p enters the value dot rounded to
the value dtype (as flash attention does: fp16/bf16 tensor cores; ``_round``, to nearest even
under the interpreter too, whose fp32 -> bf16 cast truncates) with fp32 accumulation. HAS_SINKS: the sink of head h starts the online
softmax as a key of logit sinks[h] and value 0 (m = sinks[h], l = 1), so it joins every
denominator exactly once and adds nothing to the output. A head that sees no slot (and has no
sink) gets out 0, like the reference. Under TRITON_INTERPRET=1, bf16 tiles are upcast to fp32
before the dots (DOT_DTYPE, triton-lang/triton#11584; the products are the same).

One program streams its head's rows alone: B * G programs fill a GPU only for a large batch
or long per-head segments kept short by compression. Splitting T across programs
(flash-decoding, a combine step) is not done here.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .backend import is_interpreted
from .score_triton import _TL_DTYPES, _logits

BLOCK_H = 16  # query heads per program: the smallest tl.dot tile


def block_t(block_d: int, block_dv: int) -> int:
    """Slots per tile: 32, or 16 when a head size exceeds 128 (16 is the smallest ``tl.dot``
    depth of p @ V). Larger tiles spill registers: ptxas reports spills for 64 slots at head
    size 64 in fp32 and 128 in bf16, and for 32 slots at 256 (see docs/kernels.md)."""
    return 32 if max(block_d, block_dv) <= 128 else 16


@triton.jit
def _round(x, ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """x fp32 rounded to nearest (even) in the rows' dtype ROWS, held in DOT_DTYPE: ROWS
    itself, except bf16 rows under TRITON_INTERPRET=1 (DOT_DTYPE fp32), rounded by hand on
    the bits because the interpreter's fp32 -> bf16 cast truncates."""
    if ROWS == DOT_DTYPE:
        y = x.to(DOT_DTYPE)
    else:
        bits = x.to(tl.uint32, bitcast=True)
        y = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return y


@triton.jit
def _probs(q, k, mine, m_i, l_i, scaling, softcap, HAS_SOFTCAP: tl.constexpr):
    """One tile of the online softmax, its logits: q [BLOCK_H, BLOCK_D] and k [BLOCK_T,
    BLOCK_D] in DOT_DTYPE (finite), mine bool [BLOCK_T] the rows seen -> (p fp32 [BLOCK_H,
    BLOCK_T] relative to the new maximum, alpha fp32 [BLOCK_H] the old terms' rescale, the new
    maximum m_i, the new sum l_i). The caller then adds p @ V (``_accumulate``): loading V
    only after this keeps the registers of large head sizes unspilled."""
    s = _logits(q, k, scaling, softcap, HAS_SOFTCAP)
    s = tl.where(mine[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # padded rows stay finite
    alpha = tl.exp(m_i - shift)
    p = tl.exp(s - shift[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _accumulate(acc, p, alpha, v, ROWS: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """acc fp32 [BLOCK_H, BLOCK_DV] rescaled by alpha plus p @ v (v [BLOCK_T, BLOCK_DV] in
    DOT_DTYPE), p rounded to the rows' dtype ROWS for the dot."""
    return acc * alpha[:, None] + tl.dot(_round(p, ROWS, DOT_DTYPE), v, input_precision="ieee")


@triton.jit
def _head_attention_kernel(
    q_ptr, k_ptr, v_ptr, heads_ptr, visible_ptr, sinks_ptr, out_ptr,
    s_qb, s_qh, s_qd, s_kb, s_kt, s_kd, s_vb, s_vt, s_vd,
    H, G, T, D, DV, scaling, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid, pid_h = tl.program_id(0), tl.program_id(1)
    b, kv = pid // G, pid % G
    group = H // G
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # query heads of the group, padded
    real = rows < group
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + b * s_qb + (kv * group + rows)[:, None] * s_qh + dims[None, :] * s_qd,
                mask=real[:, None] & (dims < D)[None, :], other=0.0).to(DOT_DTYPE)
    if HAS_SINKS:  # the sink as a first key of value 0: m = sink, l = exp(sink - m) = 1
        m_i = tl.load(sinks_ptr + kv * group + rows, mask=real, other=float("-inf"))
        l_i = tl.where(real, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    for start in range(0, T, BLOCK_T):
        slots = start + tl.arange(0, BLOCK_T)
        inside = slots < T
        mine = ((tl.load(heads_ptr + b * T + slots, mask=inside, other=-1) == kv)
                & (tl.load(visible_ptr + b * T + slots, mask=inside, other=0) != 0))
        if tl.max(mine.to(tl.int32), 0) > 0:  # else the tile holds no slot of this head
            k = tl.load(k_ptr + b * s_kb + slots[:, None] * s_kt + dims[None, :] * s_kd,
                        mask=mine[:, None] & (dims < D)[None, :], other=0.0)
            p, alpha, m_i, l_i = _probs(q, k.to(DOT_DTYPE), mine, m_i, l_i, scaling, softcap, HAS_SOFTCAP)
            v = tl.load(v_ptr + b * s_vb + slots[:, None] * s_vt + vdims[None, :] * s_vd,
                        mask=mine[:, None] & (vdims < DV)[None, :], other=0.0)
            acc = _accumulate(acc, p, alpha, v.to(DOT_DTYPE), v_ptr.dtype.element_ty, DOT_DTYPE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (b * H + kv * group + rows)[:, None] * DV + vdims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None] & (vdims < DV)[None, :])


def head_attention_triton(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor,
                          visible: Tensor, kv_heads: int, scaling: float, softcap: float = 0.0,
                          sinks: Tensor | None = None) -> Tensor:
    """Same contract as ``head_attention_ref``: query [B, H, 1, D], keys [B, T, D], values
    [B, T, Dv] (fp32, bf16 or fp16, one dtype, any strides; D, Dv <= 256); heads int [B, T]
    (any integer dtype); visible bool [B, T]; sinks float [H] or None. Returns out [B, 1, H,
    Dv] in the query's dtype, contiguous."""
    B, H, _, D = query.shape
    T, Dv = keys.shape[1], values.shape[2]
    out = torch.empty(B, 1, H, Dv, dtype=query.dtype, device=query.device)
    bf16_interpreted = query.dtype == torch.bfloat16 and is_interpreted(_head_attention_kernel)
    group = H // kv_heads
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    wrap_triton(_head_attention_kernel)[(B * kv_heads, triton.cdiv(group, BLOCK_H))](
        query, keys, values, heads.contiguous(), visible.contiguous(),
        sinks.float().contiguous() if sinks is not None else None, out,
        query.stride(0), query.stride(1), query.stride(3), *keys.stride(), *values.stride(),
        H, kv_heads, T, D, Dv, scaling, softcap,
        HAS_SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        DOT_DTYPE=tl.float32 if bf16_interpreted else _TL_DTYPES[query.dtype],
        BLOCK_H=BLOCK_H, BLOCK_T=block_t(block_d, block_dv), BLOCK_D=block_d, BLOCK_DV=block_dv)
    return out
