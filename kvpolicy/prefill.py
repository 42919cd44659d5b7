"""One multi-token forward over a PolicyCache, top to bottom: positions and masks, each
layer's attention with its score observation, then (after the forward) Stats, the
policy's plan per batch row, and one compaction of every layer.

A step is a whole prompt, a prompt chunk (chunked prefill) or a new chat turn over a
compacted cache: each layer attends its kept slots followed by the step's tokens (causal
among them), so the score op sees the kept keys and the new ones alike.

A policy with ``defer = k`` (generate only) keeps the whole step for its first k decode
steps, whose attention the scored layers add to their slots' scores; then ``resume``
plans with the step's counted queries and those decoded tokens as queries, and compacts.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvpolicy_kernels import (accumulate_scores, accumulate_scores_sparsity, attention_and_scores,
                              attention_with_lse, compact_layers)

from .budget import capacity as buffer_slots
from .cache import UNUSABLE, KVLayer, PolicyCache
from .policy import Plan, Stats
from .softmax import attend


class Step:
    """The step of ``cache`` whose new tokens have padding mask new_valid bool [B, q] and
    vision-token mask vision bool [B, q] | None. Opens every layer of the cache."""

    def __init__(self, cache: PolicyCache, new_valid: Tensor, vision: Tensor | None):
        self.cache, self.policy = cache, cache.policy
        first = cache.layers[0]
        seen_rows = first.next_pos if first.next_pos is not None else new_valid.new_zeros(
            new_valid.shape[0], dtype=torch.long)
        self.rows_seen = seen_rows + new_valid.sum(-1)
        self.new_pos = torch.where(new_valid, seen_rows[:, None] + new_valid.cumsum(-1) - 1, -1)
        self.new_valid, self.vision = new_valid, vision
        self.queries = self.policy.query_mask(new_valid, vision)
        counted = self.queries.any(0).nonzero()
        self.first = int(counted[0]) if len(counted) else None
        self.continued = first.keys is not None
        self.new_tokens = cache.max_new_tokens  # decode steps the plan sizes buffers for
        self.defer, self.deferring, self.decoded = cache.defer_steps, False, 0
        # below budget 1 an all-query policy's prompt attention is computed here, output and
        # scores in one pass; at budget 1 it is the model's own SDPA, so the tokens are exact
        budget = cache.budget
        self.one_pass = self.policy.tau == 0 and not (budget.is_fraction and budget.value >= 1.0)
        self.attn: dict[int, Tensor] = {}
        self.below: dict[int, Tensor | None] = {}
        self.heads_per_group = 1
        self.attended: set[int] = set()
        self._masks: dict[tuple, Tensor | None] = {}
        for layer in cache.layers:
            layer.open(self.new_pos)
        cache.step = self

    # ---- during the forward: each layer ------------------------------------------------
    def attend(self, layer_idx: int, module, query: Tensor, key: Tensor, value: Tensor,
               scaling: float, window: int | None, softcap: float | None,
               sinks: Tensor | None) -> Tensor:
        """query [B, H, q, D]; key/value [B, G, S, D] as the open layer returned them (old
        slots, then the step's tokens); window: the model's sliding window for this layer.
        Returns out [B, q, H, Dv]; observes the scores of a planned layer."""
        layer = self.cache.layers[layer_idx]
        layer.adopt_window(window)
        if layer.rotary is not None:
            query, key = layer.rotary.place(query, key, layer.pos[:, 0], self.new_pos, layer.given)
        self.attended.add(layer_idx)
        visible = self.mask(layer, query.shape[2])
        lse = None
        every_query = layer.scored and self.first == 0 and self.policy.queries == "all"
        if every_query and self.one_pass and query.device.type == "cpu":
            # the output and the scores from the same probabilities: one QK^T pass in all
            out, attn = attention_and_scores(query, key, value, scaling=scaling, mask=visible,
                                             is_causal=visible is None, softcap=softcap or 0.0,
                                             sinks=sinks, query_mask=self.queries)
            self.record(layer_idx, query, key, attn, None)
            return out.transpose(1, 2)
        if every_query:  # the model's own SDPA; its log-sum-exp spares the score op one pass
            out, lse = attention_with_lse(query, key, value, scaling=scaling, mask=visible,
                                          is_causal=visible is None, softcap=softcap or 0.0,
                                          sinks=sinks)
            out = out.transpose(1, 2)
        else:
            out = attend(module, query, key, value, visible, scaling, softcap, sinks)
        if layer.scored:
            self.observe(layer_idx, layer, query, key, scaling, softcap, sinks, lse)
        return out

    def mask(self, layer: KVLayer, q: int) -> Tensor | None:
        """bool [B, 1, q, S]: causal over the step's tokens, every valid old slot, within
        the layer's sliding window; None when plain causal attention is exact."""
        key_valid = layer.pos[:, 0] >= 0  # [B, S]
        S = key_valid.shape[1]
        window = layer.attn_window
        plain = S == q and bool(key_valid.all())
        if plain and window is None:
            return None
        cache_key = (S, window)
        if plain and cache_key in self._masks:
            return self._masks[cache_key]
        causal = torch.ones(q, S, dtype=torch.bool, device=key_valid.device).tril(S - q)
        visible = causal[None] & key_valid[:, None, :]
        if window is not None:
            visible &= layer.pos[:, 0, None, :] > self.new_pos[:, :, None] - window
        visible = visible[:, None]
        if plain:
            self._masks[cache_key] = visible
        return visible

    def observe(self, layer_idx: int, layer: KVLayer, query: Tensor, key: Tensor, scaling: float,
                softcap: float | None, sinks: Tensor | None, lse: Tensor | None) -> None:
        """Accumulate the counted queries' attention on every key of the layer (lse: fp32
        [B, H, q] of every query row, when the attention already computed it)."""
        B, G, S, _ = key.shape
        if self.first is None:
            self.record(layer_idx, query, key, key.new_zeros(B, G, S, dtype=torch.float32),
                        key.new_zeros(B, G, dtype=torch.float32))
            return
        key_valid = layer.pos[:, 0] >= 0
        extra = {} if not softcap else {"softcap": softcap}
        if sinks is not None:
            extra["sinks"] = sinks
        if lse is not None:
            extra["lse"] = lse[:, :, self.first:]
        args = dict(scaling=scaling, key_mask=None if bool(key_valid.all()) else key_valid,
                    query_mask=self.queries[:, self.first:], **extra)
        q = query[:, :, self.first:]
        if self.policy.tau > 0:
            attn, below = accumulate_scores_sparsity(q, key, tau=self.policy.tau, **args)
        else:
            attn, below = accumulate_scores(q, key, **args), None
        self.record(layer_idx, query, key, attn, below)

    def record(self, layer_idx: int, query: Tensor, key: Tensor, attn: Tensor,
               below: Tensor | None) -> None:
        """Keep a scored layer's attention fp32 [B, G, S] and sparsity count fp32 [B, G]."""
        self.heads_per_group = query.shape[1] // key.shape[1]
        self.attn[layer_idx], self.below[layer_idx] = attn, below

    # ---- after the forward -------------------------------------------------------------
    def finish(self) -> None:
        """Plan the scored layers (per batch row), keep each sliding layer's window, and
        compact every layer into closed buffers."""
        cache = self.cache
        cache.step = None
        layers = cache.layers
        if len(self.attended) != len(layers):
            missing = sorted(set(range(len(layers))) - self.attended)
            raise RuntimeError(f"kvpolicy: layers {missing} never called kvpolicy's attention "
                               f"function, so their cache cannot be planned; this model family "
                               f"is unsupported")
        scored = [l for l, layer in enumerate(layers) if layer.scored]
        keep: dict[int, tuple[Tensor, Tensor]] = {}
        caps: dict[int, int] = {}
        if scored:
            plan, fill = self.plan(scored)
            cache.plan = plan
            for l, k, c in zip(scored, plan.keep, plan.capacity):
                keep[l], caps[l] = (k, fill[l]), c
        for l, layer in enumerate(layers):
            if not layer.scored:
                keep[l] = window_keep(layer)
                caps[l] = min(layer.window, buffer_slots(keep[l][0].shape[-1],
                                                         cache.max_new_tokens, "append", cache.bucket))
        self.compact(keep, caps)
        if self.deferring:
            cache.pending = self

    # ---- deferred compaction -----------------------------------------------------------
    def tick(self) -> None:
        """After one decode step of a deferred step: resume once ``defer`` steps ran."""
        self.decoded += 1
        if self.decoded >= self.defer:
            self.resume()

    def resume(self) -> None:
        """Plan the deferred step with its counted prompt queries and the decoded tokens as
        queries (their attention is in the scored layers' ``scores``), and compact."""
        cache = self.cache
        cache.pending = None
        pos = next(layer for layer in cache.layers if layer.scored).pos[:, 0]  # [B, C]
        self.queries = at_slots(self.queries, self.new_pos, pos) | (pos >= self.rows_seen[:, None])
        if self.vision is not None:
            self.vision = at_slots(self.vision, self.new_pos, pos)
        self.rows_seen = cache.layers[0].next_pos.clone()
        self.new_tokens = max(0, cache.max_new_tokens - self.decoded)
        self.continued, self.deferring, self.defer, self.attn, self.below = True, False, 0, {}, {}
        self.finish()

    def plan(self, scored: list[int]) -> tuple[Plan, dict[int, Tensor]]:
        """The policy's plan for the scored layers, made for each batch row alone (a row's
        budget is a share of its own tokens), merged: per layer keep int64 [B, G, n_l]
        (n_l the largest row's) and the filler mask bool [B, n_l] of shorter rows."""
        layers = self.cache.layers
        policy, budget = self.policy, self.cache.budget
        width = max(layers[l].keys.shape[2] for l in scored)
        attn = torch.stack([left_pad(self.running(l), width) for l in scored])
        valid = torch.stack([left_pad(layers[l].pos[:, 0] >= 0, width) for l in scored]).any(0)
        queries = left_pad(self.queries, width)
        vision = None if self.vision is None else left_pad(self.vision, width)
        below = None
        if self.below and self.below[scored[0]] is not None:
            below = torch.stack([self.below[l] for l in scored])
        new = self.new_tokens
        new_turn = self.cache.tokens is not None  # else a chunk of the first call's prompt
        recompress = not new_turn or self.cache.recompress or policy.decode == "evict"
        if recompress and self.defer:
            self.deferring, recompress = True, False  # keep everything until resume
        rows = []
        for b in range(valid.shape[0]):
            rv = valid[b:b + 1]
            stats = Stats(attn[:, b:b + 1], queries[b:b + 1], rv, self.heads_per_group,
                          None if vision is None else vision[b:b + 1],
                          None if below is None else below[:, b:b + 1], new,
                          int(self.rows_seen[b]) if self.continued else None)
            rows.append(policy.plan(stats, budget) if recompress else keep_all(stats))
        keeps, fill = [], {}
        for i, l in enumerate(scored):
            n = max(r.keep[i].shape[-1] for r in rows)
            per_row = [pad_keep(r.keep[i], n) for r in rows]
            keeps.append(torch.cat([k for k, _ in per_row]))
            fill[l] = torch.cat([f for _, f in per_row])
        self.row_sizes = {l: torch.tensor([r.capacity[i] for r in rows], device=valid.device)
                          for i, l in enumerate(scored)}
        caps = [max(r.capacity[i] for r in rows) for i in range(len(scored))]
        if policy.decode == "append":
            caps = [buffer_slots(c, 0, "append", self.cache.bucket) for c in caps]
        return Plan(keeps, caps), fill

    def running(self, l: int) -> Tensor:
        """float32 [B, G, S]: layer l's observed scores, plus the running scores of its old
        slots (an evicting layer's, or a deferred step's decode attention)."""
        layer, attn = self.cache.layers[l], self.attn.get(l)
        if layer.scores is None:
            return attn
        return layer.scores if attn is None else attn + layer.scores

    def compact(self, keep: dict[int, tuple[Tensor, Tensor]], caps: dict[int, int]) -> None:
        """Gather every layer's kept slots into new buffers in one call and close it."""
        layers = self.cache.layers
        own = [layer.keys.shape[2] for layer in layers]
        planned = max((own[l] for l, layer in enumerate(layers) if layer.scored), default=0)
        shift = [planned - own[l] if layer.scored else 0 for l, layer in enumerate(layers)]
        idx = [(keep[l][0] - shift[l]).clamp_min(0) for l in range(len(layers))]
        dst_k, dst_v = [], []
        for l, layer in enumerate(layers):
            B, G, _, D = layer.keys.shape
            dst_k.append(layer.keys.new_zeros(B, G, caps[l], D))
            dst_v.append(layer.values.new_zeros(B, G, caps[l], layer.values.shape[-1]))
        compact_layers([layer.keys for layer in layers], [layer.values for layer in layers], idx,
                       dst_k, dst_v)
        for l, layer in enumerate(layers):
            k = idx[l]
            empty = keep[l][1][:, None, :] | (keep[l][0] < shift[l])  # fillers, padded slots
            B, G, n = k.shape
            pos = layer.pos.new_full((B, G, caps[l]), -1)
            pos[..., :n] = torch.gather(layer.pos, 2, k).masked_fill(empty, -1)
            scores = sizes = None
            if layer.kind == "evict":  # a row keeps its own fixed size
                sizes = self.row_sizes[l]
                beyond = torch.arange(caps[l], device=k.device) >= self.row_sizes[l][:, None]
                pos.masked_fill_(beyond[:, None, :], UNUSABLE)
            if layer.kind == "evict" or (self.deferring and layer.scored):  # running scores
                scores = torch.zeros(B, G, caps[l], dtype=torch.float32, device=k.device)
                scores[..., :n] = torch.gather(self.running(l), 2, k)
            layer.close(dst_k[l], dst_v[l], pos, n, self.rows_seen.clone(), scores, sizes)


def at_slots(mask: Tensor, new_pos: Tensor, pos: Tensor) -> Tensor:
    """bool [B, C]: ``mask`` bool [B, q] over a step's tokens (positions new_pos int64
    [B, q], -1 at padding) carried to the slots holding those positions (pos int64 [B, C])."""
    B = pos.shape[0]
    table = torch.zeros(B, int(max(pos.max(), new_pos.max())) + 2, dtype=torch.bool, device=pos.device)
    table.scatter_(1, new_pos.clamp_min(-1) + 1, mask & (new_pos >= 0))
    return torch.gather(table, 1, pos.clamp_min(-1) + 1) & (pos >= 0)


def left_pad(x: Tensor, width: int) -> Tensor:
    """Pad the last dim of x [..., S] on the left to ``width`` (zeros / False)."""
    return torch.nn.functional.pad(x, (width - x.shape[-1], 0))


def pad_keep(keep: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(keep [1, G, n], filler bool [1, n]): a row's keep widened to n by repeating its
    last index; the fillers are marked so their slots stay empty."""
    have = keep.shape[-1]
    fill = torch.arange(n, device=keep.device)[None] >= have
    if have < n:
        keep = torch.cat([keep, keep[..., -1:].expand(*keep.shape[:-1], n - have)], -1)
    return keep, fill


def keep_all(stats: Stats) -> Plan:
    """Every valid slot kept (a continuation appended without recompression)."""
    n = int(stats.valid.sum())
    G = stats.attn.shape[2]
    idx = stats.valid[0].nonzero()[:, 0][None, None].expand(1, G, n)
    return Plan([idx] * stats.num_layers,
                [n + stats.max_new_tokens] * stats.num_layers)


def window_keep(layer: KVLayer) -> tuple[Tensor, Tensor]:
    """A sliding layer's last ``window - 1`` valid tokens (the next query sees them and
    itself): (keep int64 [B, G, n], filler bool [B, n])."""
    pos = layer.pos[:, 0]  # [B, S]: sliding layers keep the same tokens in every head
    B, S = pos.shape
    n = min(layer.window - 1, S)
    order = pos.float().masked_fill(pos < 0, -torch.inf).topk(n, dim=-1).indices
    keep = torch.sort(order, dim=-1).values
    fill = torch.gather(pos, 1, keep) < 0
    return keep[:, None].expand(B, layer.keys.shape[1], n), fill
