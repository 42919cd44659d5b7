"""PyramidKV: SnapKV scores, layer budgets falling linearly with depth (Cai et al., 2024)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..allocation import apportion
from ..policy import Stats
from ..registry import register_policy
from .snapkv import SnapKV


@register_policy("pyramidkv")
class PyramidKV(SnapKV):
    """Budgets fall linearly from the first layer to the last with last = avg / beta and
    first = 2 avg - last (first capped at N - window); SnapKV scores and window."""

    def __init__(self, window: int = 32, kernel: int = 7, beta: float = 20.0):
        super().__init__(window, kernel)
        if beta < 1:
            raise ValueError(f"beta must be >= 1, got {beta}")
        self.beta = beta

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        L, N = stats.num_layers, stats.num_tokens
        avg = total / L
        last = avg / self.beta
        first = 2 * avg - last
        if first > N - self.window:
            first = max(N - self.window, avg)
            last = 2 * avg - first
        weights = torch.linspace(first, last, L, dtype=torch.float64) if L > 1 else torch.ones(1)
        return apportion(weights, total, floor, N)
