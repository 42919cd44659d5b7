"""KeyDiff: keep the keys least similar to their head's mean direction (Park et al., 2025)."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..heads import head_valid_or
from ..policy import Policy, Stats, check_int
from ..registry import register_policy


@register_policy("keydiff")
class KeyDiff(Policy):
    # the rule: its card, registry/cards/keydiff.toml (also its __doc__)
    queries = "none"
    needs_keys = True

    def __init__(self, sinks: int = 4, window: int = 8):
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 0)

    def score(self, stats: Stats) -> Tensor:
        """float32 [L, B, G, N]: -cos(k_i, anchor), the anchor the mean of the row's
        normalised keys it holds per (layer, sequence, KV head)."""
        if stats.keys is None:
            raise ValueError("keydiff scores keys: Stats.keys is None (an engine must fill it "
                             "when Requirements.needs_keys is set)")
        unit = F.normalize(stats.keys.float(), dim=-1)  # [L, B, G, N, D]; 0 stays 0
        held = head_valid_or(stats.valid, stats.head_valid, unit.shape[:4])  # each layer's, each head's
        real = held[..., None]
        anchor = (unit * real).sum(-2, keepdim=True) / real.sum(-2, keepdim=True).clamp_min(1)
        return -F.cosine_similarity(unit, anchor, dim=-1).masked_fill(~held, 0.0)
