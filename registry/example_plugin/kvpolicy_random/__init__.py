"""An out-of-tree kvpolicy policy, registered through the ``kvpolicy.policies`` entry point."""
from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy import Policy, Stats
from kvpolicy.allocation import apportion


class RandomKeep(Policy):
    """Keeps the protected tokens plus a seeded random sample of the others, equal
    budgets per layer: the floor any scoring rule must beat."""

    queries = "none"

    def __init__(self, seed: int = 0, window: int = 8):
        self.seed = seed
        self.window = window

    def score(self, stats: Stats) -> Tensor:
        gen = torch.Generator().manual_seed(self.seed)
        return torch.rand(stats.attn.shape, generator=gen).to(stats.attn.device)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        return apportion(torch.ones(stats.num_layers), total, floor, stats.num_tokens)
