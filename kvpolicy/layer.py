"""KVLayer: one decoder layer's K/V buffers inside a PolicyCache, and its decode step.

A layer is ``closed`` between forwards: static buffers keys/values [B, G, C, D] with the
position id of each slot's token in ``pos`` int64 [B, G, C] (-1 = empty). A multi-token
forward (a prompt, a prompt chunk, a new chat turn) ``opens`` every layer: ``update``
returns the old slots followed by the new tokens, and after the forward the prefill step
(kvpolicy.prefill, kvpolicy.planning) and the cache plan and compact them into new closed
buffers. A one-token forward on
a closed layer is a decode step, in place and with fixed shapes (torch.compile-able):

- ``append`` layers write the next free slot (``used`` int64 [1]);
- ``evict`` layers (policies that hold a fixed size) overwrite the slot with the lowest
  ``policy.victim_priority`` (empty slots first) and keep running ``scores`` float32
  [B, G, C]: the sum of each step's attention probabilities, or only the last step's
  (``Requirements.running``: "sum", "last");
- ``sliding`` layers (the model's own sliding-window attention) are a ring of ``window``
  slots overwriting the oldest token.

Slot validity is shared by a row's KV heads (only which token a slot holds differs), except
in a per-head layer's unflattened rows (below).

Per-head plans (``per_head`` layers: append layers of a policy planning per KV head) close
into one flat row of slots per batch row: keys [B, 1, T, D] and pos [B, 1, T] with
``slot_heads`` int16 [B, T] the KV head each slot belongs to (-1: none), each row's kept
prompt rows head after head (padded to the longest row), then the decode region, where a
step writes its G heads' rows into G consecutive slots. So the bytes follow the kept
entries, not the longest head times the heads. A query head attends only its KV head's
slots (kvpolicy_kernels.head_attention). A multi-token step (``open``) or a compaction
(``expand``) first unflattens them into [B, G, S, D], each head's rows first and the rest of
its row empty (pos -1): the heads then hold different tokens, which the prompt's masks and
the plan's ``Stats.head_valid`` follow per head.

With ``bits`` < 16 (append layers), ``close`` quantizes the first kept prompt rows
(kvpolicy.quantized.QuantizedRows, ``quantized``); ``keys``/``values`` then hold only the
slots after them (the policy's recent window, the rest of a packed byte, the decode
region) in the model's dtype, while ``pos`` still covers every slot. A decode step reads
them in place (kvpolicy_kernels.quantized_attention, which dequantizes as it reads: CUDA,
and eager float32 on CPU) when no probabilities are needed and no cache rotary re-rotates
the keys, else dequantizes them in front of the buffers (eager: into the cache's shared
``scratch``; compiled: inside the graph); a
multi-token step (``open``) or a compaction (``unquantize``) first puts them back in full
precision. A per-head layer's flat rows are quantized the same way, as one KV head's rows
(``close_flat``: the prompt rows head after head, so a token group spans two heads only at a
head's boundary); its decode attends the dequantized rows by their ``slot_heads``.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from transformers.cache_utils import CacheLayerMixin

from kvpolicy_kernels import head_attention, quantized_attention, quantized_cpu

from .attention import grouped_attention, visible_slots
from .policy import Policy
from .quantized import QuantizedRows, Scratch, quantizable_rows

Kind = Literal["append", "evict", "sliding"]
EMPTY, UNUSABLE = -1, -2  # slot positions: free, or beyond a shorter batch row's fixed size


class KVLayer(CacheLayerMixin):
    """One decoder layer's cache (see the module docstring). ``seen`` is the logical
    length (tokens seen, padding included: what generate slices by); ``next_pos`` int64
    [B] the next real token's position per row. Windows: ``cache_window`` the sliding
    window the model's cache keeps for this layer (None: full attention), and
    ``attention_window`` the one its attention masks with (learnt at the first forward);
    a policy's ``window`` is another thing (its recent protected tokens)."""

    is_compileable = True

    def __init__(self, kind: Kind, policy: Policy | None = None, window: int | None = None,
                 bits: int = 16, scratch: Scratch | None = None):
        super().__init__()
        self.kind = "sliding" if window else kind
        self.bits = bits if self.kind == "append" else 16
        self.per_head = self.kind == "append" and policy is not None and policy.requirements().per_head
        self.slot_heads: Tensor | None = None  # per_head layers, closed: int16 [B, T]
        self._split = False  # unflattened per-head rows: the heads hold different slots
        self.quantized: QuantizedRows | None = None
        self.scratch = scratch or Scratch()
        self.policy, self.cache_window = policy, window
        self.running = "sum" if policy is None else policy.requirements().running
        self.attention_window: int | None = None
        self.window_known = False
        self.is_open, self._transient = False, False
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
        none) at its first forward; a later change is an error. (It is the layer's
        ``cache_window`` in every family but a few whose cache keeps a window their attention
        does not mask: both are followed.)"""
        if not self.window_known:
            self.attention_window, self.window_known = window, True
        elif window != self.attention_window:
            raise RuntimeError(f"kvpolicy: a layer attended with sliding window "
                               f"{self.attention_window} "
                               f"is now attended with window {window}")

    @property
    def is_sliding(self) -> bool:
        """Whether this layer's cache is the model's sliding window (as transformers' own
        sliding layers say)."""
        return self.kind == "sliding"

    @property
    def scored(self) -> bool:
        """Whether the policy plans this layer (sliding layers keep their window)."""
        return self.kind != "sliding"

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.kv_heads = key_states.shape[1]
        self.seen = self.seen.to(self.device)
        self.is_initialized = True

    # ---- a multi-token step ----------------------------------------------------------
    def open(self, new_pos: Tensor, transient: bool = False) -> None:
        """Start a multi-token step whose tokens have positions new_pos int64 [B, q] (-1 at
        padding); transient: the step's tokens are attended, never stored (a reconstruction
        pass: the layer keeps only its old slots, so the passes copy no layer's cache)."""
        self.expand()
        self.is_open, self._new_pos, self._transient = True, new_pos, transient

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
        if self._transient:
            live = self.occupied()
            return (torch.cat([self.keys[:, :, :live], key_states], dim=2),
                    torch.cat([self.values[:, :, :live], value_states], dim=2))
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
        C = self.slots
        ring = self.kind == "evict" or (self.kind == "sliding" and C >= self.cache_window)
        return C if ring else int(self.used)

    def _quantized(self, keys: Tensor, values: Tensor, kept: int, quantize: bool) -> QuantizedRows | None:
        """The first of ``kept`` rows of keys/values [B, G, C, D] in ``bits`` (all but the
        policy's window, whole packed bytes), or None (16 bits, too few rows, or not
        ``quantize``)."""
        if self.bits == 16 or not quantize:
            return None
        rows = quantizable_rows(kept, getattr(self.policy, "window", 0), self.bits)
        if not rows:
            return None
        return QuantizedRows.quantize(keys[:, :, :rows], values[:, :, :rows], self.bits)

    def close(self, keys: Tensor, values: Tensor, pos: Tensor, kept: int, next_pos: Tensor,
              scores: Tensor | None, sizes: Tensor | None, quantize: bool = True) -> None:
        """End the step: adopt compacted buffers [B, G, C, D] whose first ``kept`` slots are
        filled (pos int64 [B, G, C]; evict layers: running scores [B, G, C], each row's
        fixed size int64 [B]); quantize: store the prompt rows in ``bits`` (False: a
        compaction that will run again)."""
        self.quantized, self.slot_heads, self._split = self._quantized(keys, values, kept, quantize), None, False
        if self.quantized is not None:
            rows = self.quantized.rows
            keys, values = keys[:, :, rows:].clone(), values[:, :, rows:].clone()
        self.keys, self.values, self.pos, self.next_pos = keys, values, pos, next_pos
        self.scores = scores
        self.sizes = None if sizes is None else sizes.view(-1, 1, 1)
        self.used = torch.full((1,), kept, dtype=torch.long, device=keys.device)
        self.is_open = False
        for t in self.owned():
            torch._dynamo.mark_static_address(t)

    def close_as_held(self, next_pos: Tensor) -> None:
        """End the step on the slots the layer holds, in full precision and without a copy
        (a first prompt awaiting its reconstruction passes); per-head rows stay unflattened
        (``is_split``)."""
        split = self._split
        self.close(self.keys.contiguous(), self.values.contiguous(), self.pos.contiguous(),
                   self.keys.shape[2], next_pos, self.scores, None, quantize=False)
        self._split = split

    def close_flat(self, keys: Tensor, values: Tensor, pos: Tensor, slot_heads: Tensor,
                   kept: int, next_pos: Tensor, quantize: bool = True) -> None:
        """End the step on per-head rows in the flat layout (see the module docstring):
        keys [B, 1, T, D], values [B, 1, T, Dv], pos int64 [B, 1, T], slot_heads int16
        [B, T], the first ``kept`` slots holding the prompt rows (head after head); with
        ``bits`` < 16 they are quantized as one KV head's rows, as ``close`` does."""
        self.quantized = self._quantized(keys, values, kept, quantize)
        if self.quantized is not None:
            rows = self.quantized.rows
            keys, values = keys[:, :, rows:].clone(), values[:, :, rows:].clone()
        self.keys, self.values, self.pos, self.next_pos = keys, values, pos, next_pos
        self.slot_heads, self.scores, self.sizes = slot_heads, None, None
        self._split = False
        self.used = torch.full((1,), kept, dtype=torch.long, device=keys.device)
        self.is_open = False
        for t in self.owned():
            torch._dynamo.mark_static_address(t)

    def held(self) -> tuple:
        """The closed layer's state, for ``rewind`` (references, no copies)."""
        return (self.keys, self.values, self.quantized, self.pos, self.scores, self.seen,
                self.slot_heads, self.used, self._split)

    def rewind(self, held: tuple) -> None:
        """End a multi-token step without keeping its tokens: back to ``held`` (a
        reconstruction pass attends the context and leaves it as it was)."""
        (self.keys, self.values, self.quantized, self.pos, self.scores, self.seen,
         self.slot_heads, self.used, self._split) = held
        self.is_open = False

    # ---- per-head rows -----------------------------------------------------------------
    @property
    def flat(self) -> bool:
        """Whether the layer holds per-head rows in the flat layout."""
        return self.slot_heads is not None

    def expand(self) -> None:
        """Put every row back in the layout [B, G, C, D] in the model's dtype, before a
        multi-token step or a compaction: quantized rows dequantized, per-head rows
        unflattened (each head's rows first, in slot order, the rest empty)."""
        self.unquantize()
        if self.slot_heads is None:
            return
        B, _, T, D = self.keys.shape
        G = self.kv_heads
        held = (self.slot_heads >= 0) & (self.pos[:, 0] >= 0)  # [B, T]
        mine = held[..., None] & (self.slot_heads[..., None] == torch.arange(G, device=held.device))
        rank = mine.long().cumsum(1) - 1  # [B, T, G]: the slot's index among its head's
        S = max(1, int(mine.sum(1).max()))
        b, t = held.nonzero(as_tuple=True)
        head = self.slot_heads[b, t].long()
        at = head * S + rank[b, t, head]
        keys = self.keys.new_zeros(B, G * S, D)
        values = self.values.new_zeros(B, G * S, self.values.shape[-1])
        pos = self.pos.new_full((B, G * S), EMPTY)
        keys[b, at], values[b, at], pos[b, at] = self.keys[b, 0, t], self.values[b, 0, t], self.pos[b, 0, t]
        self.keys, self.values = keys.view(B, G, S, D), values.view(B, G, S, -1)
        self.pos, self.slot_heads, self._split = pos.view(B, G, S), None, True
        self.used = torch.full((1,), S, dtype=torch.long, device=keys.device)

    @property
    def is_split(self) -> bool:
        """Whether the layer's KV heads hold different slots (per-head rows unflattened by
        ``expand``, open or held for reconstruction passes): its masks and plan then follow
        each head's ``pos``."""
        return self._split

    # ---- quantized prompt rows ---------------------------------------------------------
    @property
    def slots(self) -> int:
        """C: the slots ``pos`` covers (quantized rows and the buffers' own)."""
        return self.keys.shape[2] + (0 if self.quantized is None else self.quantized.rows)

    def unquantize(self) -> None:
        """Put the quantized prompt rows back in front of the buffers, in the model's dtype
        (before a multi-token step or a compaction; they are quantized again at close)."""
        if self.quantized is not None:
            self.keys, self.values = self.quantized.joined(self.keys, self.values)
            self.quantized = None

    def _rows(self) -> tuple[Tensor, Tensor]:
        """(keys [B, G, C, D], values [B, G, C, Dv]): every slot in the model's dtype (eager
        with quantized rows: views of the scratch, valid until the next layer's step)."""
        if self.quantized is None:
            return self.keys, self.values
        if torch.compiler.is_compiling():
            return self.quantized.joined(self.keys, self.values)
        return self.scratch.rows(self.quantized, self.keys, self.values)

    def _fused(self, query: Tensor, observe: bool) -> bool:
        """Whether a decode step attends the quantized rows where they lie
        (kvpolicy_kernels.quantized_attention: CUDA, and float32 eager CPU through its C
        kernels) rather than over ``_rows``: it returns no probabilities, and takes the keys
        as stored (no cache rotary)."""
        return (self.quantized is not None
                and (query.is_cuda or quantized_cpu.serves(query, self.values))
                and self.rotary is None and not observe and self.scores is None)

    # ---- the decode step -------------------------------------------------------------
    def _write(self, key_states: Tensor, value_states: Tensor) -> None:
        """Write one token [B, G, 1, D] into its slot."""
        B, G, C, D = self.keys.shape
        if self.rotary is not None:
            key_states = self.rotary.rotate(key_states, self.given, inverse=True)
        if self.flat:  # the step's G head rows into G consecutive slots
            heads = key_states.shape[1]
            slots = self.used + torch.arange(heads, device=self.used.device)
            rows = slots if self.quantized is None else slots - self.quantized.rows
            self.keys.index_copy_(2, rows, key_states.transpose(1, 2))
            self.values.index_copy_(2, rows, value_states.transpose(1, 2))
            self.pos.index_copy_(2, slots, self.next_pos.view(B, 1, 1).expand(B, 1, heads))
            self.used.add_(heads)
            return
        if self.kind == "append" or (self.kind == "sliding" and C < self.cache_window):
            row = self.used if self.quantized is None else self.used - self.quantized.rows
            self.keys.index_copy_(2, row, key_states)
            self.values.index_copy_(2, row, value_states)
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
               sinks: Tensor | None, observe: bool = False) -> tuple[Tensor, Tensor | None]:
        """One token's attention over the layer's slots: query [B, H, 1, D] -> (out [B, 1,
        H, Dv], probs fp32 [B, G, C] summed over each group when ``observe``, else None).
        Evicting layers add the probabilities to their running scores (or replace them:
        running "last")."""
        self.adopt_window(window)
        visible = visible_slots(self.pos, self.next_pos - 1, self.attention_window)
        if self.flat:
            if observe:
                raise RuntimeError("kvpolicy: per-head rows cannot be observed while decoding")
            keys, values = self._rows()
            out = head_attention(query, keys[:, 0], values[:, 0], self.slot_heads,
                                 visible[:, 0], kv_heads=self.kv_heads, scaling=scaling,
                                 softcap=softcap or 0.0, sinks=sinks)
            return out, None
        if self._fused(query, observe):
            out = quantized_attention(query, self.quantized.tensors(), self.keys, self.values, visible,
                                      bits=self.quantized.bits, scaling=scaling, softcap=softcap or 0.0,
                                      sinks=sinks)
            return out, None
        keys, values = self._rows()
        if self.rotary is not None:
            query, keys = self.rotary.place(query, keys, self.pos[:, 0], self.next_pos[:, None] - 1,
                                            self.given)
        out, probs = grouped_attention(query, keys, values, visible, scaling, softcap,
                                       sinks, need_probs=observe or self.scores is not None)
        if self.scores is not None and self.running == "last":
            self.scores.copy_(probs)
        elif self.scores is not None:
            self.scores.add_(probs)
        return out, probs

    # ---- bookkeeping -----------------------------------------------------------------
    def grow(self, slots: int) -> None:
        """Give an append layer at least ``slots`` free slots (eager only: reads ``used``)."""
        B, G, C, D = self.keys.shape
        limit = self.cache_window if self.kind == "sliding" else None
        if self.kind == "evict" or (limit is not None and C >= limit):
            return  # rings: a fixed size
        if self.flat:  # a token is a slot per KV head
            slots *= self.kv_heads
        free = self.slots - int(self.used)
        if free >= slots:
            return
        extra = slots - free if limit is None else min(slots - free, limit - C)
        if self.flat:
            extra = -(-extra // self.kv_heads) * self.kv_heads
            ring = torch.arange(extra, device=self.keys.device) % self.kv_heads
            self.slot_heads = torch.cat([self.slot_heads, ring.to(torch.int16).expand(B, extra)], 1)
        self.keys = torch.cat([self.keys, self.keys.new_zeros(B, G, extra, D)], 2)
        self.values = torch.cat([self.values, self.values.new_zeros(B, G, extra, self.values.shape[-1])], 2)
        self.pos = torch.cat([self.pos, self.pos.new_full((B, G, extra), -1)], 2)
        for t in self.owned():
            torch._dynamo.mark_static_address(t)

    def owned(self) -> list[Tensor]:
        """The tensors this layer owns (its memory)."""
        names = ("keys", "values", "pos", "next_pos", "used", "scores", "sizes", "seen", "slot_heads")
        quantized = [] if self.quantized is None else self.quantized.tensors()
        return [t for n in names if isinstance(t := getattr(self, n, None), Tensor)] + quantized

    def get_seq_length(self):
        return self.seen if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        size = self.slots if self.keys is not None and not self.is_open else 0
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
