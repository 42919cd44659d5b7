"""Planning the rows of one forward: a pure function of the policy, the budget, the layers'
slots and what the forward observed. Each batch row is planned alone (its budget is a
share of its own tokens, kvpolicy.pipeline.plan_row), then the rows are merged into one
keep per layer; sliding layers keep their window. The cache compacts by the result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .budget import Budget
from .budget import capacity as buffer_slots
from .layer import KVLayer
from .pipeline import plan_row
from .policy import Plan, Policy
from .prefill import Observed


@dataclass
class ForwardPlan:
    """Per layer l: keep int64 [B, G, n_l] slot indices, fill bool [B, G, n_l] (a shorter
    row's or head's padding, kept empty), capacity (buffer slots); row_sizes int64 [B] each
    row's fixed size (evicting layers); plan: the policy's Plan of the scored layers, or
    None."""

    keep: dict[int, Tensor]
    fill: dict[int, Tensor]
    capacity: dict[int, int]
    row_sizes: dict[int, Tensor]
    plan: Plan | None


def plan_forward(policy: Policy, budget: Budget, layers: list[KVLayer], observed: Observed,
                 scores: dict[int, Tensor], *, compress: bool, new_tokens: int,
                 bucket: int) -> ForwardPlan:
    """The kept slots of every layer. scores: per scored layer fp32 [B, G, S_l] over its
    slots; compress: plan with the policy (else keep every slot: a continuation appended,
    or a compaction deferred); new_tokens: decode steps the buffers are sized for."""
    out = ForwardPlan({}, {}, {}, {}, None)
    scored = [l for l, layer in enumerate(layers) if layer.scored]
    if scored:
        rows = row_plans(policy, budget, layers, observed, scores, scored, compress, new_tokens)
        per_head = all(r.counts is not None for r in rows)
        out.plan = Plan([], [], [] if per_head else None)
        for i, l in enumerate(scored):
            n = max(r.keep[i].shape[-1] for r in rows)
            per_row = [pad_keep(r.keep[i], n, None if r.counts is None else r.counts[i])
                       for r in rows]
            out.keep[l] = torch.cat([k for k, _ in per_row])
            out.fill[l] = torch.cat([f for _, f in per_row])
            if per_head:
                out.plan.counts.append(torch.cat([r.counts[i] for r in rows]))
            sizes = [r.capacity[i] for r in rows]
            out.row_sizes[l] = torch.tensor(sizes, device=out.keep[l].device)
            fixed = layers[l].kind == "evict"  # a fixed size: the policy's allocation
            out.capacity[l] = max(sizes) if fixed else buffer_slots(n, new_tokens, "append", bucket)
            out.plan.keep.append(out.keep[l])
            out.plan.capacity.append(out.capacity[l])
    for l, layer in enumerate(layers):
        if not layer.scored:
            out.keep[l], fill = window_keep(layer)
            out.fill[l] = fill[:, None, :].expand(out.keep[l].shape)
            out.capacity[l] = min(layer.cache_window, buffer_slots(out.keep[l].shape[-1],
                                                                   new_tokens, "append", bucket))
    return out


def row_plans(policy: Policy, budget: Budget, layers: list[KVLayer], observed: Observed,
              scores: dict[int, Tensor], scored: list[int], compress: bool,
              new_tokens: int) -> list[Plan]:
    """One Plan per batch row over the scored layers, indices into the widest layer's slots."""
    width = max(layers[l].keys.shape[2] for l in scored)
    attn = torch.stack([left_pad(scores[l], width) for l in scored])
    held = torch.stack([left_pad(layers[l].pos >= 0, width) for l in scored])  # [L, B, G, W]
    valid = held.any(2).any(0)
    # a per-head cache's heads hold different tokens once planned, a continued cache's
    # layers different counts (the narrower ones left-padded)
    by_layer = held.any(2)  # [L, B, W]
    same = bool(held.all(2).eq(by_layer).all()) and bool(by_layer.eq(by_layer.any(0)).all())
    head_valid = None if same else held
    queries = left_pad(observed.queries, width)
    vision = None if observed.vision is None else left_pad(observed.vision, width)
    tally = observed.tally
    below = None
    if tally.below[scored[0]] is not None:
        below = torch.stack([tally.below[l] for l in scored])
    keys = None
    if policy.requirements().needs_keys:  # [L, B, G, W, D], zero at padding and empty slots
        keys = torch.stack([left_pad(layers[l].keys.transpose(-1, -2), width).transpose(-1, -2)
                            for l in scored]) * valid[None, :, None, :, None]
    stats = query_statistics(observed, scored, valid, width) if observed.moments else {}
    if observed.prompt_tally is not None:  # aligned on the slots as ``scores`` are
        stats["prompt_attn"] = torch.stack([left_pad(slots_wide(observed.prompt_tally.layer(l),
                                                                layers[l]), width) for l in scored])
    rows = []
    for b in range(valid.shape[0]):
        one = slice(b, b + 1)
        seen = int(observed.rows_seen[b]) if observed.continued else None
        if not compress:
            rows.append(keep_all(valid[one], attn.shape[2], len(scored), new_tokens,
                                 policy.requirements().per_head))
            continue
        rows.append(plan_row(policy, budget, attn[:, one], queries=queries[one], valid=valid[one],
                             heads_per_group=observed.heads_per_group,
                             vision=None if vision is None else vision[one],
                             below=None if below is None else below[:, one],
                             new_tokens=new_tokens, seen=seen,
                             keys=None if keys is None else keys[:, one],
                             **{k: v[:, one] if k != "future_rotary" else v[one]
                                for k, v in stats.items()},
                             head_valid=None if head_valid is None else head_valid[:, one],
                             # a reconstructing policy's prompt is kept whole until its passes
                             reconstructed=policy.requirements().reconstruct))
    return rows


