"""Score observation for one multi-token forward over a PolicyCache (a prompt, a prompt
chunk or a new chat turn): each layer's attention, through the path its policy needs, and
the attention its counted queries give every key, gathered as an ``Observed``.

Each layer attends its kept slots followed by the forward's tokens (causal among them), so
the score op sees the kept keys and the new ones alike. Planning (kvpolicy.planning) and
compaction (the cache) come after the forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvpolicy_kernels import attention_and_scores, attention_with_lse

from .attention import attend, causal, prompt_mask
from .attention import visible as visible_
from .budget import Budget
from .layer import KVLayer
from .pipeline import Observation, ScoreTally, nothing_observed, observe
from .policy import Policy


class UnreachedLayersError(RuntimeError):
    """A forward's layers did not all reach kvpolicy's attention function with the cache."""


@dataclass
class Observed:
    """What one forward observed, for its plan.

    tally: per scored layer fp32 [B, G, S_l] over the layer's keys (old slots, then the
    forward's tokens); queries / vision: bool [B, q] over the forward's tokens (or [B, S]
    over a deferred step's slots); new_pos: int64 [B, q] their positions (-1 at padding);
    rows_seen: int64 [B] real tokens seen per row after the forward; continued: whether the
    cache held tokens before it; heads_per_group: query heads per KV head.
    Requirements.query_stats: moments, per scored layer (count fp32 [B], sum fp32 [B, H, D],
    sum of outer products fp32 [B, H, D, D]) of the forward's pre-RoPE queries after the
    policy's sinks; value_norms, per scored layer fp32 [B, G, S_l]. future_rotary fp32
    [B, 2, F, D]: cos, sin at each row's F positions after it (future_positions = F).
    prompt_tally: only in a reconstructing policy's plan (``tally`` then holds its passes'
    max): what its counted queries of the first prompt observed, per scored layer fp32
    [B, G, S_l] summed as ``tally`` is for other policies; None when it counts none.
    """

    tally: ScoreTally
    queries: Tensor
    vision: Tensor | None
    new_pos: Tensor
    rows_seen: Tensor
    continued: bool
    heads_per_group: int = 1
    moments: list | None = None
    value_norms: list | None = None
    future_rotary: Tensor | None = None
    prompt_tally: ScoreTally | None = None


class PromptObserver:
    """The attention and score observation of one multi-token forward whose new tokens
    have padding mask new_valid bool [B, q] and vision-token mask vision bool [B, q] | None,
    over ``layers`` (before they are opened: their ``next_pos`` is the tokens seen).
    query_rotary: the model's rotary (kvpolicy.rotary.CacheRotary) for a policy whose
    requirements ask for query statistics (its queries are un-rotated)."""

    def __init__(self, policy: Policy, budget: Budget, layers: list[KVLayer], new_valid: Tensor,
                 vision: Tensor | None, query_rotary=None):
        self.policy, needs = policy, policy.requirements()
        first = layers[0]
        seen_rows = first.next_pos if first.next_pos is not None else new_valid.new_zeros(
            new_valid.shape[0], dtype=torch.long)
        new_pos = torch.where(new_valid, seen_rows[:, None] + new_valid.cumsum(-1) - 1, -1)
        self.observed = Observed(ScoreTally(len(layers)), policy.query_mask(new_valid, vision),
                                 vision, new_pos, seen_rows + new_valid.sum(-1),
                                 first.keys is not None)
        counted = self.observed.queries.any(0).nonzero()
        self.first = int(counted[0]) if len(counted) else None
        # below budget 1 an all-query policy's prompt attention is computed here, output and
        # scores in one pass; at budget 1 it is the model's own SDPA, so the tokens are exact
        self.one_pass = not needs.sparsity and not (budget.is_fraction and budget.value >= 1.0)
        self.all_queries = needs.queries == "all"
        self.attended: set[int] = set()
        self._masks: dict[tuple, Tensor | None] = {}
        self.rotary = query_rotary
        if (needs.query_stats or needs.future_positions) and query_rotary is None:
            raise ValueError(f"kvpolicy {policy.name}: its query statistics need the model's "
                             f"rotary; build the cache with kvpolicy.apply or kvpolicy.compress")
        if needs.query_stats:
            self.observed.moments = [None] * len(layers)
            self.observed.value_norms = [None] * len(layers)
        if needs.future_positions:
            self.observed.future_rotary = self.future(needs.future_positions)

    @property
    def new_pos(self) -> Tensor:
        return self.observed.new_pos

    def attend(self, layer_idx: int, layer: KVLayer, module, query: Tensor, key: Tensor,
               value: Tensor, scaling: float, softcap: float | None,
               sinks: Tensor | None) -> Tensor:
        """query [B, H, q, D]; key/value [B, G, S, D] as the open layer returned them (old
        slots, then the forward's tokens). Returns out [B, q, H, Dv]; observes the scores
        of a planned layer."""
        self.attended.add(layer_idx)
        self.heads_per_group = query.shape[1] // key.shape[1]
        if layer.scored and self.observed.moments is not None:
            self.statistics(layer_idx, query, value)
        visible = self.mask(layer, query.shape[2])
        queries = self.observed.queries
        every_query = layer.scored and self.first == 0 and self.all_queries
        if every_query and self.one_pass and query.device.type == "cpu":
            # the output and the scores from the same probabilities: one QK^T pass in all
            out, attn = attention_and_scores(query, key, value, scaling=scaling, mask=visible,
                                             is_causal=visible is None, softcap=softcap or 0.0,
                                             sinks=sinks, query_mask=queries)
            self.record(layer_idx, query, key, Observation(attn))
            return out.transpose(1, 2)
        lse = None
        if every_query and query.device.type == "cpu":
            # the model's own SDPA (flash on CPU); its log-sum-exp spares the score op a pass
            out, lse = attention_with_lse(query, key, value, scaling=scaling, mask=visible,
                                          is_causal=visible is None, softcap=softcap or 0.0,
                                          sinks=sinks)
            out = out.transpose(1, 2)
        else:  # the model's own SDPA (fused kernels on CUDA); the score op computes its lse
            out = attend(module, query, key, value, visible, scaling, softcap, sinks)
        if layer.scored:
            self.observe(layer_idx, layer, query, key, scaling, softcap, sinks, lse)
        return out

    def mask(self, layer: KVLayer, q: int) -> Tensor | None:
        """bool [B, 1, q, S]: causal over the forward's tokens, every held old slot, within
        the layer's sliding window; None when plain causal attention is exact. A per-head
        layer's heads hold different old slots: [B, H, q, S], each query head its KV
        head's."""
        if layer.per_head and layer.is_split:
            G, S = layer.pos.shape[1:]
            order = causal(q, S, layer.pos.device)
            visible = visible_(layer.pos[:, :, None, :], self.new_pos[:, None, :, None],
                               layer.attention_window, order=order)  # [B, G, q, S]
            return visible.repeat_interleave(self.heads_per_group, 1)
        key_pos = layer.pos[:, 0]  # [B, S]
        S = key_pos.shape[1]
        window = layer.attention_window
        plain = S == q and bool((key_pos >= 0).all())
        if plain and window is None:
            return None
        cache_key = (S, window)
        if plain and cache_key in self._masks:
            return self._masks[cache_key]
        visible = prompt_mask(key_pos, self.new_pos, window)
        if plain:
            self._masks[cache_key] = visible
        return visible

    def observe(self, layer_idx: int, layer: KVLayer, query: Tensor, key: Tensor, scaling: float,
                softcap: float | None, sinks: Tensor | None, lse: Tensor | None) -> None:
        """The counted queries' attention on every key of the layer (lse: fp32 [B, H, q] of
        every query row, when the attention already computed it)."""
        if self.first is None:
            self.record(layer_idx, query, key, nothing_observed(self.policy, key))
            return
        held = layer.pos >= 0 if layer.per_head and layer.is_split else layer.pos[:, 0] >= 0
        obs = observe(self.policy, query[:, :, self.first:], key, scaling=scaling,
                      query_mask=self.observed.queries[:, self.first:],
                      key_mask=held, softcap=softcap, sinks=sinks,
                      lse=None if lse is None else lse[:, :, self.first:])
        self.record(layer_idx, query, key, obs)

    def statistics(self, layer_idx: int, query: Tensor, value: Tensor) -> None:
        """The moments of the forward's pre-RoPE queries (query [B, H, q, D] as the model
        rotated it at their positions) after the policy's sinks, and the values' norms."""
        pre = self.rotary.rotate(query, self.new_pos.clamp_min(0), inverse=True).float()
        counted = (self.new_pos >= self.policy.sinks).float()  # -1 at padding
        weighted = pre * counted[:, None, :, None]
        self.observed.moments[layer_idx] = (counted.sum(-1), weighted.sum(2),
                                            torch.einsum("bhqd,bhqe->bhde", weighted, pre))
        self.observed.value_norms[layer_idx] = value.float().norm(dim=-1)

    def future(self, count: int) -> Tensor:
        """fp32 [B, 2, F, D]: the rotary's cos and sin at each row's ``count`` positions
        after the tokens seen once this forward is done."""
        seen = self.observed.rows_seen
        positions = seen[:, None] + torch.arange(count, device=seen.device)  # [B, F]
        cos, sin = self.rotary.table(int(positions.max()) + 1, seen.device)
        return torch.stack([cos[positions], sin[positions]], 1)

    def record(self, layer_idx: int, query: Tensor, key: Tensor, obs: Observation) -> None:
        self.observed.heads_per_group = query.shape[1] // key.shape[1]
        self.observed.tally.set(layer_idx, obs)

    def finish(self, num_layers: int) -> Observed:
        """The observation, once every layer has attended."""
        if len(self.attended) != num_layers:
            missing = sorted(set(range(num_layers)) - self.attended)
            raise UnreachedLayersError(f"kvpolicy: layers {missing} never called kvpolicy's attention "
                               f"function, so their cache cannot be planned; this model family "
                               f"is unsupported")
        return self.observed
