"""VL-Cache: modality-aware scores and sparsity-aware layer budgets (Tu et al., 2024)."""
from __future__ import annotations

from torch import Tensor

from ..allocation import apportion
from ..policy import Policy, Stats, check_share
from ..registry import register_policy
from ..selection import post_vision


@register_policy("vlcache")
class VLCache(Policy):
    # the rule: its card, registry/cards/vlcache.toml (also its __doc__)
    min_scored = 1
    queries = "post_vision"
    window = 0  # the protected tail is the post-vision span, known per prompt
    protects = ("the prompt's tokens after its last vision token, or its last 8 tokens "
                "without vision tokens")

    def __init__(self, tau: float = 0.01, uniform_mix: float = 0.0, shared_heads: bool = True):
        if not 0.0 < tau < 1.0:
            raise ValueError(f"tau must be in (0, 1), got {tau}")
        self.tau = tau
        self.uniform_mix = check_share("uniform_mix", uniform_mix)
        self.shared_heads = shared_heads

    def score(self, stats: Stats) -> Tensor:
        if self.shared_heads:
            return stats.attn.sum(dim=2, keepdim=True).expand_as(stats.attn)
        return stats.attn

    def protected(self, stats: Stats) -> Tensor:
        return post_vision(stats.valid, stats.vision)

    def density(self, stats: Stats) -> Tensor:
        """float64 [L]: 1 - layer sparsity."""
        if stats.below is None:
            raise ValueError("vlcache needs the sparsity counts of the score op (stats.below)")
        entries = stats.causal_entries().sum().double() * stats.attn.shape[2] * stats.heads_per_group
        return 1.0 - stats.below.double().sum((1, 2)) / entries.clamp_min(1)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        d = self.density(stats)
        L = stats.num_layers
        weights = self.uniform_mix / L + (1 - self.uniform_mix) * d / d.sum().clamp_min(1e-12)
        return apportion(weights, total, floor, stats.num_tokens)
