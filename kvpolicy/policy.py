"""The policy abstraction: score tokens, allocate the budget across layers, evict per layer."""
from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from torch import Tensor

from . import budget as arithmetic
from .allocation import equal_split
from .budget import Budget, Decode
from .heads import select_heads, split_heads
from .selection import edge_tokens, post_vision, select_keep

log = logging.getLogger("kvpolicy")

QuerySet = Literal["all", "window", "post_vision", "none"]


@dataclass(frozen=True)
class Requirements:
    """What a policy needs from an engine, declared once per policy instance
    (``Policy.requirements()``) and checked in one place per engine.

    queries: which prompt queries the score op counts; tau: > 0 asks the score op for the
    count of probabilities under tau x row max (``sparsity``); decode: "append", or "evict"
    for a fixed size while decoding; defer: decode steps observed over the whole prompt
    before the plan; positions: "original" (keys rotated at their true positions) or
    "cache" (rotary positions inside the cache). ``vision``: whether the vision-token
    positions are needed.

    Appended fields (defaults: what the earlier policies need):
    needs_keys: fill ``Stats.keys`` with the scored layers' cached keys (KeyDiff).
    running: how an evicting layer's running ``scores`` follow decode steps: "sum" adds
        each step's attention (H2O), "last" keeps only the last step's (TOVA); a new turn's
        prompt attention replaces "last" scores rather than adding to them.
    reconstruct: after a first prompt the engine runs the policy's reconstruction passes
        (``Policy.reconstruction``) on the uncompressed cache and fills ``Stats.attn`` with
        the max (not the sum) of their attention on each key (KVzip); a later turn is
        appended, not re-scored.
    query_stats: fill ``Stats.query_mean`` / ``query_cov`` (the pre-RoPE queries of the
        forward's real tokens after the policy's first ``sinks``) and ``Stats.value_norms``
        (Expected Attention).
    future_positions: F > 0 fills ``Stats.future_rotary`` with the model's rotary at the
        F positions after the prompt.
    per_head: plans may keep a different count per KV head (``Plan.counts``); the engine
        stores each head's rows on their own (kvpolicy.heads).
    contribution: with ``reconstruct``, a pass query t's probability on key i in query head
        h is weighted by ||W_O^(h) v_i|| / ||x_t|| before the max (KVzip+: the size of what
        the key adds to the layer's output, over the size of the attention's input x_t;
        W_O^(h) is head h's slice of the attention's ``o_proj``).
    """

    queries: QuerySet
    tau: float
    decode: Decode
    defer: int
    positions: str
    needs_keys: bool = False
    running: Literal["sum", "last"] = "sum"
    reconstruct: bool = False
    query_stats: bool = False
    future_positions: int = 0
    per_head: bool = False
    contribution: bool = False

    @property
    def sparsity(self) -> bool:
        return self.tau > 0

    @property
    def vision(self) -> bool:
        return self.queries == "post_vision"


