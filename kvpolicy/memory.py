"""Budgets in bytes: ``kvpolicy.Memory(fraction)`` keeps at most ``fraction`` of the full
cache's bytes, and chooses the bit width of the kept rows and how many rows to keep.

The full cache is the prompt's K/V in the model's dtype (itemsize E bytes: 4 for float32,
2 for float16 / bfloat16; "16 bits" means the model's dtype), every layer, every KV head.
A kept slot of one KV head costs, as ``PolicyCache.nbytes`` counts it: its K and V (D +
Dv elements) at ``bits`` / 8 bytes each, the scales and zeros of kvpolicy.quantized (2E
bytes per 32 key elements, per ``channel_group(Dv)`` value elements), its position (int64,
8 bytes), an evicting layer's running score (float32, 4 bytes), and a per-head slot's KV
head tag (``per_head``: int16, 2 bytes). The last ``window`` + 8 / bits - 1 kept rows of a
layer (at most: the window and the rest of a packed byte) stay in the model's dtype, and a
layer's last key group, which may hold fewer than 32 rows, costs up to one group's scales
and zeros (2E bytes per key channel) beyond its rows' share.

Rule (chosen on the tune split of ``kvpolicy eval``, docs/quality.md): the widest of 16
and 8 bits whose K/V for every token fit in the bytes (the slots' bookkeeping aside, so
Memory(1.0) is 16 bits), else ``FALLBACK_BITS`` = 4 (evicting policies: 16 bits).
On tune, at a tenth of the bytes 4 bits with 0.43 of the tokens kept the full cache's
accuracy where 8 bits with 0.27 kept 69% (KVzip, query-agnostic); at a twentieth, 4 bits
with 0.19 kept 62% where 2 bits with 0.26 kept 8%. 2 bits are never chosen for the user
(``bits=2`` stays available with a token budget). The rows kept then fill the bytes: over
L layers of a prompt of N tokens, T tokens with ``T * slot(bits) + L * (recent * (slot(16) -
slot(bits)) + 2 * E * D) <= fraction * N * L * (D + Dv) * E``. Not counted: the decode region (tokens generated
after the compaction, in the model's dtype) and a few scalars per layer; a policy's floor
(its protected tokens) wins over the budget, with the planner's warning.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from torch import nn

from . import models
from .budget import Budget
from .policy import Policy
from .quantized import TOKEN_GROUP, channel_group

WHOLE = (16, 8)  # the widths the rule takes when they keep every token, widest first
FALLBACK_BITS = 4  # otherwise (chosen on the tune split, docs/quality.md)
POSITION_BYTES, SCORE_BYTES, TAG_BYTES = 8, 4, 2  # pos int64, an evicting layer's running score float32, a per-head slot's KV head int16


@dataclass(frozen=True)
class Memory:
    """A budget in bytes: keep at most ``fraction`` (a float in (0, 1]) of the full cache's
    bytes; pass as ``budget=`` to ``kvpolicy.apply`` / ``kvpolicy.compress``."""

    fraction: float

    def __post_init__(self) -> None:
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0.0 < float(f) <= 1.0:
            raise ValueError(f"Memory({f!r}): the fraction of the full cache's bytes must be a "
                             f"float in (0, 1], e.g. Memory(0.1)")
        object.__setattr__(self, "fraction", float(f))

    def __str__(self) -> str:
        return f"Memory({self.fraction:g})"


def slot_bytes(bits: int, itemsize: int, head_dim: int, value_dim: int, evicts: bool = False,
               per_head: bool = False) -> float:
    """Bytes of one kept slot of one KV head at ``bits`` (module docstring)."""
    extra = POSITION_BYTES + (SCORE_BYTES if evicts else 0) + (TAG_BYTES if per_head else 0)
    if bits == 16:
        return (head_dim + value_dim) * itemsize + extra
    scales = 2 * itemsize * (head_dim / TOKEN_GROUP + value_dim / channel_group(value_dim))
    return (head_dim + value_dim) * bits / 8 + scales + extra


@dataclass(frozen=True)
class MemoryBudget(Budget):
    """The token budget a Memory resolves to for one model: ``value`` the nominal kept
    token fraction at ``bits`` (what reports show); ``total`` the tokens that fill the
    bytes for a prompt of a given length (module docstring)."""

    memory: Memory = Memory(1.0)
    bits: int = 16
    slot: float = 1.0  # bytes of a kept slot (one KV head) at ``bits``
    slot_full: float = 1.0  # bytes of a slot in the model's dtype, as kvpolicy stores it
    entry: float = 1.0  # bytes of a slot of the full cache (its K and V only)
    recent: int = 0  # rows per layer that may stay in the model's dtype
    group: float = 0.0  # bytes of one key group's scales and zeros (a layer's last group may be partial)

    @property
    def reserve(self) -> float:
        """Bytes per layer and KV head set aside beyond ``slot`` per kept token: the rows
        that may stay in the model's dtype and a partial last key group."""
        return self.recent * (self.slot_full - self.slot) + self.group

    def total(self, num_tokens: int, num_layers: int) -> int:
        room = self.memory.fraction * num_tokens * num_layers * self.entry - num_layers * self.reserve
        return max(0, min(int(room // self.slot), num_tokens * num_layers))

    def __str__(self) -> str:
        return f"{self.memory} ({self.value:.3g} of the tokens at {self.bits} bits)"


def resolve(memory: Memory, itemsize: int, head_dim: int, value_dim: int, window: int,
            evicts: bool, per_head: bool = False) -> MemoryBudget:
    """The bit width and token budget of ``memory`` for a model whose K/V rows have
    ``itemsize`` bytes per element and head dims ``head_dim``/``value_dim``, under a
    policy with ``window`` recent rows (``evicts``: a policy that evicts while decoding;
    ``per_head``: slots tagged with their KV head)."""
    entry = (head_dim + value_dim) * itemsize

    def cost(bits: int) -> float:
        return slot_bytes(bits, itemsize, head_dim, value_dim, evicts, per_head)

    slot_full = cost(16)
    extra = slot_full - entry  # a slot's bookkeeping (position, score, tag)
    whole = [b for b in WHOLE if memory.fraction * entry >= cost(b) - extra]  # every token's K/V fits
    bits = 16 if evicts else (whole[0] if whole else FALLBACK_BITS)
    slot = cost(bits)
    tokens = min(1.0, memory.fraction * entry / slot)
    recent = 0 if bits == 16 else window + 8 // bits - 1
    group = 0.0 if bits == 16 else 2 * itemsize * head_dim
    return MemoryBudget(tokens, memory, bits, slot, slot_full, entry, recent, group)


def storage(model: nn.Module, policy: Policy, budget, bits: int | None,
            per_head: bool = False) -> tuple[Budget, int]:
    """(Budget, bits) of a call of ``apply`` / ``compress``: a Memory budget resolved for
    ``model`` (its dtype and head dim; bits chosen by the rule, so ``bits`` must be None;
    ``per_head`` slots cost their KV head tag too), else ``Budget(budget)`` with ``bits``
    (None: 16)."""
    if not isinstance(budget, Memory):
        return Budget(budget), 16 if bits is None else bits
    if bits is not None:
        raise ValueError(f"bits={bits!r} with budget={budget}: a Memory budget chooses the bit "
                         f"width itself; drop bits= (or pass a token budget with bits=)")
    text = models.text_config(model)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    itemsize = next(model.parameters()).dtype.itemsize
    b = resolve(budget, itemsize, head_dim, head_dim, getattr(policy, "window", 0),
                policy.requirements().decode == "evict", per_head)
    return b, b.bits


def held_fraction(cache, tokens: int) -> float:
    """The bytes ``cache`` (a PolicyCache after its plan) holds for its kept prompt rows,
    counted as ``nbytes`` counts them (quantized rows with scales and zeros, rows in the
    model's dtype, positions, running scores, per-head slots' KV head tags) without the
    decode region, over the bytes of the full cache's K/V for ``tokens`` prompt tokens
    (every scored layer)."""
    held = full = 0
    for layer, kept in zip([layer for layer in cache.layers if layer.scored], cache.kept):
        B, G = layer.pos.shape[0], layer.kv_heads
        entry = layer.keys[0, 0, 0].nbytes + layer.values[0, 0, 0].nbytes  # one KV head's row
        rest = POSITION_BYTES + (SCORE_BYTES if layer.scores is not None else 0)
        rest += TAG_BYTES if layer.flat else 0
        entries = kept * G  # per batch row (a per-head plan's kept is the mean over heads)
        quantized = 0 if layer.quantized is None else layer.quantized.rows * layer.pos.shape[1]
        q_bytes = 0 if layer.quantized is None else sum(t.nbytes for t in layer.quantized.tensors())
        held += q_bytes + ((entries - quantized) * entry + entries * rest) * B
        full += tokens * entry * B * G
    return held / full
