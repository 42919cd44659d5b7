"""PolicyCache: a transformers Cache that holds full K/V during prefill, runs the policy
after the last layer, compacts every layer into its own static buffer, then decodes in
place (append into the next free slot, or overwrite a victim for fixed-size policies)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvpolicy_kernels import accumulate_scores, accumulate_scores_sparsity, compact_layers

from .budget import Budget
from .policy import Plan, Policy, Stats


@dataclass
class Prefill:
    """What one prefill collects. valid, queries: bool [B, N]; vision: bool [B, N] | None;
    first: first counted query position (None: nothing counted); mask: bool [B, 1, N, N]
    causal & padding, or None without padding; attn / below: per layer float32 [B, G, N] /
    [B, G]."""

    valid: Tensor
    vision: Tensor | None
    queries: Tensor
    first: int | None
    mask: Tensor | None
    attn: list
    below: list


class PolicyLayer(CacheLayerMixin):
    """One decoder layer's cache. Before compaction ``keys``/``values`` are the prompt's
    full K/V [B, G, N, D]; after, static buffers [B, G, C, D] with ``slot_valid`` bool
    [B, G, C]. Fixed-size (evicting) layers also keep ``slot_pos`` int64 [B, G, C] (token
    position, -1 = empty), ``scores`` float32 [B, G, C] (running attention) and ``next_pos``
    int64 [B] (the next token's position); append layers keep ``next_slot`` int64 [1]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, evicts: bool):
        super().__init__()
        self.evicts = evicts
        self.compacted = False
        self.seen = torch.zeros((), dtype=torch.long)  # tokens seen (logical length)

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.seen = self.seen.to(self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """Prefill: store the full K/V. Decode (one token [B, G, 1, D]): write it in place."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if not self.compacted:
            if self.keys is not None:
                raise NotImplementedError("PolicyCache: a second forward before the policy ran "
                                          "(chunked prefill) is not supported")
            self.keys, self.values = key_states, value_states
            self.seen.fill_(key_states.shape[-2])
            return key_states, value_states
        if key_states.shape[-2] != 1:
            raise NotImplementedError("PolicyCache: after the prompt, only one token per step "
                                      "is supported (no continuation / speculative decoding)")
        if self.evicts:
            self._overwrite(key_states, value_states)
        else:
            self._append(key_states, value_states)
        self.seen.add_(1)
        return self.keys, self.values

    def _append(self, key_states: Tensor, value_states: Tensor) -> None:
        self.keys.index_copy_(2, self.next_slot, key_states)
        self.values.index_copy_(2, self.next_slot, value_states)
        self.slot_valid.index_fill_(2, self.next_slot, True)
        self.next_slot.add_(1)

    def _overwrite(self, key_states: Tensor, value_states: Tensor) -> None:
        """Write the token into each (sequence, head)'s empty slot, else its victim."""
        B, G, C, D = self.keys.shape
        priority = self.policy.victim_priority(self.scores, self.slot_pos, self.next_pos, C)
        victim = priority.masked_fill(self.slot_pos < 0, -torch.inf).argmin(-1, keepdim=True)
        rows = victim[..., None].expand(B, G, 1, D)
        self.keys.scatter_(2, rows, key_states)
        self.values.scatter_(2, rows, value_states)
        self.slot_pos.scatter_(2, victim, self.next_pos.view(B, 1, 1).expand(B, G, 1))
        self.slot_valid.scatter_(2, victim, True)
        self.scores.scatter_(2, victim, 0.0)
        self.next_pos.add_(1)

    def install(self, keys: Tensor, values: Tensor, slot_valid: Tensor, policy: Policy,
                slot_pos: Tensor, scores: Tensor, next_pos: Tensor, kept: int) -> None:
        """Switch to decode: adopt the compacted buffers, drop the full prompt K/V."""
        self.keys, self.values, self.slot_valid = keys, values, slot_valid
        if self.evicts:
            self.policy, self.slot_pos, self.scores, self.next_pos = policy, slot_pos, scores, next_pos
            state = [self.slot_pos, self.scores, self.next_pos]
        else:
            self.next_slot = torch.full((1,), kept, dtype=torch.long, device=keys.device)
            state = [self.next_slot]
        for t in [self.keys, self.values, self.slot_valid, self.seen, *state]:
            torch._dynamo.mark_static_address(t)
        self.compacted = True

    def owned(self) -> list[Tensor]:
        """The tensors this layer owns (its memory)."""
        names = ("keys", "values", "slot_valid", "slot_pos", "scores", "next_pos", "next_slot", "seen")
        return [t for n in names if isinstance(t := getattr(self, n, None), Tensor)]

    def get_seq_length(self):
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.compacted:
            return self.keys.shape[-2], 0
        return query_length, 0

    def get_max_length(self) -> int:
        return self.keys.shape[-2] if self.compacted else -1

    def reset(self) -> None:
        raise NotImplementedError("PolicyCache cannot be reset; generate makes a fresh one per call")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("PolicyCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PolicyCache cannot be cropped (assisted decoding is unsupported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PolicyCache cannot be repeated along the batch")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("PolicyCache cannot select batch indices")


class PolicyCache(Cache):
    """The cache of one generate call under ``policy`` at ``budget``.

    num_layers: decoder layers; max_new_tokens: decode steps planned (sizes the buffers of
    append policies and the fixed size of evicting ones); bucket: round append buffers up
    to a multiple of this (fewer distinct shapes for torch.compile).
    After prefill, ``plan`` holds the policy's Plan.
    """

    def __init__(self, num_layers: int, policy: Policy, budget: Budget, max_new_tokens: int,
                 bucket: int = 1):
        evicts = policy.decode == "evict"
        super().__init__(layers=[PolicyLayer(evicts) for _ in range(num_layers)])
        self.policy, self.budget = policy, budget
        self.max_new_tokens, self.bucket = max_new_tokens, bucket
        self.prefill: Prefill | None = None
        self.plan: Plan | None = None

    @property
    def compacted(self) -> bool:
        return self.layers[-1].compacted

    # ---- prefill ----------------------------------------------------------------------
    def begin_prefill(self, valid: Tensor, vision: Tensor | None) -> None:
        """Called with the prompt's padding mask valid bool [B, N] and vision bool [B, N]."""
        if self.prefill is not None or self.compacted:
            raise NotImplementedError("PolicyCache holds one prompt; use a fresh cache per generate")
        queries = self.policy.query_mask(valid, vision)
        counted = queries.any(0).nonzero()
        first = int(counted[0]) if len(counted) else None
        mask = None
        if not bool(valid.all()):
            N = valid.shape[-1]
            causal = torch.ones(N, N, dtype=torch.bool, device=valid.device).tril()
            mask = causal[None, None] & valid[:, None, None, :]
        self.prefill = Prefill(valid, vision, queries, first, mask, [], [])

    def observe(self, layer_idx: int, query: Tensor, key: Tensor, scaling: float) -> None:
        """Accumulate layer ``layer_idx``'s scores (query [B, H, N, D], key [B, G, N, D]);
        after the last layer, run the policy and compact."""
        p = self.prefill
        if len(p.attn) != layer_idx:
            raise RuntimeError(f"PolicyCache: layer {layer_idx} observed out of order")
        B, G, N, _ = key.shape
        if p.first is None:
            attn, below = key.new_zeros(B, G, N, dtype=torch.float32), key.new_zeros(B, G, dtype=torch.float32)
        else:
            key_mask = p.valid if p.mask is not None else None
            args = dict(scaling=scaling, key_mask=key_mask, query_mask=p.queries[:, p.first:])
            q = query[:, :, p.first:]
            if self.policy.tau > 0:
                attn, below = accumulate_scores_sparsity(q, key, tau=self.policy.tau, **args)
            else:
                attn, below = accumulate_scores(q, key, **args), None
        p.attn.append(attn)
        p.below.append(below)
        if layer_idx == len(self.layers) - 1:
            self._compact(query.shape[1] // G)

    def _compact(self, heads_per_group: int) -> None:
        p = self.prefill
        below = None if p.below[0] is None else torch.stack(p.below)
        stats = Stats(torch.stack(p.attn), p.queries, p.valid, heads_per_group, p.vision, below,
                      self.max_new_tokens)
        self.plan = plan = self.policy.plan(stats, self.budget)
        ref = self.layers[0].keys
        B, G, _, D = ref.shape
        caps = [self._round(c) for c in plan.capacity]
        dst_k = [ref.new_zeros(B, G, c, D) for c in caps]
        dst_v = [ref.new_zeros(B, G, c, self.layers[0].values.shape[-1]) for c in caps]
        compact_layers([l.keys for l in self.layers], [l.values for l in self.layers], plan.keep,
                       dst_k, dst_v)
        rank = torch.cumsum(p.valid.long(), -1) - 1  # position id of each real token
        valid = p.valid[:, None].expand(B, G, -1)
        for l, (layer, keep, k, v, c) in enumerate(zip(self.layers, plan.keep, dst_k, dst_v, caps)):
            n = keep.shape[-1]
            kept_valid = torch.gather(valid, 2, keep)
            slot_valid = torch.zeros(B, G, c, dtype=torch.bool, device=k.device)
            slot_valid[..., :n] = kept_valid
            slot_pos = scores = next_pos = None
            if layer.evicts:
                slot_pos = torch.full((B, G, c), -1, dtype=torch.long, device=k.device)
                slot_pos[..., :n] = torch.gather(rank[:, None].expand(B, G, -1), 2, keep).masked_fill(~kept_valid, -1)
                scores = torch.zeros(B, G, c, dtype=torch.float32, device=k.device)
                scores[..., :n] = torch.gather(stats.attn[l], 2, keep)
                next_pos = p.valid.sum(-1)
            layer.install(k, v, slot_valid, self.policy, slot_pos, scores, next_pos, n)
        self.prefill = None

    def _round(self, capacity: int) -> int:
        if self.policy.decode == "evict":
            return capacity  # the fixed size is the policy's budget: never pad it
        return -(-capacity // self.bucket) * self.bucket

    # ---- introspection ----------------------------------------------------------------
    @property
    def kept(self) -> list[int]:
        """Prompt tokens kept per layer (after prefill)."""
        return self.plan.kept

    def nbytes(self) -> int:
        """Bytes of all tensors the cache owns (K/V buffers and their bookkeeping)."""
        return sum(t.nbytes for layer in self.layers for t in layer.owned())
