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

    Per layer l: keys[l], values[l] [B, G, N, D]; keep[l] int64 [B, G, n_l] (indices into N);
    dst_keys[l], dst_values[l] [B, G, C_l, D] with C_l >= n_l. Writes dst[:, :, :n_l] and
    leaves dst[:, :, n_l:] untouched.
    """
    for k, v, idx, dk, dv in zip(keys, values, keep, dst_keys, dst_values):
        n = idx.shape[-1]
        index = idx[..., None].expand(*idx.shape, k.shape[-1])
        dk[:, :, :n].copy_(torch.gather(k, 2, index))
        dv[:, :, :n].copy_(torch.gather(v, 2, index))
