"""SnapKV: attention of an observation window, max-pooled along keys (Li et al., 2024)."""
from __future__ import annotations

from torch import Tensor

from ..policy import Policy, Stats, check_int
from ..registry import register_policy
from ..selection import edge_tokens, max_pool_keys


@register_policy("snapkv")
class SnapKV(Policy):
    # the rule: its card, registry/cards/snapkv.toml (also its __doc__)
    queries = "window"

    def __init__(self, window: int = 32, kernel: int = 7, defer: int = 0):
        if check_int("kernel", kernel, 1) % 2 == 0:
            raise ValueError(f"kernel must be an odd positive int, got {kernel}")
        self.window = check_int("window", window, 1)
        self.kernel = kernel
        self.defer = check_int("defer", defer, 0)

    def score(self, stats: Stats) -> Tensor:
        before = stats.valid & ~edge_tokens(stats.valid, 0, self.window)  # [B, N]
        return max_pool_keys(stats.attn, self.kernel, upto=before[None, :, None, :])