@dataclass
class Stats:
    """What the score op accumulated at prefill, for the scored layers of one prompt batch.

    attn: float32 [L, B, G, N]: attention probability each key received, summed over the
        counted queries and over the query heads of its KV group (0 where nothing counted).
    queries: bool [B, N]: the prompt positions counted as queries.
    valid: bool [B, N]: False at (left) padding.
    heads_per_group: query heads per KV head (H / G).
    vision: bool [B, N] or None: vision-token positions (VLMs).
    below: float32 [L, B, G] or None: count of counted probabilities < tau x row max.
    max_new_tokens: decode steps planned for this generate call (a fixed-size policy's
        budget is a fraction of the prompt and these; appending policies need not read it).
    num_seen: tokens the budget is a fraction of when it differs from the valid keys (a
        continued cache: everything seen so far, of which the keys are what is left); None
        means ``num_tokens``.

    Appended fields, filled only when the policy's ``Requirements`` ask for them:
    keys: [L, B, G, N, D] in the model's dtype (needs_keys): each scored layer's cached
        keys (post-RoPE, as attention uses them), aligned with ``attn``; 0 at padding.
    query_mean: float32 [L, B, H, D] (query_stats): the mean of the pre-RoPE queries (as
        the layer's query projection, and norm where it has one, gives them) of the
        forward's real tokens after the policy's first ``sinks``, per query head.
    query_cov: float32 [L, B, H, D, D] (query_stats): their covariance (population, 1/n).
    value_norms: float32 [L, B, G, N] (query_stats): each cached value's L2 norm; 0 at
        padding.
    future_rotary: float32 [B, 2, F, D] (future_positions = F): cos and sin of the model's
        rotary at each row's F positions after its prompt (rotate-half convention).
    head_valid: bool [L, B, G, N] or None: which KV heads hold each token, when they differ
        (a continued cache planned per head, whose heads kept different tokens, or whose
        layers kept different counts: ``of_layer``); None: every head of every layer holds
        every valid token.
    prompt_attn: float32 [L, B, G, N] or None (reconstruct, with queries other than
        "none"): the attention the first prompt's counted queries gave each key, summed over
        them and the query heads of its KV group (what ``attn`` holds for other policies).
    For ``Requirements.reconstruct`` policies ``attn`` holds the max, over the
    reconstruction queries and the query heads of the KV group, of the probability each
    key received (not a sum), each weighted as ``Requirements.contribution`` says when set.
    """

    attn: Tensor
    queries: Tensor
    valid: Tensor
    heads_per_group: int = 1
    vision: Tensor | None = None
    below: Tensor | None = None
    max_new_tokens: int = 0
    num_seen: int | None = None
    keys: Tensor | None = None
    query_mean: Tensor | None = None
    query_cov: Tensor | None = None
    value_norms: Tensor | None = None
    future_rotary: Tensor | None = None
    head_valid: Tensor | None = None
    prompt_attn: Tensor | None = None

    @property
    def num_layers(self) -> int:
        return self.attn.shape[0]

    @property
    def num_tokens(self) -> int:
        """N: the longest sequence's real length (the padded length minus common padding)."""
        return int(self.valid.sum(-1).max())

    @property
    def budget_tokens(self) -> int:
        """The token count a fractional budget applies to."""
        return self.num_tokens if self.num_seen is None else self.num_seen

    def of_layer(self, l: int) -> Stats:
        """These stats with ``valid`` [B, N] the slots layer l holds (with ``head_valid``:
        any of its KV heads; a continued cache's layers hold different counts, the
        narrower ones left-padded)."""
        if self.head_valid is None:
            return self
        return dataclasses.replace(self, valid=self.head_valid[l].any(1))

    def causal_entries(self) -> Tensor:
        """float32 [B]: per query head, the (counted query, visible real key) pairs."""
        visible = torch.cumsum(self.valid.float(), dim=-1)  # real keys at or before each position
        return (visible * self.queries).sum(-1)


@dataclass
class Plan:
    """What the cache does with one prompt: per layer the kept indices and the slots.

    keep: per layer int64 [B, G, n_l], sorted, unique, in [0, padded length).
    capacity: per layer slots (>= n_l).
    counts: None (every KV head keeps its n_l) or, for a per-head plan, per layer int64
    [B, G]: head (b, g) keeps keep[l][b, g, :counts[l][b, g]] (sorted, unique); the rest of
    its row repeats its last index and is not kept. For a policy that holds a fixed size while
    decoding (decode "evict") it is that size, the policy's allocation. For appending
    policies it is deprecated: the engine sizes its own buffers (the kept rows plus the
    call's new tokens, rounded to its bucket), and a policy need not set it meaningfully.
    """

    keep: list[Tensor]
    capacity: list[int]
    counts: list[Tensor] | None = None

    @property
    def kept(self) -> list[int]:
        """Per layer the tokens a KV head keeps (per-head plans: the most any head keeps)."""
        return [k.shape[-1] for k in self.keep]

    @property
    def entries(self) -> list[Tensor]:
        """Per layer int64 [B, G]: the tokens each KV head keeps."""
        if self.counts is not None:
            return self.counts
        return [torch.full(k.shape[:2], k.shape[-1], device=k.device) for k in self.keep]


