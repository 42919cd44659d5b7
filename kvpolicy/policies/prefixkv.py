"""PrefixKV: one global retention level, each layer keeps the shortest prefix reaching it."""
from __future__ import annotations

import torch
from torch import Tensor

from ..policy import Policy, Stats
from ..registry import register_policy


@register_policy("prefixkv")
class PrefixKV(Policy):
    """Each layer's normalised importance (attention of all prompt queries) sorted
    descending gives a concave curve C_l. The largest shared level p with
    sum_l min{n : C_l(n) >= p} <= total is bisected; the remainder goes to the layers
    whose next token adds most (Wang et al., 2024). ``shared_heads`` keeps one token set
    per layer (the reference); False selects per KV head."""

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

    def prefix_lengths(self, curve: Tensor, p: float, lo: int, hi: int) -> Tensor:
        """int64 [L]: min{n : C_l(n) >= p}, clipped to [lo, hi]."""
        target = torch.full((curve.shape[0], 1), p, dtype=curve.dtype)
        n = torch.searchsorted(curve, target).squeeze(1) + 1
        return n.clamp(lo, hi)

    def level(self, stats: Stats, total: int, floor: int) -> tuple[float, Tensor]:
        """(p, n_l(p)): the largest shared level whose prefixes fit in ``total``."""
        _, curve = self.curves(stats)
        lo, hi = min(floor + 1, stats.num_tokens), stats.num_tokens
        if int(self.prefix_lengths(curve, 1.0, lo, hi).sum()) <= total:
            return 1.0, self.prefix_lengths(curve, 1.0, lo, hi)
        p_lo, p_hi = 0.0, 1.0  # fits at p_lo, not at p_hi
        for _ in range(60):
            mid = (p_lo + p_hi) / 2
            if int(self.prefix_lengths(curve, mid, lo, hi).sum()) <= total:
                p_lo = mid
            else:
                p_hi = mid
        return p_lo, self.prefix_lengths(curve, p_lo, lo, hi)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        ordered, _ = self.curves(stats)
        _, n = self.level(stats, total, floor)
        spare = total - int(n.sum())
        if spare <= 0:
            return n
        # Concave curves: the best `spare` next tokens are the largest not-yet-taken gains.
        col = torch.arange(ordered.shape[1])
        gains = ordered.masked_fill((col[None, :] < n[:, None]) | (col[None, :] >= stats.num_tokens),
                                    float("-inf"))
        order = torch.sort(gains.flatten(), descending=True, stable=True).indices
        order = order[: min(spare, int(torch.isfinite(gains).sum()))]
        return n + torch.bincount(order // ordered.shape[1], minlength=len(n))
