"""PyTorch reference for ragged per-layer compaction."""
from __future__ import annotations

import torch
from torch import Tensor


def compact_layers_ref(
    keys: list[Tensor],
    values: list[Tensor],
    keep: list[Tensor],
    dst_keys: list[Tensor],
    dst_values: list[Tensor],
) -> None:
    """Gather each layer's kept rows into the front of its destination buffers, in place.

    Per layer l: keys[l] [B, G_l, N_l, D_l], values[l] [B, G_l, N_l, Dv_l]; keep[l] int64
    [B, G_l, n_l] (indices into N_l); dst_keys[l], dst_values[l] [B, G_l, C_l, D_l / Dv_l]
    with C_l >= n_l. Writes dst[:, :, :n_l] and
    leaves dst[:, :, n_l:] untouched.
    """
    for k, v, idx, dk, dv in zip(keys, values, keep, dst_keys, dst_values):
        n = idx.shape[-1]
        dk[:, :, :n].copy_(torch.gather(k, 2, idx[..., None].expand(*idx.shape, k.shape[-1])))
        dv[:, :, :n].copy_(torch.gather(v, 2, idx[..., None].expand(*idx.shape, v.shape[-1])))