class Policy:
    """A KV-cache policy: ``score`` tokens, ``allocate`` the total across layers, ``evict``
    per layer. The defaults are the plain rule (scores = the accumulated attention, equal
    layer budgets, protected tokens plus the top scores); a policy overrides what differs.

    Class attributes: ``name`` (registry name), ``queries`` (which prompt queries the
    score op counts: all, the last ``window``, post-vision, or none), ``tau`` (> 0 asks
    the score op for sparsity counts), ``decode`` ("append", or "evict" for policies that
    hold a fixed size while decoding: see FixedSizePolicy), ``min_scored`` (a layer's
    floor above its protected tokens), ``defer`` (decode steps of a generate call that run
    on the whole prompt before it is compacted, their queries counted with the prompt's).
    Constructor parameters are the policy's tunables; ``params()`` lists them with their
    values.
    """

    name: ClassVar[str] = ""
    queries: ClassVar[QuerySet] = "all"
    tau: ClassVar[float] = 0.0
    decode: ClassVar[Decode] = "append"
    min_scored: ClassVar[int] = 0  # tokens per layer chosen by score beyond the protected

    sinks: int = 0
    window: int = 8
    protects: ClassVar[str] = "the first `sinks` and the last `window` tokens"
    positions: str = "original"  # "cache": rotary positions inside the cache (kvpolicy.rotary)
    defer: int = 0
    needs_keys: ClassVar[bool] = False
    running: ClassVar[str] = "sum"
    reconstruct: ClassVar[bool] = False
    query_stats: ClassVar[bool] = False
    future_positions: int = 0
    per_head: bool = False  # plans a count per KV head (kvzip's own rule; apply's per_head sets it on a copy)

    def requirements(self) -> Requirements:
        """What this policy needs from an engine (see Requirements); a policy whose needs
        depend on its parameters overrides this, never the class attributes."""
        return Requirements(self.queries, self.tau, self.decode, self.defer, self.positions,
                            self.needs_keys, self.running, self.reconstruct, self.query_stats,
                            self.future_positions, self.per_head)

    # ---- the three steps -------------------------------------------------------------
    def score(self, stats: Stats) -> Tensor:
        """float32 [L, B, G, N_pad] token scores, higher = keep."""
        return stats.attn

    def allocate(self, stats: Stats, total: int, floor: int) -> Tensor:
        """int64 [L] tokens per layer, floor <= n_l <= room, sum(n) <= total (or, for a
        policy selecting across heads itself, int64 [L, B, G] tokens per KV head)."""
        return equal_split(stats.num_layers, total, floor, self.room(stats))

    def evict(self, scores: Tensor, n: Tensor, stats: Stats) -> list[Tensor]:
        """Per layer int64 [B, G, min(n_l, N)]: protected tokens, then the top scores (n
        int64 [L, B, G] per KV head: per layer [B, G, max count], see heads.select_heads)."""
        layers = [stats.of_layer(l) for l in range(len(n))]
        if n.dim() == 3:
            hv = stats.head_valid
            return [select_heads(scores[l], n[l], self.protected(s), s.valid,
                                 None if hv is None else hv[l]) for l, s in enumerate(layers)]
        return [select_keep(scores[l], min(int(n[l]), s.num_tokens), self.protected(s), s.valid)
                for l, s in enumerate(layers)]

    # ---- what the steps need ---------------------------------------------------------
    def protected(self, stats: Stats) -> Tensor:
        """bool [B, N_pad]: the first ``sinks`` and last ``window`` real tokens."""
        return edge_tokens(stats.valid, self.sinks, self.window)

    def protected_by_layer(self, stats: Stats) -> Tensor:
        """bool [L, B, N_pad]: ``protected`` among the slots each layer holds."""
        return torch.stack([self.protected(stats.of_layer(l)) for l in range(stats.num_layers)])

    def query_mask(self, valid: Tensor, vision: Tensor | None) -> Tensor:
        """bool [B, N_pad]: the prompt positions the score op counts as queries."""
        if self.queries == "all":
            return valid.clone()
        if self.queries == "window":
            return edge_tokens(valid, 0, self.window)
        if self.queries == "none":
            return torch.zeros_like(valid)
        return post_vision(valid, vision)

    def min_tokens(self) -> int:
        """Tokens per layer an int budget must at least hold (the fixed protected ones)."""
        return max(1, self.sinks + self.window + self.min_scored)

    def prompt_min_tokens(self, valid: Tensor, vision: Tensor | None) -> int:
        """Tokens per layer an int budget must hold for one prompt (valid bool [B, N],
        vision bool [B, N] | None): its protected tokens plus ``min_scored``, at least
        ``min_tokens()`` (they differ where the protected span depends on the prompt)."""
        B, N = valid.shape
        probe = Stats(valid.new_zeros((1, B, 1, N), dtype=torch.float32), valid, valid, vision=vision)
        return max(self.min_tokens(), int(self.protected(probe).sum(-1).max()) + self.min_scored)

    def room(self, stats: Stats) -> int:
        """Most tokens a layer can hold (see budget.room)."""
        return arithmetic.room(stats.num_tokens, stats.max_new_tokens, self.requirements().decode)

    def total(self, budget: Budget, stats: Stats) -> int:
        """Total tokens kept over all layers for this prompt."""
        counted = arithmetic.room(stats.budget_tokens, stats.max_new_tokens,
                                  self.requirements().decode)
        return budget.total(counted, stats.num_layers)

    def capacity(self, n: Tensor, stats: Stats) -> list[int]:
        """Per-layer slots for allocation ``n`` (see budget.capacity): a fixed-size policy's
        size per layer; for appending policies deprecated (engines size their buffers)."""
        return [arithmetic.capacity(int(x), stats.max_new_tokens, self.requirements().decode)
                for x in n]

    def floor(self, stats: Stats) -> int:
        """Tokens every layer keeps at least: the protected ones plus ``min_scored``."""
        protected = int(self.protected(stats).sum(-1).max())
        return arithmetic.layer_floor(protected, self.min_scored, self.room(stats))

    def plan(self, stats: Stats, budget: Budget) -> Plan:
        """Run score -> allocate -> evict for one prompt batch.

        A budget too small for the protected tokens keeps exactly those (plus
        ``min_scored``) in every layer, with one warning naming the prompt length and the
        effective budget.
        """
        floor = self.floor(stats)
        total = min(self.total(budget, stats), self.room(stats) * stats.num_layers)
        L, N = stats.num_layers, stats.num_tokens
        if total < floor * L:
            log.warning(
                "kvpolicy %s: budget %s of a %d-token prompt cannot hold the %d protected "
                "tokens per layer; keeping exactly those in every layer, so the allocation has "
                "nothing to split (effective budget %.3f)",
                self.name, budget, N, floor, floor / N)
            total = floor * L
        n = self.allocate(stats, total, floor)
        scores = self.score(stats)
        if self.per_head and n.dim() == 1:
            n = split_heads(scores, n, self.protected_by_layer(stats), stats.valid, stats.head_valid)
        keep = self.evict(scores, n, stats)
        if n.dim() == 1:
            return Plan(keep, self.capacity(n, stats))
        return Plan(keep, self.capacity(n.amax((1, 2)), stats), list(n))

    # ---- reconstruction (policies with Requirements.reconstruct) ----------------------
    def reconstruction(self, context: Tensor, chunk: int | None) -> list[tuple[int, int, Tensor]]:
        """The reconstruction passes over context ids int64 [1, n]: (start, stop, ids int64
        [1, q]), each pass scoring context positions [start, stop). ``chunk``: compress's
        chunk_size, whose chunks (``kvpolicy.chunks.chunk_spans``) a pass per chunk
        matches (other splits still run, as more passes); None: the policy's own. Refuses,
        by name, what it lacks."""
        raise NotImplementedError(f"{self.name} runs no reconstruction passes")

    # ---- decode hook (policies with decode == "evict") -------------------------------
    def victim_priority(self, scores: Tensor, positions: Tensor, step_pos: Tensor,
                        size: Tensor) -> Tensor:
        """float32 [B, G, S]: which slot a new token overwrites (the lowest); +inf = never.

        scores: float32 [B, G, S] running attention scores of the slots; positions: int64
        [B, G, S] position id of each slot's token (-1 = empty, filled first; -2 = beyond
        the row's size, never used); step_pos: int64 [B], the new token's position id;
        size: int64 [B, 1, 1], each row's fixed size (its slots in use when full).
        Fixed shapes, no host syncs: it runs inside the compiled decode step.
        """
        raise NotImplementedError(f"{self.name} does not evict while decoding")

    # ---- introspection --------------------------------------------------------------
    @classmethod
    def defaults(cls) -> dict[str, object]:
        """Constructor parameters with their defaults."""
        sig = inspect.signature(cls.__init__)
        return {p.name: p.default for p in list(sig.parameters.values())[1:]
                if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}

    def params(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.defaults()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as a policy's integer parameter >= ``minimum``, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_share(name: str, value: object) -> float:
    """``value`` as a policy's fraction parameter in [0, 1], or a clear error."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


class FixedSizePolicy(Policy):
    """Base for policies that evict while decoding: each layer holds a fixed number of
    slots, round(budget * (N + max_new_tokens)) on average, and a new token overwrites the
    slot with the lowest ``victim_priority`` once the layer is full (empty slots first)."""

    decode = "evict"
    window = 0
    min_scored = 1  # a slot beyond the protected ones, so new tokens never overwrite them
