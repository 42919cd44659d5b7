"""PyramidKV: SnapKV scores, layer budgets falling linearly with depth (Cai et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..allocation import equal_split, take_cheapest
from ..policy import Stats
from ..registry import register_policy
from .snapkv import SnapKV


@register_policy("pyramidkv")
class PyramidKV(SnapKV):
    # the rule: its card, registry/cards/pyramidkv.toml (also its __doc__)
    def __init__(self, window: int = 32, kernel: int = 7, beta: float = 20.0):
        super().__init__(window, kernel)
        if beta < 1:
            raise ValueError(f"beta must be >= 1, got {beta}")
        self.beta = beta

    def prices(self, num_layers: int, num_tokens: int) -> Tensor:
        """float64 [L, N]: the total at which layer l's exact budget reaches k - 1/2 (its
        k-th token's price). The exact budget of layer l for a total T is w + first + (last -
        first) * l / (L - 1), with c = max(T / L - w, 0), first = min(c (2 - 1/beta), N - w)
        and last = 2c - first (w the window): selling tokens in this order rounds it exactly
        and monotonically in the total."""
        L, N, w = num_layers, num_tokens, min(self.window, num_tokens)
        x = (torch.arange(L, dtype=torch.float64) / (L - 1))[:, None]
        selected = torch.arange(1, N + 1, dtype=torch.float64)[None, :] - 0.5 - w
        slope = (2 - 1 / self.beta) - (2 - 2 / self.beta) * x  # selected / c below the cap
        cap = (N - w) / (2 - 1 / self.beta)  # c at which the first layer reaches N - w
        c = torch.where(selected <= cap * slope, selected / slope,
                        (selected - (N - w) * (1 - 2 * x)) / (2 * x))  # x = 0: inf
        return L * (c.clamp_min(0) + w)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        L, N = stats.num_layers, stats.num_tokens
        if L == 1:
            return equal_split(1, total, floor, N)
        return take_cheapest(self.prices(L, N), total, floor, N)
