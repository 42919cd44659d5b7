"""SpanKV (ours): the question's attention, pooled over all layers, keeps whole spans."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..allocation import apportion
from ..policy import Policy, Stats
from ..registry import register_policy


@register_policy("spankv")
class SpanKV(Policy):
    """Score: attention of the last ``window`` prompt queries (the question), each layer's
    share normalised to sum to 1; with ``share_layers`` averaged over layers and heads so
    every layer keeps the same tokens. Max-pooled along keys with ``span`` so a kept peak
    brings its neighbours (a code's digits, a name's pieces). Equal layer budgets; the
    window and ``sinks`` are kept."""

    queries = "window"

    def __init__(self, window: int = 32, span: int = 7, share_layers: bool = True, sinks: int = 0):
        if span < 1 or span % 2 == 0:
            raise ValueError(f"span must be an odd positive int, got {span}")
        self.window, self.span, self.share_layers, self.sinks = window, span, share_layers, sinks

    def score(self, stats: Stats) -> Tensor:
        L, B, G, N = stats.attn.shape
        share = stats.attn / stats.attn.sum(-1, keepdim=True).clamp_min(1e-30)
        if self.share_layers:
            share = share.mean(dim=(0, 2), keepdim=True).expand(L, B, G, N)
        pooled = F.max_pool1d(share.reshape(-1, 1, N), self.span, stride=1, padding=self.span // 2)
        return pooled.reshape(L, B, G, N)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        return apportion(torch.ones(stats.num_layers), total, floor, stats.num_tokens)
