"""Which keys a query sees, in one place: every mask of kvpolicy (prefill, decode, plain
forwards) and of the kernels' references is built from these two helpers."""
from __future__ import annotations

import torch
from torch import Tensor


def causal(q: int, s: int, device=None) -> Tensor:
    """bool [q, s]: query row i, the (s - q + i)-th of s positions, sees keys j <= s - q + i."""
    return torch.ones(q, s, dtype=torch.bool, device=device).tril(s - q)


def visible(key_pos: Tensor, query_pos: Tensor | None = None, window: int | None = None, *,
            later: bool = True, order: Tensor | None = None) -> Tensor:
    """bool, the broadcast of its inputs: a key is visible when it holds a token (key_pos
    int64 >= 0; -1 empty or padding, -2 unusable), is not after the query by position
    (key_pos <= query_pos, unless ``later`` is allowed), lies within its sliding window
    (key_pos > query_pos - window; query_pos int64) and, given ``order`` (bool from
    ``causal``: by index), is not after it by index."""
    out = key_pos >= 0
    if not later:
        out = out & (key_pos <= query_pos)
    if window is not None:
        out = out & (key_pos > query_pos - window)
    if order is not None:
        out = out & order
    return out
