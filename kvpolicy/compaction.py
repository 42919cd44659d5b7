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
        k, empty, cap = kept[l]
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


def gather(layers: list[KVLayer], plan: ForwardPlan) -> tuple[list, list[Tensor], list[Tensor]]:
    """Gather every layer's kept rows into new buffers with one compact_layers call.
    Returns (per layer (slot indices int64 [B, G, n], empty bool [B, G, n]: fillers and
    padded slots, capacity), the new keys [B, G, C, D] and values per layer). Scored layers
    are left-aligned on the widest one's slots; the plan's indices are into that width."""
    own = [layer.keys.shape[2] for layer in layers]
    planned = max((own[l] for l, layer in enumerate(layers) if layer.scored), default=0)
    shift = [planned - own[l] if layer.scored else 0 for l, layer in enumerate(layers)]
    idx = [(plan.keep[l] - shift[l]).clamp_min(0) for l in range(len(layers))]
    new_keys, new_values = [], []
    for l, layer in enumerate(layers):
        B, G, _, D = layer.keys.shape
        new_keys.append(layer.keys.new_zeros(B, G, plan.capacity[l], D))
        new_values.append(layer.values.new_zeros(B, G, plan.capacity[l], layer.values.shape[-1]))
    compact_layers([layer.keys for layer in layers], [layer.values for layer in layers], idx,
                   new_keys, new_values)
    kept = [(idx[l], plan.fill[l][:, None, :] | (plan.keep[l] < shift[l]), plan.capacity[l])
            for l in range(len(layers))]
    return kept, new_keys, new_values
