"""PrefixKV: one global retention level, each layer keeps the shortest prefix reaching it."""
from __future__ import annotations

import torch
from torch import Tensor

from ..allocation import take_cheapest
from ..policy import Policy, Stats
from ..registry import register_policy


@register_policy("prefixkv")
class PrefixKV(Policy):
    """Each layer's normalised importance (attention of all prompt queries) sorted
    descending gives a concave curve C_l. The largest shared level p with
    sum_l min{n : C_l(n) >= p} <= total is found; the remainder goes to the layers
    at the next level, larger next gain first (Wang et al., 2024). ``shared_heads``
    keeps one token set per layer (the reference); False selects per KV head."""

    min_scored = 1
    queries = "all"

    def __init__(self, sinks: int = 4, window: int = 1, shared_heads: bool = True):
        self.sinks = sinks
        self.window = window
        self.shared_heads = shared_heads

    def score(self, stats: Stats) -> Tensor:
        if self.shared_heads:
            return stats.attn.mean(dim=2, keepdim=True).expand_as(stats.attn)
        return stats.attn

    def curves(self, stats: Stats) -> tuple[Tensor, Tensor]:
        """(sorted importance, C) float64 [L, N_pad]: per layer, descending and cumulative."""
        imp = stats.attn.double().sum(dim=(1, 2))
        imp = imp / imp.sum(-1, keepdim=True).clamp_min(1e-30)
        ordered = torch.sort(imp, dim=-1, descending=True).values
        return ordered, ordered.cumsum(-1)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        return self.level(stats, total, floor)[1]

    def level(self, stats: Stats, total: int, floor: int) -> tuple[float, Tensor]:
        """(p, n): the shared level p and the prefix lengths n [L] reaching it.

        Raising p from 0, layer l needs its k-th token once p exceeds C_l(k - 1). Selling
        tokens in that order is the reference's bisection for the largest p with
        sum_l n_l(p) <= total, done exactly by one sort; tokens left over go to the
        layers at the next level, larger next gain first.
        """
        ordered, curve = self.curves(stats)
        lo, hi = floor, stats.num_tokens
        threshold = torch.cat([torch.zeros_like(curve[:, :1]), curve[:, :-1]], dim=1)
        n = take_cheapest(threshold, total, lo, hi, tiebreak=-ordered)
        last_sold = threshold.gather(1, (n - 1)[:, None]).squeeze(1)
        return float(torch.where(n > lo, last_sold, 0.0).max()), n
