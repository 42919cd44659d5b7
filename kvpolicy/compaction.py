"""Compaction: every layer's kept slots gathered into new closed buffers with one
kvpolicy_kernels.compact_layers call. Called by the PolicyCache that owns the layers."""
from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy_kernels import compact_layers

from .layer import UNUSABLE, KVLayer
from .pipeline import Observation, ScoreTally
from .planning import ForwardPlan


def compact_layers_into(layers: list[KVLayer], plan: ForwardPlan, scores: dict[int, Tensor],
                        rows_seen: Tensor, carry: bool, quantize: bool = True) -> ScoreTally | None:
    """Close every layer on its kept slots (plan), with its running scores (evicting
    layers: scores fp32 [B, G, S] gathered at the kept slots); rows_seen int64 [B]: the
    tokens seen per row. carry: return the scored layers' gathered scores as a tally over
    the new slots (a deferred compaction) instead of keeping them in the layers.
    quantize: the layers store their prompt rows in their ``bits`` (KVLayer.close)."""
    kept, new_keys, new_values = gather(layers, plan)
    carried = ScoreTally(len(layers)) if carry else None
    for l, layer in enumerate(layers):
        k, empty, cap, flat = kept[l]
        if flat is not None:
            close_flat(layer, *flat, new_keys[l], new_values[l], rows_seen.clone(), quantize)
            continue
        B, G, n = k.shape
        running = None
        if layer.kind == "evict" or (carry and layer.scored):
            running = torch.zeros(B, G, cap, dtype=torch.float32, device=k.device)
            running[..., :n] = torch.gather(scores[l], 2, k)
        sizes = plan.row_sizes[l] if layer.kind == "evict" else None
        pos = layer.pos.new_full((B, G, cap), -1)
        pos[..., :n] = torch.gather(layer.pos, 2, k).masked_fill(empty, -1)
        if sizes is not None:  # a row keeps its own fixed size
            beyond = torch.arange(cap, device=k.device)[None, None] >= sizes[:, None, None]
            pos.masked_fill_(beyond, UNUSABLE)
        if carry and layer.scored:
            carried.set(l, Observation(running))
            running = None
        layer.close(new_keys[l], new_values[l], pos, n, rows_seen.clone(), running, sizes, quantize)
    return carried


def close_flat(layer: KVLayer, src: Tensor, heads: Tensor, keys: Tensor, values: Tensor,
               rows_seen: Tensor, quantize: bool = True) -> None:
    """Close a per-head layer on its gathered rows in the flat layout: src / heads int64
    [B, M] as ``flat_order`` gave them, keys [B, 1, T, D] / values as ``gather`` filled them
    (those M rows, then G slots per decode step); quantize as for KVLayer.close."""
    B, G = layer.pos.shape[:2]
    M, T = src.shape[1], keys.shape[2]
    pos = layer.pos.new_full((B, 1, T), -1)
    pos[:, 0, :M] = torch.where(heads >= 0, layer.pos.reshape(B, -1).gather(1, src.clamp_min(0)), -1)
    ring = torch.arange(T - M, device=keys.device) % G
    slot_heads = torch.cat([heads, ring.expand(B, T - M)], 1).to(torch.int16)
    layer.close_flat(keys, values, pos, slot_heads, M, rows_seen, quantize)


def flat_order(k: Tensor, empty: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """A per-head layer's kept rows, head after head: (src int64 [B, M] indices into its
    slots viewed as [B, G * S], heads int64 [B, M] their KV head, -1 past a row's last)
    for kept slots k int64 [B, G, n] into S slots, empty bool [B, G, n]; pos int64 [B, G,
    S] (a slot a head holds no token in is not kept)."""
    B, G, n = k.shape
    S = pos.shape[2]
    held = ~empty & (pos.gather(2, k) >= 0)
    order = torch.sort((~held).flatten(1).byte(), dim=1, stable=True).indices  # held first
    M = max(1, int(held.sum((1, 2)).max()))
    order = order[:, :M]
    head = torch.arange(G, device=k.device)[None, :, None].expand(B, G, n).flatten(1)
    src = (head * S + k.flatten(1)).gather(1, order)
    heads = torch.where(held.flatten(1).gather(1, order), head.gather(1, order), -1)
    return src, heads


def gather(layers: list[KVLayer], plan: ForwardPlan) -> tuple[list, list[Tensor], list[Tensor]]:
    """Gather every layer's kept rows into new buffers with one compact_layers call.
    Returns (per layer (slot indices int64 [B, G, n], empty bool [B, G, n]: fillers and
    padded slots, capacity, per-head layers' ``flat_order`` else None), the new keys [B, G,
    C, D] and values per layer; per-head layers: [B, 1, T, D], their rows head after head,
    see ``close_flat``). Scored layers are left-aligned on the widest one's slots; the
    plan's indices are into that width."""
    own = [layer.keys.shape[2] for layer in layers]
    planned = max((own[l] for l, layer in enumerate(layers) if layer.scored), default=0)
    shift = [planned - own[l] if layer.scored else 0 for l, layer in enumerate(layers)]
    idx = [(plan.keep[l] - shift[l]).clamp_min(0) for l in range(len(layers))]
    kept, sources, targets, new_keys, new_values = [], [], [], [], []
    for l, layer in enumerate(layers):
        B, G, S, D = layer.keys.shape
        Dv = layer.values.shape[-1]
        empty = plan.fill[l] | (plan.keep[l] < shift[l])
        keys, values, index, C, flat = layer.keys, layer.values, idx[l], plan.capacity[l], None
        if layer.per_head:  # the kept rows head after head, then G slots per decode step
            flat = flat_order(idx[l], empty, layer.pos)
            index = flat[0][:, None]
            keys, values = keys.reshape(B, 1, G * S, D), values.reshape(B, 1, G * S, Dv)
            G, C = 1, index.shape[-1] + G * (C - idx[l].shape[-1])
        kept.append((idx[l], empty, plan.capacity[l], flat))
        sources.append((keys, values))
        targets.append(index)
        new_keys.append(layer.keys.new_zeros(B, G, C, D))
        new_values.append(layer.values.new_zeros(B, G, C, Dv))
    compact_layers([k for k, _ in sources], [v for _, v in sources], targets, new_keys, new_values)
    return kept, new_keys, new_values
