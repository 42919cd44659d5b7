"""Triton ragged per-layer compaction: one launch gathers the kept K and V rows of all layers
of one shape (models whose layers differ in KV heads or head size get one launch per shape).

Layers are described by a packed int64 table [L, 13], one row per layer (the kernel reads
raw addresses from it, so it works for any number of separately allocated buffers):

    0 src_k    data_ptr of keys[l]        [B, G, N_l, D], last dim contiguous
    1 src_v    data_ptr of values[l]      [B, G, N_l, Dv], last dim contiguous
    2 dst_k    data_ptr of dst_keys[l]    [B, G, C_l, D], contiguous
    3 dst_v    data_ptr of dst_values[l]  [B, G, C_l, Dv], contiguous
    4 keep     data_ptr of keep[l]        int64 [B, G, n_l], contiguous, indices into N_l
    5 n_l      kept rows                  6 C_l  destination capacity (rows), C_l >= n_l
    7-9        keys[l] strides (batch, head, row), in elements
    10-12      values[l] strides (batch, head, row), in elements

The layers of one launch share B, G, D, Dv and the dtype. Grid (L, B * G, cdiv(max n_l, BLOCK_R)); a program
copies BLOCK_R kept rows of one (layer, sequence, head), masking rows >= n_l, so
dst[:, :, n_l:] is never touched. The table holds addresses of live tensors: build it right
before the launch from the tensors of that call (``layer_table``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_R = 32
_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _compact_kernel(table_ptr, G, D, DV, DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    layer, bg, pid_r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    row = table_ptr + layer * 13
    src_k = tl.load(row + 0).to(tl.pointer_type(DTYPE))
    src_v = tl.load(row + 1).to(tl.pointer_type(DTYPE))
    dst_k = tl.load(row + 2).to(tl.pointer_type(DTYPE))
    dst_v = tl.load(row + 3).to(tl.pointer_type(DTYPE))
    keep = tl.load(row + 4).to(tl.pointer_type(tl.int64))
    n, capacity = tl.load(row + 5), tl.load(row + 6)
    b, g = bg // G, bg % G
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < n
    src_rows = tl.load(keep + bg * n + rows, mask=live, other=0)
    dims = tl.arange(0, BLOCK_D)
    mask = live[:, None] & (dims < D)[None, :]
    k_src = b * tl.load(row + 7) + g * tl.load(row + 8) + src_rows * tl.load(row + 9)
    dst = (bg * capacity + rows)[:, None] * D + dims[None, :]
    tl.store(dst_k + dst, tl.load(src_k + k_src[:, None] + dims[None, :], mask=mask), mask=mask)
    vdims = tl.arange(0, BLOCK_DV)
    vmask = live[:, None] & (vdims < DV)[None, :]
    v_src = b * tl.load(row + 10) + g * tl.load(row + 11) + src_rows * tl.load(row + 12)
    vdst = (bg * capacity + rows)[:, None] * DV + vdims[None, :]
    tl.store(dst_v + vdst, tl.load(src_v + v_src[:, None] + vdims[None, :], mask=vmask), mask=vmask)


def layer_table(keys, values, keep, dst_keys, dst_values) -> Tensor:
    """The packed int64 [L, 13] table (layout above), on the tensors' device."""
    rows = [
        [k.data_ptr(), v.data_ptr(), dk.data_ptr(), dv.data_ptr(), idx.data_ptr(),
         idx.shape[-1], dk.shape[2], *k.stride()[:3], *v.stride()[:3]]
        for k, v, idx, dk, dv in zip(keys, values, keep, dst_keys, dst_values)
    ]
    return torch.tensor(rows, dtype=torch.int64).to(keys[0].device)


def compact_layers_triton(keys: list[Tensor], values: list[Tensor], keep: list[Tensor],
                          dst_keys: list[Tensor], dst_values: list[Tensor]) -> None:
    """Same contract as ``compact_layers_ref``: one kernel launch per group of layers that
    share B, G, D, Dv and the dtype (one launch for most models)."""
    groups: dict[tuple, list[int]] = {}
    for l, (k, v, dk, dv) in enumerate(zip(keys, values, dst_keys, dst_values)):
        if len({k.dtype, v.dtype, dk.dtype, dv.dtype}) != 1:
            raise ValueError("compact_layers: a layer's sources and destinations need one dtype")
        if k.stride(-1) != 1 or v.stride(-1) != 1 or not (dk.is_contiguous() and dv.is_contiguous()):
            raise ValueError("compact_layers: sources need a contiguous last dim, destinations contiguous")
        groups.setdefault((*k.shape[:2], k.shape[-1], v.shape[-1], k.dtype), []).append(l)
    keep = [idx.contiguous() for idx in keep]  # stays alive until the launches are queued
    for (B, G, D, Dv, dtype), layers in groups.items():
        pick = lambda xs: [xs[l] for l in layers]  # noqa: E731
        max_kept = max(keep[l].shape[-1] for l in layers)
        if max_kept == 0:
            continue
        table = layer_table(pick(keys), pick(values), pick(keep), pick(dst_keys), pick(dst_values))
        grid = (len(layers), B * G, triton.cdiv(max_kept, BLOCK_R))
        _compact_kernel[grid](table, G, D, Dv, DTYPE=_TL_DTYPES[dtype], BLOCK_R=BLOCK_R,
                              BLOCK_D=triton.next_power_of_2(D), BLOCK_DV=triton.next_power_of_2(Dv))
