"""H2O: heavy hitters (most accumulated attention) plus recent tokens, at a fixed size."""
from __future__ import annotations

import torch
from torch import Tensor

from ..policy import FixedSizePolicy, Stats
from ..registry import register_policy
from ..selection import edge_tokens, select_keep


@register_policy("h2o")
class H2O(FixedSizePolicy):
    # the rule: its card, registry/cards/h2o.toml (also its __doc__)
    queries = "all"

    def __init__(self, heavy_ratio: float = 0.5):
        if not 0.0 <= heavy_ratio < 1.0:
            raise ValueError(f"heavy_ratio must be in [0, 1), got {heavy_ratio}")
        self.heavy_ratio = heavy_ratio

    def recent(self, size: int | Tensor) -> int | Tensor:
        """Recent tokens a layer of ``size`` slots keeps (an int, or int64 per row)."""
        if isinstance(size, Tensor):
            return (size - torch.round(self.heavy_ratio * size)).clamp_min(1)
        return max(1, size - round(self.heavy_ratio * size))

    def evict(self, scores: Tensor, n: Tensor, stats: Stats) -> list[Tensor]:
        keep = []
        for l, size in enumerate(n.tolist()):
            layer = stats.of_layer(l)  # the slots layer l holds (a continued cache's may differ)
            recent = edge_tokens(layer.valid, 0, self.recent(size))
            keep.append(select_keep(scores[l], min(size, layer.num_tokens), recent, layer.valid))
        return keep

    def victim_priority(self, scores: Tensor, positions: Tensor, step_pos: Tensor, size: Tensor):
        recent = positions > step_pos.view(-1, 1, 1) - self.recent(size)
        return scores.masked_fill(recent, torch.inf)
