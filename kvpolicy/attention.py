"""Attention in one place: which keys a query sees (``visible``, ``causal``: the helpers of
kvpolicy_kernels.visibility, used by every mask), and attention with the model's own
softmax: plain SDPA where it is exact, otherwise logits with Gemma2's tanh softcapping and
GPT-OSS's per-head sink logits in the denominator (multi-token forwards: ``attend``, over
kvpolicy_kernels.attention; one-token decode steps: ``grouped_attention``, with the
probabilities an evicting layer or a deferred compaction observes).

The fast paths' oracle is the float64 dense attention of tests/test_kernel_attention.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvpolicy_kernels import attention
from kvpolicy_kernels.visibility import causal, visible

__all__ = ["attend", "causal", "grouped_attention", "plain_attention", "probabilities",
           "prompt_mask", "visible", "visible_slots"]


def probabilities(logits: Tensor, visible: Tensor, softcap: float | None,
                  sinks: Tensor | None) -> Tensor:
    """softmax over the last dim of fp32 logits [B, G, g, S] where visible (broadcastable
    bool), after ``softcap * tanh(logits / softcap)`` (the cap comes before the mask, as in
    the model); sinks fp32 [G, g] join the denominator only. Fully masked rows give 0.
    Overwrites ``logits`` (every caller's own product)."""
    if softcap:
        logits = logits.div_(softcap).tanh_().mul_(softcap)
    logits = logits.masked_fill_(~visible, -torch.inf)
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
    visible bool [B, 1, q, S] (None: causal, the queries being the last q keys), or [B, G,
    q, S] or [B, H, q, S] where a per-head layer's KV heads hold different slots (the same
    within a KV group: attended one KV head at a time, so that no [B, H, q, S] float mask
    is built). SDPA (transformers' own call) unless softcapping or sinks need the explicit
    softmax. Returns out [B, q, H, Dv]."""
    G = key.shape[1]
    if visible is not None and visible.shape[1] > 1 and G > 1:
        h, per = query.shape[1] // G, visible.shape[1] // G  # per: the mask's heads a group
        return torch.cat([attend(module, query[:, g * h:(g + 1) * h], key[:, g:g + 1],
                                 value[:, g:g + 1], visible[:, g * per:g * per + 1], scaling,
                                 softcap, None if sinks is None else sinks[g * h:(g + 1) * h])
                          for g in range(G)], 2)
    if not softcap and sinks is None:
        return sdpa_attention_forward(module, query, key, value, visible, scaling=scaling)[0]
    out = attention(query, key, value, scaling=scaling, mask=visible, is_causal=visible is None,
                    softcap=softcap or 0.0, sinks=sinks)
    return out.transpose(1, 2)


def visible_slots(pos: Tensor, query_pos: Tensor, window: int | None) -> Tensor:
    """bool [B, G, C]: a decode query at position query_pos int64 [B] sees the slots
    holding a token (pos int64 [B, G, C]) within its sliding window (slots hold only
    earlier tokens and its own)."""
    return visible(pos, query_pos.view(-1, 1, 1), window)


def prompt_mask(key_pos: Tensor, query_pos: Tensor, window: int | None) -> Tensor:
    """bool [B, 1, q, S]: the q new tokens (positions query_pos int64 [B, q], the last q of
    the S keys) see every held key (key_pos int64 [B, S]) at or before them by index and
    within the window."""
    q, S = query_pos.shape[1], key_pos.shape[1]
    order = causal(q, S, key_pos.device)[None]
    return visible(key_pos[:, None, :], query_pos[:, :, None], window, order=order)[:, None]


def plain_attention(module, query: Tensor, key: Tensor, value: Tensor,
                    attention_mask: Tensor | None, scaling: float, sliding_window: int | None,
                    softcap: float | None, sinks: Tensor | None) -> Tensor:
    """A forward without a PolicyCache: causal (+ 2-D padding, window) attention of query
    [B, H, q, D], the last q of key/value [B, G, S, D]'s positions. Returns [B, q, H, Dv]."""
    q, S = query.shape[2], key.shape[2]
    if attention_mask is None or attention_mask.dim() != 2:
        if sliding_window is None and q == S:
            return attend(module, query, key, value, None, scaling, softcap, sinks)  # plain causal
        key_pos = torch.arange(S, device=key.device)[None]
    else:
        key_pos = torch.arange(S, device=key.device).masked_fill(~attention_mask.bool(), -1)
    query_pos = torch.arange(S - q, S, device=key.device)[None].expand(key_pos.shape[0], q)
    visible_ = prompt_mask(key_pos, query_pos, sliding_window)
    return attend(module, query, key, value, visible_, scaling, softcap, sinks)
