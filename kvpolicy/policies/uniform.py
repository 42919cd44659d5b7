"""uniform: the same number of tokens in every layer, chosen by the window's attention."""
from __future__ import annotations

import torch

from ..allocation import apportion
from ..policy import Policy, Stats
from ..registry import register_policy


@register_policy("uniform")
class Uniform(Policy):
    """Equal per-layer budgets (remainder to the first layers); score = attention of the
    last ``window`` prompt queries, so comparisons isolate the effect of allocation."""

    queries = "window"

    def __init__(self, window: int = 8):
        self.window = window

    def score(self, stats: Stats):
        return stats.attn

    def allocate(self, stats: Stats, total: int, floor: int):
        return apportion(torch.ones(stats.num_layers), total, floor, stats.num_tokens)
