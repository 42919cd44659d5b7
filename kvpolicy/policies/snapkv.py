"""SnapKV: attention of an observation window, max-pooled along keys (Li et al., 2024)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..allocation import apportion
from ..policy import Policy, Stats
from ..registry import register_policy


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
        L, B, G, N = stats.attn.shape
        pooled = F.max_pool1d(stats.attn.reshape(L * B * G, 1, N), self.kernel, stride=1,
                              padding=self.kernel // 2)
        return pooled.reshape(L, B, G, N)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        return apportion(torch.ones(stats.num_layers), total, floor, stats.num_tokens)
