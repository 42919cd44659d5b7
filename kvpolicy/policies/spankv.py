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
        """Per layer: its protected tokens, the consensus's top ``shared`` x n_l, then its
        own top scores, over the slots the layer holds (``Stats.of_layer``: a continued
        cache's narrower layers are left-padded)."""
        consensus = self.consensus(stats)
        common = self.agreement(consensus, stats)
        keep = []
        for l, n_l in enumerate(n.tolist()):
            layer = stats.of_layer(l)
            own = common if layer is stats else self.agreement(consensus, layer)
            protected, order, held, free = own
            k = max(0, min(round(self.shared * n_l), n_l - held, free))
            agreed = torch.zeros_like(protected).scatter_(1, order[:, :k], True) & layer.valid
            keep.append(select_keep(scores[l], n_l, protected | agreed, layer.valid))
        return keep

    def agreement(self, consensus: Tensor, stats: Stats) -> tuple[Tensor, Tensor, int, int]:
        """For the slots ``stats.valid`` holds: the protected tokens bool [B, N], the
        unprotected slots by consensus (float32 [B, N]), best first (int64 [B, N]), the most
        protected tokens of a row, and how many unprotected slots every row holds."""
        protected = self.protected(stats)
        masked = consensus.masked_fill(protected | ~stats.valid, float("-inf"))
        order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
        held = int(protected.sum(-1).max())
        return protected, order, held, int(stats.valid.sum(-1).min()) - held
