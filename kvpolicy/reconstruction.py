"""Reconstruction passes (policies with ``Requirements.reconstruct``, KVzip): once a first
prompt is in the cache, uncompressed, the model is asked to repeat it, one chunk of the
context at a time (the policy builds each pass's ids: ``Policy.reconstruction``), and every
context key is scored by the largest attention probability any pass's query gives it
(max over the queries and the query heads of its KV group). The passes leave the context's
K/V as they were; the cache then plans with those scores and compacts once.

``reconstruct`` drives the passes on a Hugging Face model (the engine's part);
``PassObserver`` is one pass's attention and observation inside the cache.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor, nn

from kvpolicy_kernels import attention_with_lse
from kvpolicy_kernels.score_ref import capped

from . import models
from .attention import attend, causal, probabilities
from .attention import visible as visible_
from .layer import KVLayer
from .pipeline import Observation, ScoreTally

BLOCK_ELEMENTS = 2 ** 21  # score logits held at once (8 MiB in fp32)


def peak(probs: Tensor, rows: Tensor | None, columns: Tensor | None) -> Tensor:
    """fp32 [B, G, s]: the max over a KV group's query heads and the queries of probs
    [B, G, g, r, s]; with KVzip+'s weights (both or neither) each probability is first
    multiplied by its query's rows [B, r] and its head's columns [B, G, g, s]."""
    if rows is None:
        return probs.amax(dim=(2, 3))
    return ((probs * rows[:, None, None, :, None]).amax(3) * columns).amax(2)


def query_block(heads: int, keys: int) -> int:
    """Queries per block, so that a block's probabilities over ``keys`` keys in ``heads``
    query heads hold at most BLOCK_ELEMENTS elements."""
    return max(1, BLOCK_ELEMENTS // (heads * keys))


def scored_attention(query: Tensor, key: Tensor, value: Tensor, held: Tensor, scored: Tensor,
                     scaling: float, softcap: float | None, sinks: Tensor | None,
                     rows: Tensor | None, columns: Tensor | None) -> tuple[Tensor, Tensor]:
    """A pass's attention and its KVzip scores. ``attention_with_lse`` (flash on CPU, its
    reference elsewhere) attends three key sets apart: the pass's own tokens (causal), the
    scored context slots, and the held slots the pass does not score (an earlier chunk's
    kept tokens), each masked only where the KV heads hold different slots of it; the three
    outputs merge through their log-sum-exps. Sink logits (GPT-OSS) join the first set's
    log-sum-exp, so they count in the model's denominator and in KVzip's. The first two
    sets' joint log-sum-exp is KVzip's chunk-local softmax denominator, so a scored slot's
    probability is exp(logit - lse), maxed over the queries in the log domain (exp is
    monotone): no probability matrix is built.

    query [B, H, q, D]; key/value [B, G, C + q, D] (C context slots, then the pass's q
    tokens); held, scored bool [G', C], scored within held (G' = 1, or G where the KV heads
    hold different slots; every query sees its head's held slots); sinks [H] or None; rows
    fp32 [B, q] and columns fp32 [B, G, H/G, C]: KVzip+'s weights, or None. Returns (out
    [B, H, q, Dv] in the query's dtype, best fp32 [B, G, C], 0 where not scored)."""
    B, H, q, D = query.shape
    G, C = key.shape[1], key.shape[2] - q
    g, cap = H // G, softcap or 0.0
    unscored = held & ~scored
    slots, others = scored.any(0).nonzero()[:, 0], unscored.any(0).nonzero()[:, 0]
    scored_keys = key[:, :, slots]  # [B, G, s, D]
    parts = [attention_with_lse(query, key[:, :, C:], value[:, :, C:], scaling=scaling,
                                is_causal=True, softcap=cap, sinks=sinks)]  # (out [B, H, q, Dv], lse fp32 [B, H, q])
    for subset, subset_keys, seen in ((slots, scored_keys, scored), (others, key[:, :, others], unscored)):
        if subset.shape[0]:
            parts.append(attention_with_lse(query, subset_keys, value[:, :, subset], scaling=scaling,
                                            mask=head_mask(seen[:, subset], H), softcap=cap))
    local = torch.logsumexp(torch.stack([lse for _, lse in parts[:2 if slots.shape[0] else 1]]), 0)
    if rows is not None:  # KVzip+: p x rows = exp(logit - (local - log rows))
        local = local - rows[:, None].log()
    local = local.view(B, G, g, q, 1)
    grouped = query.float().reshape(B, G, g, q, D) * scaling  # query head G-index x g + j
    keys = scored_keys.float().transpose(-1, -2).contiguous()  # [B, G, D, s]: a faster q k^T
    highest = torch.zeros(B, G, g, slots.shape[0], device=query.device)
    step = query_block(H, max(slots.shape[0], 1))
    for a in range(0, q, step):
        b = min(a + step, q)
        logits = capped(grouped[:, :, :, a:b].reshape(B, G, g * (b - a), D) @ keys, cap)
        logits = logits.view(B, G, g, b - a, -1).sub_(local[:, :, :, a:b])
        highest = torch.maximum(highest, logits.amax(3).exp_())
    if columns is not None:
        highest = highest * columns[..., slots]
    best = torch.zeros(B, G, C, device=query.device)
    best[..., slots] = highest.amax(2)
    return merged(parts).to(query.dtype), best * scored


def head_mask(seen: Tensor, H: int) -> Tensor | None:
    """bool [1, H, 1, n] from seen bool [G', n] (each query head its KV head's row), or None
    when every head sees every slot."""
    return None if bool(seen.all()) else seen.repeat_interleave(H // seen.shape[0], 0)[None, :, None]


def merged(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """fp32 [B, H, q, Dv]: the attention over the union of disjoint key sets from each set's
    (out [B, H, q, Dv], lse fp32 [B, H, q])."""
    if len(parts) == 1:
        return parts[0][0].float()
    total = torch.logsumexp(torch.stack([lse for _, lse in parts]), 0)
    return sum(out.float() * (lse - total).exp()[..., None] for out, lse in parts)


class PassObserver:
    """One reconstruction pass over ``layers`` (closed, holding the whole context): its q
    tokens at the positions after the context; it scores the context slots whose position is
    below ``sinks`` or in [start, stop), with the softmax over those keys and the pass's own
    (KVzip's chunk-local softmax), and keeps each slot's max in ``tally``."""

    def __init__(self, layers: list[KVLayer], q: int, start: int, stop: int, sinks: int,
                 tally: ScoreTally, contribution: bool = False):
        first = layers[0]
        self.new_pos = first.next_pos[:, None] + torch.arange(q, device=first.next_pos.device)
        self.start, self.stop, self.sinks, self.tally = start, stop, sinks, tally
        self.attended: set[int] = set()
        self.contribution = contribution
        self.input_norms: dict[int, Tensor] = {}  # layer -> fp32 [B, q]: ||x_t||, x the attention's input

    def note_input(self, layer_idx: int, hidden: Tensor) -> None:
        """The attention input of layer ``layer_idx`` (hidden [B, q, d], as its attention
        module receives it), whose norms weight the scores (``contribution``)."""
        self.input_norms[layer_idx] = hidden.float().norm(dim=-1)

    def weights(self, layer_idx: int, module, value: Tensor, C: int, g: int
                ) -> tuple[Tensor, Tensor] | tuple[None, None]:
        """KVzip+'s weights (``Requirements.contribution``), else (None, None): rows fp32
        [B, q], 1 / ||x_t||; columns fp32 [B, G, g, C], ||W_O^(h) v_i|| for query head h =
        G-index x g + j of the C context values (value [B, G, C + q, Dv]), W_O^(h) head h's
        columns of ``module.o_proj`` ([d, H x Dv]); as a Gram form v^T (W_O^(h)^T W_O^(h)) v."""
        if not self.contribution:
            return None, None
        if layer_idx not in self.input_norms:
            raise RuntimeError(f"kvpolicy: layer {layer_idx}'s attention input was not seen; "
                               f"KVzip+ weights need it (models.output_projections)")
        B, G, _, Dv = value.shape
        weight = module.o_proj.weight.float().view(-1, G, g, Dv)  # [d, G, g, Dv]
        gram = torch.einsum("ogjd,ogje->gjde", weight, weight)  # [G, g, Dv, Dv]
        v = value[:, :, :C].float()
        squared = torch.einsum("bgcd,gjde,bgce->bgjc", v, gram, v)
        return 1.0 / self.input_norms[layer_idx], squared.clamp_min(0).sqrt()

    def attend(self, layer_idx: int, layer: KVLayer, module, query: Tensor, key: Tensor,
               value: Tensor, scaling: float, softcap: float | None,
               sinks: Tensor | None) -> Tensor:
        """query [1, H, q, D]; key/value [1, G, C + q, D] (the context slots, then the
        pass's tokens). Returns the model's attention out [1, q, H, Dv]; scores a planned
        layer's context slots."""
        self.attended.add(layer_idx)
        C = key.shape[2] - query.shape[2]
        if layer.scored and self.fuses(layer):
            return self.attend_and_observe(layer_idx, layer, module, self.scored(layer, C), query,
                                           key, value, scaling, softcap, sinks)
        visible = self.mask(layer, C)
        out = attend(module, query, key, value, visible, scaling, softcap, sinks)
        if not layer.scored:
            return out
        scored = self.scored(layer, C)
        self.observe(layer_idx, module, scored, query, key, value, scaling, softcap, sinks)
        return out

    def mask(self, layer: KVLayer, C: int) -> Tensor:
        """bool [1, G', q, C + q]: what the pass's tokens see (every held context slot in
        the window, causal among themselves); G' = 1, or G for a per-head layer whose heads
        hold different slots (an earlier chunk's per-head compaction)."""
        pos = self.context_pos(layer, C)[None]  # [1, G', C]
        key_pos = torch.cat([pos, self.new_pos[:, None].expand(-1, pos.shape[1], -1)], 2)
        q, S = self.new_pos.shape[1], key_pos.shape[2]
        return visible_(key_pos[:, :, None, :], self.new_pos[:, None, :, None],
                       layer.attention_window, order=causal(q, S, key_pos.device))

    @staticmethod
    def fuses(layer: KVLayer) -> bool:
        """Whether the layer's attention and scores come from the same attentions
        (``attend_and_observe``): no sliding window (whose scores, as the paper's, ignore
        the window its output keeps)."""
        return layer.attention_window is None

    @staticmethod
    def context_pos(layer: KVLayer, C: int) -> Tensor:
        """int64 [G', C]: the position each context slot holds (-1: none); G' as in ``mask``."""
        return layer.pos[0, :, :C] if layer.is_split else layer.pos[0, :1, :C]

    def held(self, layer: KVLayer, C: int) -> Tensor:
        """bool [G', C]: the context slots that hold a token."""
        return self.context_pos(layer, C) >= 0

    def scored(self, layer: KVLayer, C: int) -> Tensor:
        """bool [G', C]: the context slots this pass scores (a token below ``sinks`` or in
        [start, stop))."""
        pos = self.context_pos(layer, C)
        return (pos >= 0) & ((pos < self.sinks) | ((pos >= self.start) & (pos < self.stop)))

    def attend_and_observe(self, layer_idx: int, layer: KVLayer, module, scored: Tensor,
                           query: Tensor, key: Tensor, value: Tensor, scaling: float,
                           softcap: float | None, sinks: Tensor | None) -> Tensor:
        """The pass's attention and its scores (a layer without sliding window, whose
        queries all see every held context slot): ``scored_attention``. query [1, H, q, D],
        key/value [1, G, C + q, D], scored bool [G', C] (G' as in ``mask``), sinks [H] or
        None. Returns out [1, q, H, Dv]."""
        C = key.shape[2] - query.shape[2]
        rows, columns = self.weights(layer_idx, module, value, C, query.shape[1] // key.shape[1])
        out, best = scored_attention(query, key, value, self.held(layer, C), scored, scaling,
                                     softcap, sinks, rows, columns)
        self.tally.add_max(layer_idx, Observation(best))
        return out.transpose(1, 2)

    def observe(self, layer_idx: int, module, scored: Tensor, query: Tensor, key: Tensor,
                value: Tensor, scaling: float, softcap: float | None, sinks: Tensor | None) -> None:
        """Score the ``scored`` context slots (bool [G', C], as ``scored`` gives them) with
        the softmax over them and the pass's own tokens, apart from the model's attention:
        per KV head where the heads hold different slots."""
        G, g = key.shape[1], query.shape[1] // key.shape[1]
        rows, columns = self.weights(layer_idx, module, value, key.shape[2] - query.shape[2], g)
        if scored.shape[0] == 1:
            full = self.restricted(scored[0], query, key, scaling, softcap, sinks, rows, columns)
        else:
            full = torch.cat([self.restricted(
                scored[h], query[:, h * g:(h + 1) * g], key[:, h:h + 1], scaling, softcap,
                None if sinks is None else sinks[h * g:(h + 1) * g], rows,
                None if columns is None else columns[:, h:h + 1]) for h in range(G)], 1)
        self.tally.add_max(layer_idx, Observation(full))

    @staticmethod
    def restricted(scored: Tensor, query: Tensor, key: Tensor, scaling: float,
                   softcap: float | None, sinks: Tensor | None, rows: Tensor | None = None,
                   columns: Tensor | None = None) -> Tensor:
        """fp32 [B, G, C]: the max over the queries [B, H, q, D] and each KV head's query
        group of the probability of the ``scored`` slots (bool [C]) of key [B, G, C + q, D]
        under the softmax over them and the pass's own tokens (0 elsewhere); weighted by
        rows fp32 [B, q] and columns fp32 [B, G, H/G, C] when given (``weights``)."""
        B, H, q, _ = query.shape
        G, C = key.shape[1], key.shape[2] - q
        slots = scored.nonzero()[:, 0]
        sub = torch.cat([key[:, :, slots], key[:, :, C:]], 2).float()  # [B, G, s + q, D]
        s = slots.shape[0]
        own = torch.ones(q, s + q, dtype=torch.bool, device=key.device)
        own[:, s:] = torch.tril(own[:, s:])
        group_sinks = None if sinks is None else sinks.view(G, H // G)
        best = torch.zeros(B, G, s, device=key.device)
        grouped = query.view(B, G, H // G, q, -1)  # query head g * H/G + j is KV head g's
        slot_columns = None if columns is None else columns[..., slots]
        step = query_block(H, s + q)
        for a in range(0, q, step):
            block = grouped[:, :, :, a:a + step].float()
            logits = torch.einsum("bghtd,bgsd->btghs", block, sub) * scaling
            probs = probabilities(logits, own[a:a + step, None, None, :], softcap,
                                  group_sinks)
            best = torch.maximum(best, peak(probs.permute(0, 2, 3, 1, 4)[..., :s],
                                            None if rows is None else rows[:, a:a + step],
                                            slot_columns))
        full = best.new_zeros(B, G, C)
        full[:, :, slots] = best
        return full


def reconstruct(model: nn.Module, cache) -> None:
    """Run the policy's reconstruction passes of the context ``cache`` holds (a PolicyCache
    whose first prompt, or with ``chunk_size`` its last chunk, is held uncompressed), then
    let it plan and compact. With ``Requirements.contribution`` each attention module's
    input reaches the pass (``PassObserver.note_input``) through a hook held for the passes."""
    n, passes = cache.reconstruction_passes()
    hooks = []
    if cache.policy.requirements().contribution:
        hooks = [module.register_forward_pre_hook(functools.partial(note_input, cache),
                                                  with_kwargs=True)
                 for module in models.output_projections(model).values()]
    try:
        with torch.no_grad():
            for start, stop, ids in passes:
                cache.begin_pass(start, stop)
                positions = torch.arange(n, n + ids.shape[1], device=ids.device)[None]
                model(input_ids=ids.to(model.device), position_ids=positions.to(model.device),
                      use_cache=True, logits_to_keep=1, **{models.CACHE_ARG: cache})
    finally:
        for hook in hooks:
            hook.remove()
    cache.end_reconstruction()


def note_input(cache, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on an attention module: hand its input to the open pass."""
    hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    cache.note_attention_input(module.layer_idx, hidden)
