"""Triton decode attention over quantized prompt rows (the CUDA path of
``quantized_attention``), the dequantization fused with the attention's reads.

Layout (kvpolicy.quantized, restated in quantized_attention_ref): a layer keeps its first N
prompt rows as uint8 codes packed along the token axis, key_codes [B, G, M, D] and
value_codes [B, G, M, Dv], M = N * bits / 8: packed row m holds token j * M + m (block j) in
bits [j*bits, (j+1)*bits), j < 8 / bits. Key scales and zeros [B, G, ceil(N / Tk), D] (Tk =
TOKEN_GROUP tokens a group, per channel, the last group holding the rest), value scales and zeros [B, G, N, Dv / c] (per token, c channels a group).
After them come n rows in the model's dtype, keys [B, G, n, D] and values [B, G, n, Dv], and
visible bool [B, G, N + n] says which of the N + n slots the query sees.

Grid: one program per (batch row, KV head) and block of BLOCK_H = 16 query heads of its
group, B * G * ceil(g / 16) programs, as head_attention_triton (the g heads of a group share
one [16, D] query tile, so every row is read once per group). A program streams the packed
rows in tiles of BLOCK_T packed rows (``launch``): each packed tile of keys and values is loaded once (its
bytes hold 8 / bits tokens each) and serves the 8 / bits blocks in turn; for block j the
tile's tokens are j * M + m, codes = (byte >> j * bits) & (2**bits - 1), a row is code *
scale + zero in fp32, rounded once to the rows' dtype before the dots. A token's key scale
sits at its group (t // Tk, channel), its value scale at (t, channel // c); value scales
and zeros are loaded only for visible tokens (0 elsewhere, so hidden rows add exactly 0),
and a block tile with no visible token is skipped (no scale load, no dot, no exp). Then the
n full-precision rows stream as in head_attention_triton, loads predicated on ``visible``.
So a row of codes crosses memory once and is never written back dequantized: the reads are
bits / 16 of a bf16 cache's plus the scales.

Per tile the online softmax of head_attention_triton (its ``_probs`` and ``_accumulate``): logits in fp32 from
``tl.dot`` in DOT_DTYPE with fp32 accumulation, softcap (tanh from exp), the running maximum
and sum, p rounded to the rows' dtype for p @ V; sinks start the softmax as a key of value 0;
a head that sees nothing gets 0. Under TRITON_INTERPRET=1 bf16 tiles are upcast to fp32 for
the dots (DOT_DTYPE, triton-lang/triton#11584), and the dequantized rows and p are rounded
to bf16 by hand (head_attention_triton's ``_round``): the interpreter casts fp32 to bf16 by truncation (triton 3.7.1,
``cast_impl``) where the GPU rounds to nearest even, and truncated keys shift every logit
the same way. Not done: splitting the rows across programs (flash-decoding).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .backend import is_interpreted
from .head_attention_triton import BLOCK_H, _accumulate, _probs, _round
from .quantized_attention_ref import TOKEN_GROUP
from .score_triton import _TL_DTYPES


def launch(block_d: int, block_dv: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): 32 packed rows a tile at head size 64 or less, else 16; 8 warps
    above 128, else 4. Each thread holds a tile's packed K and V bytes (widened to int32)
    across its 8 / bits blocks, so larger tiles or fewer warps spill registers: ptxas reports
    spills for 32 rows at 128 (sm_80) and for 4 warps at 256 (sm_90; see docs/kernels.md)."""
    size = max(block_d, block_dv)
    return 32 if size <= 64 else 16, 4 if size <= 128 else 8


