"""Splitting a total token count across layers: the shared arithmetic of ``allocate``."""
from __future__ import annotations

import torch
from torch import Tensor


def take_cheapest(price: Tensor, total: int, lo: Tensor | int, hi: Tensor | int,
                  tiebreak: Tensor | None = None) -> Tensor:
    """int64 [L]: start every layer at ``lo`` and hand out tokens cheapest first.

    price: float [L, K], price[l, k - 1] = price of layer l's k-th token, non-decreasing
    in k (K >= max hi). Only tokens lo_l < k <= hi_l are sold; ties go to the smaller
    ``tiebreak`` (same shape), then to the earlier layer. Spending stops at ``total``.
    Because the order is fixed, a larger total never lowers any layer (monotone).
    """
    L, K = price.shape
    lo = torch.as_tensor(lo, dtype=torch.long).expand(L).clone()
    hi = torch.maximum(torch.as_tensor(hi, dtype=torch.long).expand(L), lo)
    extra = total - int(lo.sum())
    if extra <= 0:
        return lo
    k = torch.arange(1, K + 1)
    for_sale = (k[None, :] > lo[:, None]) & (k[None, :] <= hi[:, None])
    price = price.double().masked_fill(~for_sale, float("nan")).flatten()  # NaN sorts last
    order = torch.arange(L * K)
    if tiebreak is not None:
        order = torch.sort(tiebreak.double().flatten(), stable=True).indices
    order = order[torch.sort(price[order], stable=True).indices]
    sold = order[: min(extra, int(for_sale.sum()))]
    return lo + torch.bincount(sold // K, minlength=L)


def apportion(weights: Tensor, total: int, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """int64 [L]: ``total`` tokens split in proportion to ``weights`` within [lo, hi].

    Layer l's k-th token costs k / w_l (a divisor method): the result is within one
    token of lambda * w_l clipped to [lo, hi], sums to min(total, sum(hi)) when
    total >= sum(lo), equal weights differ by at most one (extra to the first layers).
    weights: float [L] >= 0 (a zero weight is served last).
    """
    K = int(torch.as_tensor(hi).max())
    k = torch.arange(1, K + 1, dtype=torch.float64)
    return take_cheapest(k[None, :] / weights.double().clamp_min(0).cpu()[:, None], total, lo, hi)


def equal_split(num_layers: int, total: int, lo: Tensor | int, hi: Tensor | int) -> Tensor:
    """int64 [L]: ``total`` split equally within [lo, hi] (remainder to the first layers)."""
    return apportion(torch.ones(num_layers), total, lo, hi)
