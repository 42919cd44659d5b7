"""Which tokens a layer keeps: the shared selection helpers of the policies (plain torch)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def edge_tokens(valid: Tensor, first: int, last: int) -> Tensor:
    """bool [B, N]: the first ``first`` and the last ``last`` real tokens of each row."""
    rank = torch.cumsum(valid.long(), dim=-1) - 1  # index among real tokens
    count = valid.sum(-1, keepdim=True)
    return valid & ((rank < first) | (rank >= count - last))


POST_VISION_FALLBACK = 8  # post-vision queries of a prompt without vision tokens: its last 8


def post_vision(valid: Tensor, vision: Tensor | None, fallback: int = POST_VISION_FALLBACK) -> Tensor:
    """bool [B, N]: real tokens after each row's last vision token (the last ``fallback``
    real tokens in rows without one)."""
    if vision is None:
        vision = torch.zeros_like(valid)
    N = valid.shape[-1]
    pos = torch.arange(N, device=valid.device)
    last_vision = torch.where(vision, pos, -1).amax(-1, keepdim=True)
    after = valid & (pos > last_vision) & ~vision
    has_vision = vision.any(-1, keepdim=True)
    return torch.where(has_vision, after, edge_tokens(valid, 0, fallback))


def max_pool_keys(scores: Tensor, kernel: int, upto: Tensor | None = None) -> Tensor:
    """float [..., N]: ``scores`` max-pooled along keys with an odd ``kernel`` (stride 1).

    upto: optional bool [..., N] broadcastable mask of the keys that take part; the others
    keep their own score and lend none to their neighbours (SnapKV pools keys[:-window]).
    """
    shape = scores.shape
    x = scores if upto is None else scores.masked_fill(~upto, float("-inf"))
    pooled = F.max_pool1d(x.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    pooled = pooled.reshape(shape)
    return pooled if upto is None else torch.where(upto, pooled, scores)
