"""PyTorch reference for decode attention over per-head slots (the CPU path and the
kernel's oracle): a layer whose KV heads keep different tokens stores them in one flat row
of slots, each tagged with its KV head, and a query head attends only its own head's."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_ref import attention


def head_attention_ref(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor,
                       visible: Tensor, *, kv_heads: int, scaling: float, softcap: float = 0.0,
                       sinks: Tensor | None = None) -> Tensor:
    """One query token per row over flat per-head slots.

    query [B, H, 1, D]; keys [B, T, D]; values [B, T, Dv] (any float dtype, the same);
    heads int [B, T]: the KV head each slot belongs to (< 0: none); visible bool [B, T]:
    slots the query may see by position. Query head h reads the slots of KV head
    h // (H // kv_heads) (the model's grouped-query layout). The model's
    softmax: softcap > 0 caps the logits with tanh, sinks float [H] join each head's
    denominator. Returns out [B, 1, H, Dv] in the query's dtype.
    """
    B, H, _, _ = query.shape
    group = torch.arange(H, device=query.device) // (H // kv_heads)
    mask = visible[:, None, :] & (heads[:, None, :] == group[None, :, None])  # [B, H, T]
    if not softcap and sinks is None:
        out = F.scaled_dot_product_attention(query.transpose(1, 2), keys[:, None], values[:, None],
                                             attn_mask=mask[:, None], scale=scaling)
        return out  # [B, 1, H, Dv]
    out = attention(query, keys[:, None], values[:, None], scaling=scaling,
                    mask=mask[:, :, None, :], softcap=softcap, sinks=sinks)
    return out.transpose(1, 2)
