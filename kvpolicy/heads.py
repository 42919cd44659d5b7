"""Per-head budgets: a layer's tokens split across its KV heads by their scores (AdaKV's
rule, as kvpress's ``AdaKVPress`` applies it), and each head's own top tokens.

A per-head plan keeps counts int64 [L, B, G] instead of one count per layer; every head
keeps the protected tokens, and ``SAFEGUARD`` of its layer's average count at least."""
from __future__ import annotations

import copy

import torch
from torch import Tensor

SAFEGUARD = 0.2  # each head keeps at least this fraction of its layer's average (kvpress's alpha)


def ranked(key: Tensor, tier: Tensor) -> Tensor:
    """int64 [..., M]: the rank (0 = best) of each entry of the last dim, higher ``tier``
    first, then higher ``key``, then the later entry (select_keep's tie rule)."""
    M = key.shape[-1]
    order = torch.sort(key.flip(-1), dim=-1, descending=True, stable=True).indices
    order = order.gather(-1, torch.sort(tier.flip(-1).gather(-1, order), dim=-1,
                                        descending=True, stable=True).indices)
    order = M - 1 - order
    return torch.empty_like(order).scatter_(-1, order, torch.arange(M, device=key.device).expand_as(order))


def head_valid_or(valid: Tensor, head_valid: Tensor | None, shape: torch.Size) -> Tensor:
    """bool [L, B, G, N]: which (head, token) entries hold a token (head_valid, or the
    rows' valid [B, N] in every head)."""
    ok = valid[None, :, None, :] if head_valid is None else head_valid
    return ok.expand(shape)


def by_layer(protected: Tensor) -> Tensor:
    """bool [L or 1, B, 1, N]: protected [B, N] (every layer) or [L, B, N] (per layer),
    against [L, B, G, N] entries."""
    return (protected if protected.dim() == 3 else protected[None])[:, :, None, :]


def split_heads(scores: Tensor, n: Tensor, protected: Tensor, valid: Tensor,
                head_valid: Tensor | None = None, safeguard: float = SAFEGUARD) -> Tensor:
    """int64 [L, B, G]: each layer's n_l x G entries split across its KV heads.

    scores float [L, B, G, N] (higher = keep); n int64 [L] the layer's tokens per head;
    protected bool [B, N] or [L, B, N] (kept in every head); valid bool [B, N]; head_valid
    bool [L, B, G, N] | None (a head lacking a token cannot keep it). Each head first takes its
    protected tokens and its top int(n_l x safeguard) scores, then the layer's best
    remaining entries over all its heads until n_l x G (or all its entries) are taken.
    """
    L, B, G, N = scores.shape
    ok = head_valid_or(valid, head_valid, scores.shape)
    key = scores.double().masked_fill(~ok, -torch.inf)
    protected = by_layer(protected)
    own = ranked(key, protected.expand_as(key).long())
    safe = own < (n.double() * safeguard).long().view(L, 1, 1, 1)
    tier = (2 * (protected & ok) + (safe & ok)).long() - 3 * (~ok).long()
    rank = ranked(key.flatten(2), tier.flatten(2)).view(L, B, G, N)
    take = torch.minimum(n.view(L, 1) * G, ok.sum((2, 3)))  # [L, B]
    return (rank < take[:, :, None, None]).sum(-1)


def select_heads(scores: Tensor, counts: Tensor, protected: Tensor, valid: Tensor,
                 head_valid: Tensor | None = None) -> Tensor:
    """int64 [B, G, m]: per (row, KV head) the indices of its counts[b, g] kept tokens
    (protected first, then the top scores), sorted ascending, then padded to m =
    max(counts) by repeating the last one (the cache keeps the padding empty).

    scores float [B, G, N]; counts int64 [B, G]; protected / valid bool [B, N];
    head_valid bool [B, G, N] | None.
    """
    B, G, N = scores.shape
    ok = valid[:, None, :].expand(B, G, N) if head_valid is None else head_valid
    key = scores.double().masked_fill(~ok, -torch.inf)
    rank = ranked(key, (protected[:, None, :] & ok).long())
    m = max(1, int(counts.max()))
    chosen = torch.where(rank < counts[..., None], torch.arange(N, device=scores.device), N)
    keep = torch.sort(chosen, dim=-1).values[..., :m]
    last = keep.gather(-1, (counts.clamp(1, m) - 1)[..., None])
    return torch.where(keep == N, last.clamp_max(N - 1), keep)


def global_heads(scores: Tensor, total: int, floor: int, protected: Tensor, valid: Tensor,
                 head_valid: Tensor | None = None) -> Tensor:
    """int64 [L, B, G]: ``total`` x G entries chosen over every layer and KV head at once
    (KVzip's head-level selection): protected tokens first in every head, then each head's
    top ``floor`` (the layer floor), then the best remaining entries anywhere. protected
    bool [B, N] or [L, B, N]; valid, head_valid as for ``split_heads``."""
    L, B, G, N = scores.shape
    ok = head_valid_or(valid, head_valid, scores.shape)
    key = scores.double().masked_fill(~ok, -torch.inf)
    protected = by_layer(protected)
    own = ranked(key, protected.expand_as(key).long())
    tier = (2 * (protected & ok) + ((own < floor) & ok)).long() - 3 * (~ok).long()
    flat = lambda x: x.permute(1, 0, 2, 3).reshape(B, L * G * N)  # noqa: E731
    rank = ranked(flat(key), flat(tier)).view(B, L, G, N).permute(1, 0, 2, 3)
    take = torch.minimum(torch.tensor(total * G), ok.sum((0, 2, 3)))  # [B]
    return (rank < take[None, :, None, None]).sum(-1)


def per_head_refusal(policy) -> str | None:
    """Why ``policy`` (a kvpolicy.Policy) cannot plan per KV head, or None: its budget must
    be split by token scores and its rows appended while decoding, with the shared per-head
    selection."""
    from .policy import Policy

    if policy.requirements().decode != "append":
        return "evicts while decoding into one fixed-size buffer per layer"
    if type(policy).evict is not Policy.evict or type(policy).plan is not Policy.plan:
        return "selects its tokens with its own rule (not one score per token and head)"
    if policy.requirements().defer:
        return f"defers its compaction (defer={policy.requirements().defer}); pass defer=0"
    return None


def with_per_head(policy, on: bool = True):
    """A copy of ``policy`` (a kvpolicy.Policy) planning per KV head (``on``), or a ValueError
    naming why it cannot (per_head_refusal); ``on=False``: a copy planning one count per
    layer, which every policy can (for one planning per head by its own rule, e.g. kvzip)."""
    if on and (why := per_head_refusal(policy)):
        raise ValueError(f"per_head=True: {policy.name} {why}; per-head budgets need a policy "
                         f"that scores tokens and appends (e.g. snapkv, pyramidkv, kvzip, "
                         f"expected_attention, keydiff)")
    out = copy.copy(policy)
    out.per_head = on
    return out