@triton.jit
def _quantized_attention_kernel(
    q_ptr, kcode_ptr, kscale_ptr, kzero_ptr, vcode_ptr, vscale_ptr, vzero_ptr, k_ptr, v_ptr,
    visible_ptr, sinks_ptr, out_ptr,
    s_qb, s_qh, s_qd, s_kb, s_kg, s_kt, s_kd, s_vb, s_vg, s_vt, s_vd,
    H, G, M, n, D, DV, BITS, TOKEN_GROUP, KEY_GROUPS, CHANNEL_GROUP, scaling, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid, pid_h = tl.program_id(0), tl.program_id(1)
    b, kv = pid // G, pid % G
    group = H // G
    rows = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)  # query heads of the group, padded
    real = rows < group
    dims, vdims = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    in_d, in_dv = dims < D, vdims < DV
    q = tl.load(q_ptr + b * s_qb + (kv * group + rows)[:, None] * s_qh + dims[None, :] * s_qd,
                mask=real[:, None] & in_d[None, :], other=0.0).to(DOT_DTYPE)
    if HAS_SINKS:  # the sink as a first key of value 0: m = sink, l = exp(sink - m) = 1
        m_i = tl.load(sinks_ptr + kv * group + rows, mask=real, other=float("-inf"))
        l_i = tl.where(real, 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    ROWS: tl.constexpr = kscale_ptr.dtype.element_ty  # the rows' dtype
    bg = b * G + kv  # the program's index in the quantized tensors and visible
    N = M * (8 // BITS)
    seen = visible_ptr + bg * (N + n)
    low = (1 << BITS) - 1
    for start in range(0, M, BLOCK_T):  # the quantized rows: one packed tile, 8 / BITS blocks
        packed = start + tl.arange(0, BLOCK_T)
        inside = packed < M
        k_bytes = tl.load(kcode_ptr + (bg * M + packed)[:, None] * D + dims[None, :],
                          mask=inside[:, None] & in_d[None, :], other=0).to(tl.int32)
        v_bytes = tl.load(vcode_ptr + (bg * M + packed)[:, None] * DV + vdims[None, :],
                          mask=inside[:, None] & in_dv[None, :], other=0).to(tl.int32)
        for j in range(0, 8 // BITS):
            t = j * M + packed  # the tokens of block j
            mine = inside & (tl.load(seen + t, mask=inside, other=0) != 0)
            if tl.max(mine.to(tl.int32), 0) > 0:  # else no token of the tile is seen
                k_at = (bg * KEY_GROUPS + t // TOKEN_GROUP)[:, None] * D + dims[None, :]
                k_ok = mine[:, None] & in_d[None, :]
                k_codes = ((k_bytes >> (j * BITS)) & low).to(tl.float32)
                k = (k_codes * tl.load(kscale_ptr + k_at, mask=k_ok, other=0.0).to(tl.float32)
                     + tl.load(kzero_ptr + k_at, mask=k_ok, other=0.0).to(tl.float32))
                v_at = (bg * N + t)[:, None] * (DV // CHANNEL_GROUP) + (vdims // CHANNEL_GROUP)[None, :]
                v_ok = mine[:, None] & in_dv[None, :]
                v_codes = ((v_bytes >> (j * BITS)) & low).to(tl.float32)
                v = (v_codes * tl.load(vscale_ptr + v_at, mask=v_ok, other=0.0).to(tl.float32)
                     + tl.load(vzero_ptr + v_at, mask=v_ok, other=0.0).to(tl.float32))
                p, alpha, m_i, l_i = _probs(q, _round(k, ROWS, DOT_DTYPE), mine, m_i, l_i, scaling,
                                            softcap, HAS_SOFTCAP)
                acc = _accumulate(acc, p, alpha, _round(v, ROWS, DOT_DTYPE), ROWS, DOT_DTYPE)
    for start in range(0, n, BLOCK_T):  # the full-precision rows after them
        slots = start + tl.arange(0, BLOCK_T)
        inside = slots < n
        mine = inside & (tl.load(seen + N + slots, mask=inside, other=0) != 0)
        if tl.max(mine.to(tl.int32), 0) > 0:
            k = tl.load(k_ptr + b * s_kb + kv * s_kg + slots[:, None] * s_kt + dims[None, :] * s_kd,
                        mask=mine[:, None] & in_d[None, :], other=0.0)
            v = tl.load(v_ptr + b * s_vb + kv * s_vg + slots[:, None] * s_vt + vdims[None, :] * s_vd,
                        mask=mine[:, None] & in_dv[None, :], other=0.0)
            p, alpha, m_i, l_i = _probs(q, k.to(DOT_DTYPE), mine, m_i, l_i, scaling, softcap, HAS_SOFTCAP)
            acc = _accumulate(acc, p, alpha, v.to(DOT_DTYPE), ROWS, DOT_DTYPE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (b * H + kv * group + rows)[:, None] * DV + vdims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=real[:, None] & in_dv[None, :])


def quantized_attention_triton(query: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor,
                               value_codes: Tensor, value_scale: Tensor, value_zero: Tensor,
                               keys: Tensor, values: Tensor, visible: Tensor, bits: int,
                               scaling: float, softcap: float = 0.0,
                               sinks: Tensor | None = None) -> Tensor:
    """Same contract as ``quantized_attention_ref``: query [B, H, 1, D]; codes uint8, scales
    and zeros, keys and values in one float dtype (fp32, bf16 or fp16; the quantized tensors
    and visible made contiguous, the others any strides; D, Dv <= 256); sinks float [H] or
    None. Returns out [B, 1, H, Dv] in the query's dtype, contiguous."""
    B, H, _, D = query.shape
    G, n, Dv = keys.shape[1], keys.shape[2], values.shape[3]
    M = key_codes.shape[2]
    N = M * 8 // bits
    out = torch.empty(B, 1, H, Dv, dtype=query.dtype, device=query.device)
    bf16_interpreted = query.dtype == torch.bfloat16 and is_interpreted(_quantized_attention_kernel)
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(Dv))
    block_t, warps = launch(block_d, block_dv)
    wrap_triton(_quantized_attention_kernel)[(B * G, triton.cdiv(H // G, BLOCK_H))](
        query, key_codes.contiguous(), key_scale.contiguous(), key_zero.contiguous(),
        value_codes.contiguous(), value_scale.contiguous(), value_zero.contiguous(), keys, values,
        visible.contiguous(), sinks.float().contiguous() if sinks is not None else None, out,
        query.stride(0), query.stride(1), query.stride(3), *keys.stride(), *values.stride(),
        H, G, M, n, D, Dv, bits, TOKEN_GROUP, key_scale.shape[2], Dv // value_scale.shape[3], scaling, softcap,
        HAS_SOFTCAP=softcap > 0, HAS_SINKS=sinks is not None,
        DOT_DTYPE=tl.float32 if bf16_interpreted else _TL_DTYPES[query.dtype],
        BLOCK_H=BLOCK_H, BLOCK_T=block_t, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=warps)
    return out
