"""StreamingLLM: attention sinks plus a rolling window of the most recent tokens."""
from __future__ import annotations

import torch
from torch import Tensor

from ..policy import FixedSizePolicy, Stats, check_int
from ..registry import register_policy


@register_policy("streamingllm")
class StreamingLLM(FixedSizePolicy):
    # the rule: its card, registry/cards/streamingllm.toml (also its __doc__)
    queries = "none"

    def __init__(self, sinks: int = 4, positions: str = "original"):
        self.sinks = check_int("sinks", sinks, 0)
        if positions not in ("original", "cache"):
            raise ValueError(f"positions must be 'original' (keys keep the positions they were "
                             f"seen at) or 'cache' (positions inside the cache), got {positions!r}")
        self.positions = positions

    def score(self, stats: Stats) -> Tensor:
        L, B, G, N = stats.attn.shape
        recency = torch.arange(N, dtype=torch.float32, device=stats.attn.device)
        return recency.expand(L, B, G, N)

    def victim_priority(self, scores: Tensor, positions: Tensor, step_pos: Tensor, size: int):
        age = positions.float()
        return age.masked_fill((positions >= 0) & (positions < self.sinks), torch.inf)