def query_statistics(observed: Observed, scored: list[int], valid: Tensor,
                     width: int) -> dict[str, Tensor]:
    """The query mean [L, B, H, D] and covariance [L, B, H, D, D], the value norms [L, B,
    G, W] (0 at padding) and the future rotary [B, 2, F, D] of an observation that has them."""
    count, total, outer = (torch.stack(m) for m in zip(*(observed.moments[l] for l in scored)))
    n = count.clamp_min(1)[:, :, None, None]
    mean = total / n
    cov = outer / n[..., None] - mean[..., :, None] * mean[..., None, :]
    norms = torch.stack([left_pad(observed.value_norms[l], width) for l in scored])
    out = dict(query_mean=mean, query_cov=cov, value_norms=norms * valid[None, :, None])
    if observed.future_rotary is not None:
        out["future_rotary"] = observed.future_rotary
    return out


def slots_wide(attn: Tensor, layer: KVLayer) -> Tensor:
    """attn fp32 [B, G, S] over a layer's first S slots, zero-padded to all of them."""
    return torch.nn.functional.pad(attn, (0, layer.keys.shape[2] - attn.shape[-1]))


def left_pad(x: Tensor, width: int) -> Tensor:
    """Pad the last dim of x [..., S] on the left to ``width`` (zeros / False)."""
    return torch.nn.functional.pad(x, (width - x.shape[-1], 0))


def pad_keep(keep: Tensor, n: int, counts: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(keep [1, G, n], filler bool [1, G, n]): a row's keep widened to n by repeating its
    last index; the fillers (and, for a per-head plan, each head's indices beyond its
    counts int64 [1, G]) are marked so their slots stay empty."""
    have = keep.shape[-1]
    rank = torch.arange(n, device=keep.device)[None, None]
    fill = rank >= (have if counts is None else counts[..., None])
    if have < n:
        keep = torch.cat([keep, keep[..., -1:].expand(*keep.shape[:-1], n - have)], -1)
    return keep, fill.expand(keep.shape)


def keep_all(valid: Tensor, heads: int, num_layers: int, new_tokens: int,
             per_head: bool = False) -> Plan:
    """Every valid slot (valid bool [1, S]) kept in every layer and KV head (per_head: as a
    per-head plan, with every head's count)."""
    n = int(valid.sum())
    idx = valid[0].nonzero()[:, 0][None, None].expand(1, heads, n)
    counts = [torch.full((1, heads), n, device=idx.device)] * num_layers if per_head else None
    return Plan([idx] * num_layers, [n + new_tokens] * num_layers, counts)


def window_keep(layer: KVLayer) -> tuple[Tensor, Tensor]:
    """A sliding layer's last ``window - 1`` valid tokens (the next query sees them and
    itself): (keep int64 [B, G, n], filler bool [B, n])."""
    pos = layer.pos[:, 0]  # [B, S]: sliding layers keep the same tokens in every head
    B, S = pos.shape
    n = min(layer.cache_window - 1, S)
    order = pos.float().masked_fill(pos < 0, -torch.inf).topk(n, dim=-1).indices
    keep = torch.sort(order, dim=-1).values
    fill = torch.gather(pos, 1, keep) < 0
    return keep[:, None].expand(B, layer.keys.shape[1], n), fill


def at_slots(mask: Tensor, new_pos: Tensor, pos: Tensor) -> Tensor:
    """bool [B, C]: ``mask`` bool [B, q] over a forward's tokens (positions new_pos int64
    [B, q], -1 at padding) carried to the slots holding those positions (pos int64 [B, C])."""
    B = pos.shape[0]
    table = torch.zeros(B, int(max(pos.max(), new_pos.max())) + 2, dtype=torch.bool, device=pos.device)
    table.scatter_(1, new_pos.clamp_min(-1) + 1, mask & (new_pos >= 0))
    return torch.gather(table, 1, pos.clamp_min(-1) + 1) & (pos >= 0)

