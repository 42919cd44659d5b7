"""The ``kvpolicy`` attention and mask functions registered with transformers.

Prefill: SDPA over the full prompt (causal + padding) and the policy's score op on the
same query/key; after the last layer the cache compacts. Decode: attention over each
layer's slots, masked by the layer's slot validity; fixed-size (evicting) layers compute
the softmax themselves and add the probabilities to their running scores in the same pass.
Without a PolicyCache (a plain forward) it is exact SDPA with the mask it is given.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from .cache import PolicyCache, PolicyLayer

NAME = "kvpolicy"
CACHE_KWARG = "kvpolicy_cache"


def register() -> None:
    """Register the attention and mask functions under ``kvpolicy`` (idempotent)."""
    AttentionInterface.register(NAME, kvpolicy_attention)
    AttentionMaskInterface.register(NAME, kvpolicy_mask)


def kvpolicy_mask(batch_size: int, q_length: int, kv_length: int, *args,
                  attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The raw 2-D padding mask bool [B, N] for multi-token steps, None for decode steps
    (each layer masks its own slots; None keeps compiled decode inputs static)."""
    return attention_mask if q_length > 1 else None


def kvpolicy_attention(module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """query [B, H, q, D], key/value as the cache returned them -> (out [B, q, H, D], None)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    cache: PolicyCache | None = kwargs.get(CACHE_KWARG)
    if cache is None:
        return sdpa_attention_forward(module, query, key, value, padded_causal(attention_mask, query, key),
                                      dropout=dropout, scaling=scaling)
    layer = cache.layers[module.layer_idx]
    if layer.compacted:
        return decode_attention(module, layer, query, scaling), None
    out, _ = sdpa_attention_forward(module, query, key, value, cache.prefill.mask, dropout=dropout,
                                    scaling=scaling)
    cache.observe(module.layer_idx, query, key, scaling)
    return out, None


def padded_causal(attention_mask: Tensor | None, query: Tensor, key: Tensor) -> Tensor | None:
    """bool [B, 1, q, k] causal & padding from a 2-D mask [B, k] (None stays None: SDPA is
    then causal for q > 1)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return attention_mask
    q, k = query.shape[2], key.shape[2]
    q_pos = torch.arange(k - q, k, device=key.device)
    causal = torch.arange(k, device=key.device)[None, :] <= q_pos[:, None]
    return causal[None, None] & attention_mask.bool()[:, None, None, :]


def decode_attention(module, layer: PolicyLayer, query: Tensor, scaling: float) -> Tensor:
    """One token's attention over a compacted layer: query [B, H, 1, D] -> [B, 1, H, D]."""
    B, H, q, D = query.shape
    G = layer.keys.shape[1]
    if not layer.evicts:
        mask = layer.slot_valid.repeat_interleave(H // G, dim=1)[:, :, None, :]
        out, _ = sdpa_attention_forward(module, query, layer.keys, layer.values, mask, scaling=scaling)
        return out
    qg = query.float().view(B, G, H // G * q, D)
    logits = torch.matmul(qg, layer.keys.float().transpose(-1, -2)) * scaling  # [B, G, g, S]
    logits = logits.masked_fill(~layer.slot_valid[:, :, None, :], -torch.inf)
    probs = torch.softmax(logits, dim=-1)
    layer.scores.add_(probs.sum(2))
    out = torch.matmul(probs, layer.values.float()).to(query.dtype)  # [B, G, g, D]
    return out.view(B, H, q, D).transpose(1, 2)
