"""Attention with the model's own softmax (Gemma2 softcapping, GPT-OSS sinks), its
log-sum-exp for the score ops (``accumulate_scores(..., lse=...)``), and attention together
with the scores of its own probabilities (``attention_and_scores``, the all-query CPU path).

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

from .score_ref import capped
from .visibility import causal, visible

_FLASH_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _visible(mask: Tensor | None, is_causal: bool, Q: int, S: int, device) -> Tensor | None:
    """bool broadcastable to [B, H, Q, S] (True = visible), or None when all is visible.
    is_causal: query row i sees keys j <= S - Q + i (the queries are the last Q positions)."""
    if is_causal:
        order = causal(Q, S, device)
        mask = order if mask is None else mask & order
    return mask


def _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, chunk,
               query_mask=None, scores=False, need_lse=True):
    """(out [B, H, Q, Dv] in query's dtype, lse fp32 [B, H, Q] or None, scores fp32 [B, G, S]
    or None).

    fp32 math (fp64 for fp64), ``chunk`` query rows at a time with the group's heads as one
    batched matmul against only the keys the chunk can see (causal: up to its last row); the
    causal mask touches only the chunk's diagonal block. The chunk's logits and
    probabilities live in two buffers allocated once per call. With ``scores``, the
    probabilities that make the output also give each key's mass summed over the rows
    weighted by query_mask (float [B, Q], None = all) and over the group's heads; the lse
    (an extra pass over the logits) only when ``need_lse``."""
    B, H, Q, D = query.shape
    G, S, Dv = key.shape[1], key.shape[2], value.shape[-1]
    g = H // G
    dtype = torch.promote_types(query.dtype, torch.float32)
    dev = query.device
    q = (query.to(dtype) * scaling).reshape(B * G, g, Q, D)
    k_t = key.to(dtype).reshape(B * G, S, D).transpose(1, 2).contiguous()  # [B * G, D, S]: faster q k^T
    v = value.to(dtype).reshape(B * G, S, Dv)
    if mask is not None:
        mask = torch.broadcast_to(mask, (B, H, Q, S)).view(B, G, g, Q, S)  # a view, no copy
    sink = None if sinks is None else sinks.to(dtype).reshape(1, G, g, 1).expand(B, G, g, chunk)
    if scores:
        weight = torch.ones(B, Q, dtype=dtype, device=dev) if query_mask is None else query_mask.to(dtype)
        mass = torch.zeros(B * G, 1, S, dtype=dtype, device=dev)
    out = torch.empty(B, Q, G, g, Dv, dtype=query.dtype, device=dev)  # [B, Q, H, Dv] in memory, as SDPA
    lse = torch.empty(B * G, g, Q, dtype=torch.float32, device=dev) if need_lse else None
    size = B * G * g * min(chunk, Q) * S
    maybe_unseen = mask is not None or Q > S  # rows that may see no key at all
    logits_buf, probs_buf = torch.empty(size, dtype=dtype, device=dev), torch.empty(size, dtype=dtype, device=dev)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        c = stop - start
        end = max(0, min(S, S - Q + stop)) if is_causal else S  # keys the chunk can see
        shape, used = (B * G, g * c, end), B * G * g * c * end
        logits = torch.bmm(q[:, :, start:stop].reshape(B * G, g * c, D), k_t[:, :, :end],
                           out=logits_buf[:used].view(shape))
        logits = capped(logits, softcap)
        view = logits.view(B, G, g, c, end)
        if mask is not None:
            view.masked_fill_(~mask[:, :, :, start:stop, :end], float("-inf"))
        if is_causal:
            first = max(0, S - Q + start)  # keys before it are visible to every row of the chunk
            rows = torch.arange(S - Q + start, S - Q + stop, device=dev)
            seen = visible(torch.arange(first, end, device=dev)[None, :], rows[:, None], later=False)
            view[..., first:end].masked_fill_(~seen, float("-inf"))
        probs, row_lse = _probabilities(logits, None if sink is None else sink[..., :c], need_lse,
                                        probs_buf[:used].view(shape), maybe_unseen)
        part = torch.bmm(probs, v[:, :end])  # [B * G, g * c, Dv]
        out[:, start:stop] = part.view(B, G, g, c, Dv).permute(0, 3, 1, 2, 4)
        if need_lse:
            lse[:, :, start:stop] = row_lse.view(B * G, g, c)
        if scores:
            counted = weight[:, None, start:stop].expand(B, G * g, c).reshape(B * G, 1, g * c)
            mass[:, :, :end] += torch.bmm(counted, probs)
    result = mass.float().view(B, G, S) if scores else None
    return out.view(B, Q, H, Dv).transpose(1, 2), None if lse is None else lse.reshape(B, H, Q), result


def _probabilities(logits: Tensor, sink: Tensor | None, need_lse: bool, buffer: Tensor,
                   maybe_unseen: bool) -> tuple[Tensor, Tensor | None]:
    """(probs, lse fp32 [N, R] or None) of logits [N, R, S] (-inf = not visible) written to
    ``buffer`` (same shape): each row's softmax over its visible keys, with sink (a logit per
    row, N * R values) in the denominator only. A row without a visible key (possible only
    when ``maybe_unseen``) and without a sink gives probabilities 0 and lse -inf."""
    N, R, S = logits.shape
    if sink is None:
        lse = torch.logsumexp(logits, -1).float() if need_lse else None
        if S == 0:
            return buffer, lse
        probs = torch.ops.aten._softmax.out(logits, -1, False, out=buffer)
        return (probs.nan_to_num_(0.0) if maybe_unseen else probs), lse  # unseen rows: NaN -> 0
    sink = sink.reshape(N, R, 1)
    top = torch.maximum(logits.amax(-1, keepdim=True) if S else sink, sink)  # finite, as the sink is
    probs = torch.sub(logits, top, out=buffer).exp_()
    total = probs.sum(-1, keepdim=True) + (sink - top).exp()
    probs.div_(total)
    return probs, (top + total.log()).squeeze(-1).float() if need_lse else None


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
    return _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, chunk, need_lse=False)[0]


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
        return _reference(query, key, value, scaling, mask, is_causal, softcap, sinks, 128)[:2]
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


def attention_and_scores(
    query: Tensor, key: Tensor, value: Tensor, *, scaling: float, mask: Tensor | None = None,
    is_causal: bool = False, softcap: float = 0.0, sinks: Tensor | None = None,
    query_mask: Tensor | None = None, chunk: int = 64,
) -> tuple[Tensor, Tensor]:
    """(out, scores): ``attention``'s output and scores fp32 [B, G, S], the probability mass
    each key receives summed over the rows with query_mask True (bool [B, Q], None = all)
    and over each KV head's query group, from the same probabilities (one QK^T pass for
    both: what ``accumulate_scores(..., lse=...)`` after ``attention_with_lse`` gives, for
    a policy that counts every prompt query, at the cost of one attention pass instead of
    two). Arguments as ``attention``."""
    qm = None if query_mask is None else query_mask.float()
    out, _, scores = _reference(query, key, value, scaling, mask, is_causal, softcap, sinks,
                                chunk, qm, scores=True, need_lse=False)
    return out, scores
