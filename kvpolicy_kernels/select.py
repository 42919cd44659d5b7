"""Top-k token selection that always keeps the protected tokens (plain torch: sort does it well)."""
from __future__ import annotations

import torch
from torch import Tensor


def select_keep(scores: Tensor, n: int, protected: Tensor, valid: Tensor) -> Tensor:
    """Indices of the ``n`` tokens to keep per (sequence, KV head), sorted ascending.

    scores: float [B, G, N] (higher = keep); protected: bool [B, N] or [B, G, N], always
    kept; valid: bool [B, N], False = padding, taken only when a sequence has fewer than
    ``n`` real tokens. Ties go to the later position. Returns int64 [B, G, n].
    """
    B, G, N = scores.shape
    if not 1 <= n <= N:
        raise ValueError(f"cannot keep {n} of {N} tokens")
    if protected.dim() == 2:
        protected = protected[:, None, :]
    key = scores.float().masked_fill(protected, float("inf"))
    key = key.masked_fill(~valid[:, None, :], float("-inf")).expand(B, G, N)
    # A stable descending sort of the reversed row puts the later position first among ties.
    order = torch.sort(key.flip(-1), dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.sort(N - 1 - order, dim=-1).values
