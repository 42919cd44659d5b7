"""uniform: the same number of tokens in every layer, chosen by the window's attention
or by another policy's scores and selection."""
from __future__ import annotations

from torch import Tensor

from ..policy import Policy, QuerySet, Stats, check_int
from ..registry import get_policy, register_policy


@register_policy("uniform")
class Uniform(Policy):
    # the rule: its card, registry/cards/uniform.toml (also its __doc__); with ``scores``,
    # the queries, sparsity counts, floor and protected tokens are the scoring policy's

    def __init__(self, window: int = 8, scores: str | Policy = ""):
        self.window = check_int("window", window, 1)
        self.scores = scores
        self.source = get_policy(scores) if scores else None
        if self.source is not None and self.source.requirements().decode != "append":
            raise ValueError(f"uniform(scores={scores!r}): {self.source.name} holds a fixed "
                             f"size while decoding and already splits equally; use it directly")

    @property
    def queries(self) -> QuerySet:
        return "window" if self.source is None else self.source.requirements().queries

    @property
    def tau(self) -> float:
        return 0.0 if self.source is None else self.source.requirements().tau

    @property
    def min_scored(self) -> int:
        return 0 if self.source is None else self.source.min_scored

    @property
    def protects(self) -> str:
        return Policy.protects if self.source is None else self.source.protects

    def query_mask(self, valid: Tensor, vision: Tensor | None) -> Tensor:
        if self.source is not None:
            return self.source.query_mask(valid, vision)
        return super().query_mask(valid, vision)

    def min_tokens(self) -> int:
        return super().min_tokens() if self.source is None else self.source.min_tokens()

    def score(self, stats: Stats) -> Tensor:
        return stats.attn if self.source is None else self.source.score(stats)

    def protected(self, stats: Stats) -> Tensor:
        return super().protected(stats) if self.source is None else self.source.protected(stats)

    def evict(self, scores: Tensor, n: Tensor, stats: Stats) -> list[Tensor]:
        if self.source is None:
            return super().evict(scores, n, stats)
        return self.source.evict(scores, n, stats)
