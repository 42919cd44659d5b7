"""TOVA: token omission via attention, a fixed-size cache re-selected every step from the
newest token's attention averaged over all heads (Oren et al., 2024)."""
from __future__ import annotations

from torch import Tensor

from ..policy import FixedSizePolicy, Stats
from ..registry import register_policy


@register_policy("tova")
class TOVA(FixedSizePolicy):
    # the rule: its card, registry/cards/tova.toml (also its __doc__)
    queries = "window"
    window = 1  # the last prompt token: the query, and kept (kvpress pads it with max + 1)
    running = "last"

    def score(self, stats: Stats) -> Tensor:
        """float32 [L, B, G, N]: the last token's attention averaged over all query heads
        (attn is summed over each group's heads), the same for every KV head."""
        G = stats.attn.shape[2]
        mean = stats.attn.sum(2, keepdim=True) / (G * stats.heads_per_group)
        return mean.expand_as(stats.attn)

    def victim_priority(self, scores: Tensor, positions: Tensor, step_pos: Tensor, size: Tensor):
        """The last step's attention averaged over the heads (a sum ranks the same): every
        KV head of a row overwrites the same token."""
        return scores.sum(1, keepdim=True).expand_as(scores)
