"""SpanKV (ours): spans that the answer's last query points at in the upper layers, kept in
every layer, plus each layer's own picks."""
from __future__ import annotations

import torch
from torch import Tensor

from ..policy import Policy, Stats, check_int, check_share
from ..registry import register_policy
from ..selection import edge_tokens, max_pool_keys, select_keep


@register_policy("spankv")
class SpanKV(Policy):
    # the rule: its card, registry/cards/spankv.toml (also its __doc__)
    queries = "window"

    def __init__(self, observe: int = 1, window: int = 16, span: int = 13, kernel: int = 7,
                 shared: float = 0.9, sinks: int = 4, defer: int = 8):
        check_int("window", window, 0), check_int("sinks", sinks, 0)
        for name, v in (("span", span), ("kernel", kernel)):
            if check_int(name, v, 1) % 2 == 0:
                raise ValueError(f"{name} must be an odd positive int, got {v}")
        check_share("shared", shared)
        check_int("observe", observe, 1)
        self.observe, self.window, self.span, self.kernel = observe, window, span, kernel
        self.shared, self.sinks = shared, sinks
        self.defer = check_int("defer", defer, 0)

    def query_mask(self, valid: Tensor, vision: Tensor | None) -> Tensor:
        return edge_tokens(valid, 0, self.observe)

    def score(self, stats: Stats) -> Tensor:
        return max_pool_keys(stats.attn, self.kernel)

    def consensus(self, stats: Stats) -> Tensor:
        """float32 [B, N]: upper layers' normalised attention, averaged, span-pooled."""
        upper = stats.attn[stats.num_layers // 2:]
        share = upper / upper.sum(-1, keepdim=True).clamp_min(1e-30)
        return max_pool_keys(share.mean(dim=(0, 2)), self.span)

    def evict(self, scores: Tensor, n: Tensor, stats: Stats) -> list[Tensor]:
        protected = self.protected(stats)
        consensus = self.consensus(stats).masked_fill(protected | ~stats.valid, float("-inf"))
        order = torch.sort(consensus, dim=-1, descending=True, stable=True).indices
        held = int(protected.sum(-1).max())
        free = int(stats.valid.sum(-1).min()) - held
        keep = []
        for l, n_l in enumerate(n.tolist()):
            k = max(0, min(round(self.shared * n_l), n_l - held, free))
            agreed = torch.zeros_like(protected).scatter_(1, order[:, :k], True) & stats.valid
            keep.append(select_keep(scores[l], n_l, protected | agreed, stats.valid))
        return keep
