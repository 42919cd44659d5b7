"""SnapKV: attention of an observation window, max-pooled along keys (Li et al., 2024)."""
from __future__ import annotations

from torch import Tensor

from ..policy import Policy, Stats
from ..registry import register_policy
from ..selection import max_pool_keys


@register_policy("snapkv")
class SnapKV(Policy):
    """Score: attention of the last ``window`` prompt queries, summed per KV head and
    max-pooled along keys with ``kernel``; the window is kept; equal layer budgets."""

    queries = "window"

    def __init__(self, window: int = 32, kernel: int = 7):
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd positive int, got {kernel}")
        self.window = window
        self.kernel = kernel

    def score(self, stats: Stats) -> Tensor:
        return max_pool_keys(stats.attn, self.kernel)
