"""Attention with the model's own softmax: plain SDPA where it is exact, otherwise logits
with Gemma2's tanh softcapping and GPT-OSS's per-head sink logits in the denominator
(multi-token steps: kvpolicy_kernels.attention; one-token decode steps: here, grouped, with
the probabilities an evicting layer accumulates)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpolicy_kernels import attention


def probabilities(logits: Tensor, visible: Tensor, softcap: float | None,
                  sinks: Tensor | None) -> Tensor:
    """softmax over the last dim of fp32 logits [B, G, g, S] where visible (broadcastable
    bool), after ``softcap * tanh(logits / softcap)`` (the cap comes before the mask, as in
    the model); sinks fp32 [G, g] join the denominator only. Fully masked rows give 0."""
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    logits = logits.masked_fill(~visible, -torch.inf)
    if sinks is not None:
        sink = sinks.float()[None, :, :, None].expand(*logits.shape[:-1], 1)
        return torch.softmax(torch.cat([logits, sink], -1), dim=-1)[..., :-1]
    return torch.softmax(logits, dim=-1).nan_to_num_(0.0)


def grouped_attention(query: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scaling: float,
                      softcap: float | None = None, sinks: Tensor | None = None,
                      need_probs: bool = False) -> tuple[Tensor, Tensor | None]:
    """One query token per row over a layer's slots, each KV head with its query group.

    query [B, H, 1, D]; keys [B, G, S, D]; values [B, G, S, Dv]; visible bool [B, G, S].
    Returns (out [B, 1, H, Dv], probs fp32 [B, G, S] summed over the group, or None).
    The plain case is SDPA with the group's heads as its query rows (no K/V expansion).
    """
    B, H, _, D = query.shape
    G = keys.shape[1]
    qg = query.reshape(B, G, H // G, D)
    if not need_probs and not softcap and sinks is None:
        out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=visible[:, :, None, :],
                                             scale=scaling)
        return out.reshape(B, 1, H, -1), None
    logits = torch.matmul(qg.float(), keys.float().transpose(-1, -2)) * scaling  # [B, G, g, S]
    sink = None if sinks is None else sinks.view(G, H // G)
    probs = probabilities(logits, visible[:, :, None, :], softcap, sink)
    out = torch.matmul(probs, values.float()).to(query.dtype)
    return out.reshape(B, 1, H, -1), probs.sum(2) if need_probs else None


def attend(module, query: Tensor, key: Tensor, value: Tensor, visible: Tensor | None,
           scaling: float, softcap: float | None, sinks: Tensor | None) -> Tensor:
    """Multi-token attention: query [B, H, q, D] over key/value [B, G, S, D] with
    visible bool [B, 1, q, S] (None: causal, the queries being the last q keys).
    SDPA (transformers' own call) unless softcapping or sinks need the explicit softmax.
    Returns out [B, q, H, Dv]."""
    if not softcap and sinks is None:
        return sdpa_attention_forward(module, query, key, value, visible, scaling=scaling)[0]
    out = attention(query, key, value, scaling=scaling, mask=visible, is_causal=visible is None,
                    softcap=softcap or 0.0, sinks=sinks)
    return out.transpose(1, 2)
