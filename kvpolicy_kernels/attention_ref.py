"""Attention with the model's own softmax (Gemma2 softcapping, GPT-OSS sinks), and its
log-sum-exp for the score ops (``accumulate_scores(..., lse=...)``).

``attention`` is a chunked PyTorch reference, the eager_attention_forward of those models
without its [Q, S] matrix. ``attention_with_lse`` takes the LSE from the attention PyTorch
runs anyway where it exposes one: on CPU, ``aten._scaled_dot_product_flash_attention_for_cpu``
(GQA native, additive mask of the query dtype only, fully masked rows give out 0 and lse 0,
lse fp32 natural log as a [B, Q, H]-strided view); sinks are folded in afterwards. Softcap,
a value head size other than the key's, other devices and float64 take the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _visible(mask: Tensor | None, is_causal: bool, Q: int, S: int, device) -> Tensor | None:
    """bool broadcastable to [B, H, Q, S] (True = visible), or None when all is visible.
    is_causal: query row i sees keys j <= S - Q + i (the queries are the last Q positions)."""
    if is_causal:
        causal = torch.ones(Q, S, dtype=torch.bool, device=device).tril(S - Q)
        mask = causal if mask is None else mask & causal
    return mask


def _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, chunk):
    """(out [B, H, Q, Dv] in query's dtype, lse fp32 [B, H, Q]); fp32 math (fp64 for fp64)."""
    B, H, Q, D = query.shape
    G, S, Dv = key.shape[1], key.shape[2], value.shape[-1]
    g = H // G
    dtype = torch.promote_types(query.dtype, torch.float32)
    q = query.to(dtype).reshape(B, G, g, Q, D)
    k, v = key.to(dtype), value.to(dtype)
    if mask is not None:
        mask = torch.broadcast_to(mask, (B, H, Q, S)).view(B, G, g, Q, S)  # a view, no copy
    key_pos = torch.arange(S, device=query.device)
    sink = None if sinks is None else sinks.to(dtype).reshape(1, G, g, 1, 1)
    out = torch.empty(B, G, g, Q, Dv, dtype=query.dtype, device=query.device)
    lse = torch.empty(B, G, g, Q, dtype=torch.float32, device=query.device)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        logits = torch.einsum("bgiqd,bgsd->bgiqs", q[:, :, :, start:stop], k).mul_(scaling)
        if softcap > 0:
            logits.div_(softcap).tanh_().mul_(softcap)
        if mask is not None:
            logits.masked_fill_(~mask[:, :, :, start:stop], float("-inf"))
        if is_causal:
            rows = torch.arange(S - Q + start, S - Q + stop, device=query.device)
            logits.masked_fill_(key_pos[None, :] > rows[:, None], float("-inf"))
        row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
        if sink is not None:
            row_lse = torch.logaddexp(row_lse, sink)
        probs = logits.sub_(row_lse).exp_().nan_to_num_(nan=0.0)  # no visible key: 0
        out[:, :, :, start:stop] = torch.einsum("bgiqs,bgsv->bgiqv", probs, v)
        lse[:, :, :, start:stop] = row_lse[..., 0]
    return out.reshape(B, H, Q, Dv), lse.reshape(B, H, Q)


def attention(
    query: Tensor, key: Tensor, value: Tensor, *, scaling: float, mask: Tensor | None = None,
    is_causal: bool = False, softcap: float = 0.0, sinks: Tensor | None = None, chunk: int = 128,
) -> Tensor:
    """out [B, H, Q, Dv] (query's dtype) = softmax(logits) @ value, ``chunk`` query rows at a
    time (memory O(B * H * chunk * S)).

    query [B, H, Q, D]; key [B, G, S, D]; value [B, G, S, Dv]; H a multiple of G; any float
    dtype (math in fp32, fp64 for fp64). logits = scaling * q.k, then softcap * tanh(. /
    softcap) if softcap > 0. mask: bool broadcastable to [B, H, Q, S], True = visible;
    is_causal also hides keys after S - Q + i from row i. sinks: float [H], a per-head logit
    in each row's denominator (GPT-OSS). A row with no visible key gives 0 (like SDPA).
    """
    return _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, chunk)[0]


def attention_with_lse(
    query: Tensor, key: Tensor, value: Tensor, *, scaling: float, mask: Tensor | None = None,
    is_causal: bool = False, softcap: float = 0.0, sinks: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(out, lse): ``attention``'s output and lse fp32 [B, H, Q], the natural log-sum-exp of
    each row's logits over its visible keys plus exp(sinks[h]) (-inf, or the sink, for a
    row with no visible key): what ``accumulate_scores(..., lse=lse)`` expects."""
    Q, S = query.shape[2], key.shape[2]
    flash = (query.device.type == "cpu" and softcap <= 0 and query.dtype in _FLASH_CPU_DTYPES
             and value.shape[-1] == query.shape[-1])
    if not flash:
        return _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, 128)
    top_left = is_causal and mask is None and Q == S  # flash's own causal mask is top-left
    visible = None if top_left else _visible(mask, is_causal, Q, S, query.device)
    additive = None
    if visible is not None:
        additive = torch.zeros(visible.shape, dtype=query.dtype, device=query.device)
        additive.masked_fill_(~visible, float("-inf"))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, top_left, attn_mask=additive, scale=scaling)
    if visible is not None:
        lse = lse.masked_fill(~visible.any(-1), float("-inf"))  # flash gives 0 there
    if sinks is not None:
        with_sink = torch.logaddexp(lse, sinks.float()[None, :, None])
        out = (out * (lse - with_sink).exp()[..., None]).to(query.dtype)
        lse = with_sink
    return out, lse.contiguous()
