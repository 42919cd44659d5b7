"""Splitting a total token count across layers: the shared arithmetic of ``allocate``."""
from __future__ import annotations

import torch
from torch import Tensor


def apportion(weights: Tensor, total: int, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """int64 [L]: ``total`` tokens split in proportion to ``weights`` within [lo, hi].

    Each layer starts at ``lo``; above it, layer l earns its k-th token at "price" k / w_l
    and tokens go out cheapest first (ties to the earlier layer) until ``total`` is spent
    or every layer is at ``hi``. This is a divisor method: the result is within one token
    of ``lambda * w_l`` clipped to [lo, hi], sums to min(total, sum(hi)) when
    total >= sum(lo), and never decreases when ``total`` grows (house monotone).
    weights: float [L] >= 0; lo, hi: int or int [L].
    """
    L = weights.shape[0]
    w = weights.double().clamp_min(0).cpu()
    lo = torch.as_tensor(lo, dtype=torch.long).expand(L).clone()
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.long).expand(L), lo)
    extra = total - int(lo.sum())
    if extra <= 0:
        return lo
    k = torch.arange(1, int(hi.max()) + 1, dtype=torch.float64)
    price = k[None, :] / w[:, None]  # +inf where w == 0: served after every weighted layer
    eligible = (k[None, :] > lo[:, None]) & (k[None, :] <= hi[:, None])
    price = price.masked_fill(~eligible, float("nan"))  # NaN sorts after +inf
    order = torch.sort(price.flatten(), stable=True).indices[: min(extra, int(eligible.sum()))]
    return lo + torch.bincount(order // price.shape[1], minlength=L)
