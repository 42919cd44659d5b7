"""PolicyCache: per-layer K/V buffers that a policy compacts, and each layer's decode step.

A layer is ``closed`` between forwards: static buffers keys/values [B, G, C, D] with the
position id of each slot's token in ``pos`` int64 [B, G, C] (-1 = empty). A multi-token
forward (a prompt, a prompt chunk, a new chat turn) ``opens`` every layer: ``update``
returns the old slots followed by the new tokens, and after the forward the prefill step
(kvpolicy.prefill) plans and compacts them into new closed buffers. A one-token forward on
a closed layer is a decode step, in place and with fixed shapes (torch.compile-able):

- ``append`` layers write the next free slot (``used`` int64 [1]);
- ``evict`` layers (policies that hold a fixed size) overwrite the slot with the lowest
  ``policy.victim_priority`` (empty slots first) and add each step's attention
  probabilities to their running ``scores`` float32 [B, G, C];
- ``sliding`` layers (the model's own sliding-window attention) are a ring of ``window``
  slots overwriting the oldest token.

Slot validity is shared by a row's KV heads (only which token a slot holds differs).
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from .budget import Budget
from .policy import Plan, Policy
from .softmax import grouped_attention

Kind = Literal["append", "evict", "sliding"]
EMPTY, UNUSABLE = -1, -2  # slot positions: free, or beyond a shorter batch row's fixed size


class KVLayer(CacheLayerMixin):
    """One decoder layer's cache (see the module docstring). ``seen`` is the logical
    length (tokens seen, padding included: what generate slices by); ``next_pos`` int64
    [B] the next real token's position per row."""

    is_compileable = True
    is_sliding = False

    def __init__(self, kind: Kind, policy: Policy | None = None, window: int | None = None):
        super().__init__()
        self.kind = "sliding" if window else kind
        self.policy, self.window = policy, window
        self.attn_window: int | None = None
        self.window_known = False
        self.is_open = False
        self.pos: Tensor | None = None
        self.next_pos: Tensor | None = None
        self.used: Tensor | None = None
        self.scores: Tensor | None = None
        self.sizes: Tensor | None = None
        self.seen = torch.zeros((), dtype=torch.long)
        self.rotary = None  # kvpolicy.rotary.CacheRotary: keys stored un-rotated
        self.given: Tensor | None = None  # int64 [B, q]: the positions the model rotated at

    def adopt_window(self, window: int | None) -> None:
        """Take the sliding window the model's attention masks this layer with (None =
        none) at its first forward; a later change is an error. (It is the layer's cache
        ``window`` in every family but a few whose cache keeps a window their attention
        does not mask: both are followed.)"""
        if not self.window_known:
            self.attn_window, self.window_known = window, True
        elif window != self.attn_window:
            raise RuntimeError(f"kvpolicy: a layer attended with sliding window {self.attn_window} "
                               f"is now attended with window {window}")

    @property
    def scored(self) -> bool:
        """Whether the policy plans this layer (sliding layers keep their window)."""
        return self.kind != "sliding"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.seen = self.seen.to(self.device)
        self.is_initialized = True

    # ---- a multi-token step ----------------------------------------------------------
    def open(self, new_pos: Tensor) -> None:
        """Start a multi-token step whose tokens have positions new_pos int64 [B, q] (-1 at
        padding)."""
        self.is_open, self._new_pos = True, new_pos

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        """key/value_states [B, G, q, D]: the step's new tokens. Returns the K/V attention
        uses: an open layer's old slots then the new tokens; a decode step's buffers."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.is_open:
            return self._extend(key_states, value_states)
        if key_states.shape[-2] != 1 or self.keys is None:
            raise RuntimeError("kvpolicy: a multi-token forward reached a cache layer that was not "
                               "opened for it; pass the cache through the patched model's forward")
        self._write(key_states, value_states)
        self.seen.add_(1)
        self.next_pos.add_(1)
        return self.keys, self.values

    def _extend(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        B, G, q, _ = key_states.shape
        new_pos = self._new_pos[:, None, :].expand(B, G, q)
        if self.rotary is not None:
            key_states = self.rotary.rotate(key_states, self.given, inverse=True)
        if self.keys is None:
            self.keys, self.values, self.pos = key_states, value_states, new_pos
        else:
            live = self.occupied()
            self.keys = torch.cat([self.keys[:, :, :live], key_states], dim=2)
            self.values = torch.cat([self.values[:, :, :live], value_states], dim=2)
            self.pos = torch.cat([self.pos[:, :, :live], new_pos], dim=2)
            if self.scores is not None:
                self.scores = torch.cat([self.scores[:, :, :live], self.scores.new_zeros(B, G, q)], 2)
        self.seen = self.seen + q
        return self.keys, self.values

    def occupied(self) -> int:
        """Slots in use (appending layers fill a prefix of their buffer; rings all)."""
        C = self.keys.shape[2]
        ring = self.kind == "evict" or (self.kind == "sliding" and C >= self.window)
        return C if ring else int(self.used)

    def close(self, keys: Tensor, values: Tensor, pos: Tensor, kept: int, next_pos: Tensor,
              scores: Tensor | None, sizes: Tensor | None) -> None:
        """End the step: adopt compacted buffers [B, G, C, D] whose first ``kept`` slots are
        filled (pos int64 [B, G, C]; evict layers: running scores [B, G, C], each row's
        fixed size int64 [B])."""
        self.keys, self.values, self.pos, self.next_pos = keys, values, pos, next_pos
        self.scores = scores
        self.sizes = None if sizes is None else sizes.view(-1, 1, 1)
        self.used = torch.full((1,), kept, dtype=torch.long, device=keys.device)
        self.is_open = False
        for t in self.owned():
            torch._dynamo.mark_static_address(t)

    # ---- the decode step -------------------------------------------------------------
    def _write(self, key_states: Tensor, value_states: Tensor) -> None:
        """Write one token [B, G, 1, D] into its slot."""
        B, G, C, D = self.keys.shape
        if self.rotary is not None:
            key_states = self.rotary.rotate(key_states, self.given, inverse=True)
        if self.kind == "append" or (self.kind == "sliding" and C < self.window):
            self.keys.index_copy_(2, self.used, key_states)
            self.values.index_copy_(2, self.used, value_states)
            self.pos.index_copy_(2, self.used, self.next_pos.view(B, 1, 1).expand(B, G, 1))
            self.used.add_(1)
            return
        if self.kind == "evict":
            priority = self.policy.victim_priority(self.scores, self.pos, self.next_pos, self.sizes)
        else:  # sliding: the oldest token leaves
            priority = self.pos.float()
        priority = priority.masked_fill(self.pos == EMPTY, -torch.inf)
        slot = priority.masked_fill(self.pos == UNUSABLE, torch.inf).argmin(-1, keepdim=True)
        self.keys.scatter_(2, slot[..., None].expand(B, G, 1, D), key_states)
        self.values.scatter_(2, slot[..., None].expand(B, G, 1, value_states.shape[-1]), value_states)
        self.pos.scatter_(2, slot, self.next_pos.view(B, 1, 1).expand(B, G, 1))
        if self.scores is not None:
            self.scores.scatter_(2, slot, 0.0)

    def attend(self, query: Tensor, scaling: float, window: int | None, softcap: float | None,
               sinks: Tensor | None) -> Tensor:
        """One token's attention over the layer's slots: query [B, H, 1, D] -> [B, 1, H, Dv].
        Evicting layers add the probabilities to their running scores."""
        self.adopt_window(window)
        visible = self.pos >= 0
        if self.attn_window is not None:  # the newest token is next_pos - 1
            visible = visible & (self.pos > (self.next_pos - 1 - self.attn_window).view(-1, 1, 1))
        keys = self.keys
        if self.rotary is not None:
            query, keys = self.rotary.place(query, keys, self.pos[:, 0], self.next_pos[:, None] - 1,
                                            self.given)
        out, probs = grouped_attention(query, keys, self.values, visible, scaling, softcap,
                                       sinks, need_probs=self.scores is not None)
        if probs is not None:
            self.scores.add_(probs)
        return out

    # ---- bookkeeping -----------------------------------------------------------------
    def grow(self, slots: int) -> None:
        """Give an append layer at least ``slots`` free slots (eager only: reads ``used``)."""
        B, G, C, D = self.keys.shape
        limit = self.window if self.kind == "sliding" else None
        if self.kind == "evict" or (limit is not None and C >= limit):
            return  # rings: a fixed size
        free = C - int(self.used)
        if free >= slots:
            return
        extra = slots - free if limit is None else min(slots - free, limit - C)
        self.keys = torch.cat([self.keys, self.keys.new_zeros(B, G, extra, D)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(B, G, extra, self.values.shape[-1])], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((B, G, extra), -1)], 2)
        if self.scores is not None:  # a deferred step's running scores
            self.scores = torch.cat([self.scores, self.scores.new_zeros(B, G, extra)], 2)
        for t in self.owned():
            torch._dynamo.mark_static_address(t)

    def owned(self) -> list[Tensor]:
        """The tensors this layer owns (its memory)."""
        names = ("keys", "values", "pos", "next_pos", "used", "scores", "sizes", "seen")
        return [t for n in names if isinstance(t := getattr(self, n, None), Tensor)]

    def get_seq_length(self):
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        size = self.keys.shape[-2] if self.keys is not None and not self.is_open else 0
        return size + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("PolicyCache cannot be reset; make a new one (apply's generate "
                                  "does, per call)")

    def reorder_cache(self, beam_idx: Tensor) -> None:
        raise NotImplementedError("PolicyCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("PolicyCache cannot be cropped (assisted decoding is unsupported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("PolicyCache cannot be repeated along the batch "
                                  "(num_return_sequences / beam search are unsupported)")

    def batch_select_indices(self, indices: Tensor) -> None:
        raise NotImplementedError("PolicyCache cannot select batch indices")


class PolicyCache(Cache):
    """The compressed cache of one conversation under ``policy`` at ``budget``.

    layer_windows: per decoder layer the sliding window its cache keeps (None = full
    attention; kvpolicy.models.layer_windows), or the layer count. max_new_tokens: decode steps planned by the
    current generate call (sizes append buffers and the fixed size of evicting layers);
    bucket: round append buffers up to a multiple of this (fewer torch.compile shapes);
    recompress: whether a new turn (a call continuing a cache that finished an earlier
    call) is compressed again so that each layer keeps ``budget`` of everything seen (else
    it is appended). The chunks of one call's prompt are always compressed.
    rotary: a kvpolicy.rotary.CacheRotary for policies with positions="cache".
    After each multi-token forward ``plan`` holds the policy's Plan for the scored layers.
    defer_steps: decode steps the next multi-token step waits before compacting (set by
    apply's generate to the policy's ``defer``); ``pending`` is that step meanwhile.
    """

    def __init__(self, layer_windows: list[int | None] | int, policy: Policy, budget: Budget,
                 max_new_tokens: int = 0, bucket: int = 1, recompress: bool = True,
                 rotary=None):
        if isinstance(layer_windows, int):
            layer_windows = [None] * layer_windows
        kind = "evict" if policy.decode == "evict" else "append"
        super().__init__(layers=[KVLayer(kind, policy, w) for w in layer_windows])
        self.policy, self.budget = policy, budget
        self.max_new_tokens, self.bucket, self.recompress = max_new_tokens, bucket, recompress
        self.step = None  # the multi-token step in progress (kvpolicy.prefill.Step)
        self.defer_steps = 0
        self.pending = None  # a Step whose compaction waits for decode steps
        self.plan: Plan | None = None
        self.owner: str | None = None  # the model class this cache was filled by
        self.tokens: Tensor | None = None  # ids [B, n] of the calls finished so far
        self.compileable = True
        self.rotary = rotary  # positions="cache": kvpolicy.rotary.CacheRotary
        for layer in self.layers:
            layer.rotary = rotary

    @property
    def is_compileable(self) -> bool:
        """Whether generate may compile decode steps with this cache (and so pre-build 4-D
        masks): only on a model patched by ``apply``, whose mask function serves it."""
        return self.compileable

    @property
    def compacted(self) -> bool:
        """True once a prompt has been processed (the cache holds closed buffers)."""
        first = self.layers[0]
        return first.keys is not None and not first.is_open

    @property
    def kept(self) -> list[int]:
        """Prompt tokens kept per scored layer by the last plan."""
        if self.plan is None:
            raise RuntimeError("PolicyCache.kept: no prompt has been processed yet (run a forward "
                               "or generate with this cache first)")
        return self.plan.kept

    def settle(self) -> None:
        """Compact a step still waiting for decode steps (a generate call that ended first)."""
        if self.pending is not None:
            self.pending.resume()

    def reserve(self, new_tokens: int) -> None:
        """Make room for ``new_tokens`` decode steps in every append layer (eager)."""
        for layer in self.layers:
            if layer.keys is not None and not layer.is_open:
                layer.grow(new_tokens)

    def nbytes(self) -> int:
        """Bytes of all tensors the cache owns (K/V buffers and their bookkeeping)."""
        owned = [t for layer in self.layers for t in layer.owned()]
        if self.plan is not None:
            owned += self.plan.keep
        return sum(t.nbytes for t in {id(t): t for t in owned}.values())

    def copy(self) -> PolicyCache:
        """An independent copy (shares no tensor), e.g. to ask several questions of one
        compressed document."""
        return copy.deepcopy(self)

    def __deepcopy__(self, memo):
        if self.step is not None:
            raise RuntimeError("PolicyCache cannot be copied in the middle of a forward")
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        vars(new).update(copy.deepcopy(vars(self), memo))
        return new
