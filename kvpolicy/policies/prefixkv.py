"""PrefixKV: one global retention level, each layer keeps the shortest prefix reaching it."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import torch
from torch import Tensor

from ..allocation import apportion, take_cheapest
from ..budget import Budget
from ..policy import Plan, Policy, Requirements, Stats, check_int
from ..registry import register_policy

DISTANCE = 25  # fixed-point elimination drops the token this far before the prompt's end


@register_policy("prefixkv")
class PrefixKV(Policy):
    # the rule: its card, registry/cards/prefixkv.toml (also its __doc__)
    min_scored = 1
    queries = "all"

    def __init__(self, sinks: int = 4, window: int = 1, shared_heads: bool = True,
                 ratios: str | Sequence[float] = "", fixed_point: bool = False):
        self.sinks = check_int("sinks", sinks, 0)
        self.window = check_int("window", window, 1)
        self.shared_heads = shared_heads
        self.ratios = ratios if isinstance(ratios, str) else tuple(float(r) for r in ratios)
        self.weights = load_ratios(ratios)
        self.fixed_point = fixed_point

    def requirements(self) -> Requirements:
        """Fixed-point elimination holds a fixed size while decoding."""
        needs = super().requirements()
        return dataclasses.replace(needs, decode="evict") if self.fixed_point else needs

    def score(self, stats: Stats) -> Tensor:
        if self.shared_heads:
            return stats.attn.mean(dim=2, keepdim=True).expand_as(stats.attn)
        return stats.attn

    def curves(self, stats: Stats) -> tuple[Tensor, Tensor]:
        """(sorted importance, C) float64 [L, N_pad]: per layer, descending and cumulative."""
        imp = stats.attn.double().sum(dim=(1, 2))
        imp = imp / imp.sum(-1, keepdim=True).clamp_min(1e-30)
        ordered = torch.sort(imp, dim=-1, descending=True).values
        return ordered, ordered.cumsum(-1)

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        if not self.fixed_point:
            return self.prompt_sizes(stats, total, floor)
        L, N, M = stats.num_layers, stats.num_tokens, stats.max_new_tokens
        lo = min(floor, N)
        prompt = min(max(round(total * N / (N + M)), lo * L), N * L)
        return apportion(self.prompt_sizes(stats, prompt, lo).double(), total, floor, N + M)

    def prompt_sizes(self, stats: Stats, total: int, floor: int) -> Tensor:
        """int64 [L]: prompt tokens per layer, by the calibrated ratios or the search."""
        if self.weights is None:
            return self.level(stats, total, floor)[1]
        if len(self.weights) != stats.num_layers:
            raise ValueError(f"prefixkv: {len(self.weights)} calibrated ratios for a "
                             f"{stats.num_layers}-layer model")
        return apportion(self.weights, total, floor, stats.num_tokens)

    def level(self, stats: Stats, total: int, floor: int) -> tuple[float, Tensor]:
        """(p, n): the shared level p and the layer sizes n [L] (prefix + protected).

        Raising p from 0, layer l needs its k-th token once p exceeds C_l(k - 1 - P), P
        protected tokens counted after the prefix. Selling tokens in that order is the
        reference's bisection for the largest p with sum_l n_l(p) <= total, done exactly
        by one sort; tokens left over go to the layers at the next level, larger next
        gain first.
        """
        ordered, curve = self.curves(stats)
        P = int(self.protected(stats).sum(-1).max())
        lo, hi = floor, stats.num_tokens
        shift = torch.zeros_like(curve[:, :P + 1])
        threshold = torch.cat([shift, curve], dim=1)[:, :curve.shape[1]]
        gain = torch.cat([shift[:, :P], ordered], dim=1)[:, :curve.shape[1]]
        n = take_cheapest(threshold, total, lo, hi, tiebreak=-gain)
        last_sold = threshold.gather(1, (n - 1)[:, None]).squeeze(1)
        return float(torch.where(n > lo, last_sold, 0.0).max()), n

    def victim_priority(self, scores: Tensor, positions: Tensor, step_pos: Tensor,
                        size: Tensor) -> Tensor:
        """Fixed-point elimination (Elastic Cache, as the reference): the first
        ``frozen(size)`` slots (the oldest kept tokens) stay; the oldest other goes."""
        slots = torch.arange(positions.shape[-1], device=positions.device)
        head = slots < self.frozen(torch.as_tensor(size, device=positions.device))
        return positions.float().masked_fill(head, torch.inf)

    def frozen(self, size: int | Tensor) -> Tensor:
        """Slots never overwritten: size - 25, or size // 2 below 26 (the reference's
        rule for a layer that kept ``size`` tokens), and never fewer than the sinks."""
        size = torch.as_tensor(size)
        return torch.where(size > DISTANCE, size - DISTANCE, size // 2).clamp_min(self.sinks)


def load_ratios(ratios: str | Sequence[float]) -> Tensor | None:
    """float64 [L] positive per-layer weights from a sequence or a JSON file; None for ""."""
    if isinstance(ratios, str):
        if not ratios:
            return None
        with open(ratios) as f:
            ratios = json.load(f)
    weights = torch.tensor([float(r) for r in ratios], dtype=torch.float64)
    if weights.numel() == 0 or not bool((weights > 0).all()):
        raise ValueError(f"prefixkv ratios must be positive per-layer fractions, got {ratios!r}")
    return weights


class Calibration(PrefixKV):
    """A per-prompt PrefixKV whose ``plan`` also records each prompt's kept fraction per
    layer."""

    def __init__(self, sinks: int = 4, window: int = 1, shared_heads: bool = True):
        super().__init__(sinks, window, shared_heads)
        self.fractions: list[list[float]] = []

    def plan(self, stats: Stats, budget: Budget) -> Plan:
        plan = super().plan(stats, budget)
        self.fractions.append([k / stats.budget_tokens for k in plan.kept])
        return plan

    def ratios_mean(self) -> list[float]:
        """Per-layer kept fractions averaged over the recorded prompts."""
        return torch.tensor(self.fractions, dtype=torch.float64).mean(0).tolist()


def calibrate(model, samples, budget: float | int = 0.1, path: str | None = None,
              **params) -> list[float]:
    """PrefixKV's offline mode: run the per-prompt search on each calibration sample and
    average the per-layer kept fractions; use them as ``PrefixKV(ratios=...)``.

    model: a transformers model kvpolicy can patch; samples: iterable of ``generate``
    keyword dicts (e.g. a tokenizer's output), one prompt batch each; budget: as in
    ``apply``; path: also write the ratios there as a JSON list; params: PrefixKV's
    ``sinks``, ``window``, ``shared_heads`` (use the same ones with the ratios).
    """
    from ..apply import apply

    recorder = Calibration(**params)
    with apply(model, recorder, budget=budget), torch.no_grad():
        for sample in samples:
            model.generate(**sample, max_new_tokens=1, do_sample=False)
    if not recorder.fractions:
        raise ValueError("calibrate needs at least one sample")
    ratios = recorder.ratios_mean()
    if path is not None:
        with open(path, "w") as f:
            json.dump(ratios, f)
    return ratios
