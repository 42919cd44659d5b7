"""Expected Attention: each key's attention expected from the future queries, modelled as a
Gaussian fitted to the prompt's queries (Devoto et al., 2025), times its value's norm."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ..heads import head_valid_or
from ..policy import Policy, Stats, check_int
from ..registry import register_policy
from ..selection import edge_tokens


@register_policy("expected_attention")
class ExpectedAttention(Policy):
    # the rule: its card, registry/cards/expected_attention.toml (also its __doc__)
    queries = "none"  # no attention is read: query statistics, keys and value norms
    needs_keys = True
    query_stats = True

    def __init__(self, n_future_positions: int = 512, sinks: int = 4, window: int = 8,
                 use_covariance: bool = True, use_vnorm: bool = True, epsilon: float = 0.0):
        for name, flag in (("use_covariance", use_covariance), ("use_vnorm", use_vnorm)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if epsilon < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.n_future_positions = check_int("n_future_positions", n_future_positions, 1)
        self.future_positions = n_future_positions
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 0)
        self.use_covariance, self.use_vnorm, self.epsilon = use_covariance, use_vnorm, epsilon

    def score(self, stats: Stats) -> Tensor:
        """float32 [L, B, G, N]: softmax over the non-sink keys (the first ``sinks`` each head
        of each layer holds excluded) of z = mu'.k / sqrt(D) +
        k.S'.k / (2 D) per query head (mu', S' the query mean and covariance under the
        rotary averaged over the future positions), mean over the group, x ||v||."""
        L, B, G, N, D = stats.keys.shape
        mean, cov = self.future_moments(stats)  # [L, B, H, D], [L, B, H, D, D]
        keys = stats.keys.float().repeat_interleave(stats.heads_per_group, dim=2)  # [L, B, H, N, D]
        z = torch.einsum("lbhnd,lbhd->lbhn", keys, mean) / math.sqrt(D)
        if self.use_covariance:
            z = z + torch.einsum("lbhnd,lbhde,lbhne->lbhn", keys, cov, keys) / (2 * D)
        held = head_valid_or(stats.valid, stats.head_valid, (L, B, G, N))  # each layer's, each head's
        scored = (held & ~edge_tokens(held, self.sinks, 0)).repeat_interleave(stats.heads_per_group, 2)
        z = z.masked_fill(~scored, -torch.inf)
        probs = torch.softmax(z, dim=-1).nan_to_num(0.0)
        probs = probs.view(L, B, G, stats.heads_per_group, N).mean(3)
        if self.use_vnorm:
            probs = (probs + self.epsilon) * stats.value_norms
        return probs

    def future_moments(self, stats: Stats) -> tuple[Tensor, Tensor]:
        """(mu' [L, B, H, D], S' [L, B, H, D, D]): the pre-RoPE query mean and covariance
        under R = mean over the future positions p of (diag(cos_p) + diag(sin_p) P), P the
        rotate-half matrix [[0, -I], [I, 0]]."""
        cos, sin = stats.future_rotary.mean(2).unbind(1)  # [B, D] each
        D = cos.shape[-1]
        half = torch.eye(D, device=cos.device)
        turn = torch.cat([-half[D // 2:], half[:D // 2]])  # P x = (-x2, x1)
        rot = torch.diag_embed(cos) + sin[:, :, None] * turn  # [B, D, D]
        mean = torch.einsum("bij,lbhj->lbhi", rot, stats.query_mean)
        cov = torch.einsum("bij,lbhjk,bmk->lbhim", rot, stats.query_cov, rot)
        return mean, cov
