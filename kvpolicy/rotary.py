"""Rotary positions inside the cache (``streamingllm(positions="cache")``, StreamingLLM's
rule): a layer stores its keys un-rotated and, at each attention, rotates every cached key
at its rank among the cached tokens (0, 1, ... in the order they were seen) and the query
at its own rank, so the positions used never exceed the cache size however long the
generation. The model itself is given those positions as ``position_ids``.

Exact only where kvpolicy can re-apply the model's rotary embedding: the default rotary
(no scaling), over the whole head, with Llama's half-rotation, in full-attention layers;
other models are refused by name (``CacheRotary(model)``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from . import models

# families whose attention applies the rotary as Llama does: x cos + rotate_half(x) sin
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class CacheRotary:
    """The model's rotary embedding as a table of cos / sin per position (float32, grown
    on demand), to un-rotate keys the model rotated and rotate them at cache positions (or
    un-rotate queries: ``purpose`` names the user in a refusal)."""

    def __init__(self, model: nn.Module,
                 purpose: str = "streamingllm(positions='cache') re-applies the rotary embedding "
                                "at positions inside the cache",
                 instead: str = "Use positions='original' (keys keep the positions they were "
                                "seen at)."):
        text = models.text_config(model)
        name, family = type(model).__name__, getattr(text, "model_type", None)
        why = refusal(model, text, family)
        if why:
            raise models.UnsupportedModelError(
                f"{purpose}, which kvpolicy cannot do exactly for {name} ({family}): {why}. "
                f"{instead}")
        self.module = model.get_decoder().rotary_emb
        self.max_positions = int(text.max_position_embeddings)
        self.cos = self.sin = None

    def __deepcopy__(self, memo) -> CacheRotary:
        return self  # the model's module and a table of constants: shared by cache copies

    def table(self, n: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """(cos, sin) float32 [>= n, D]: the model's own values at positions 0 .. n - 1."""
        if self.cos is None or self.cos.shape[0] < n or self.cos.device != device:
            grown = min(max(2 * (0 if self.cos is None else self.cos.shape[0]), 64), self.max_positions)
            size = max(n, grown)
            ids = torch.arange(size, device=device)[None]
            probe = torch.zeros(1, dtype=torch.float32, device=device)
            cos, sin = self.module(probe, position_ids=ids)
            self.cos, self.sin = cos[0].float(), sin[0].float()
        return self.cos, self.sin

    def rotate(self, x: Tensor, positions: Tensor, inverse: bool = False) -> Tensor:
        """x [B, heads, S, D] rotated to positions int64 [B, S] (>= 0), or back from them
        (``inverse``); computed in float32, returned in x's dtype."""
        cos, sin = self.table(int(positions.max()) + 1, x.device)
        cos, sin = cos[positions][:, None], sin[positions][:, None]  # [B, 1, S, D]
        xf = x.float()
        half = xf.shape[-1] // 2
        turned = torch.cat([-xf[..., half:], xf[..., :half]], -1)
        return (xf * cos + turned * (-sin if inverse else sin)).to(x.dtype)

    def place(self, query: Tensor, keys: Tensor, pos: Tensor, query_pos: Tensor,
              given: Tensor) -> tuple[Tensor, Tensor]:
        """(query, keys) rotated at their positions inside the cache.

        query [B, H, q, D] as the model rotated it at ``given`` int64 [B, q]; keys
        [B, G, S, D] un-rotated; pos int64 [B, S]: each slot's original position (< 0 =
        empty); query_pos int64 [B, q]: the queries' original positions.
        """
        ranks, sorted_pos = cache_ranks(pos)
        query_rank = (torch.searchsorted(sorted_pos, query_pos, right=True) - 1).clamp_min(0)
        keys = self.rotate(keys, ranks)
        query = self.rotate(self.rotate(query, given.clamp_min(0), inverse=True), query_rank)
        return query, keys


def cache_ranks(pos: Tensor) -> tuple[Tensor, Tensor]:
    """For slot positions pos int64 [B, S] (< 0 = empty): (rank int64 [B, S] of each slot
    among its row's filled slots by position, empty slots after them; the positions
    sorted ascending, empty slots last)."""
    key = torch.where(pos >= 0, pos, torch.iinfo(torch.long).max)
    sorted_pos, order = key.sort(-1)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(pos.shape[-1], device=pos.device).expand_as(order))
    return ranks, sorted_pos


def refusal(model: nn.Module, text, family: str | None) -> str:
    """Why the model's rotary cannot be re-applied exactly ('' when it can)."""
    if family not in FAMILIES:
        return (f"it is not a family known to rotate keys as Llama does (supported: "
                f"{', '.join(FAMILIES)}); models without rotary positions have none to move")
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind != "default":
        return f"its rotary type is {kind!r} (scaled); only the default rotary is re-applied"
    if getattr(text, "partial_rotary_factor", 1.0) != 1.0:
        return "its rotary covers part of each head"
    if any(w is not None for w in models.layer_windows(model)):
        return "it has sliding-window layers, whose cache keeps positions of its own"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if getattr(decoder, "rotary_emb", None) is None:
        return "its decoder has no shared rotary embedding module"
    return ""


def cache_position_ids(cache, new_valid: Tensor, decode: bool) -> Tensor:
    """int64 [B, q]: the position inside the cache of each of a forward's q new tokens
    (new_valid bool [B, q]; padding gets 0): after the row's m cached tokens; a decode
    step into a full fixed-size layer takes the last of its ``size`` slots."""
    first = cache.layers[0]
    B = new_valid.shape[0]
    held = (first.pos[:, 0] >= 0).sum(-1) if first.pos is not None else new_valid.new_zeros(
        B, dtype=torch.long)
    if decode:
        return (torch.minimum(held + 1, first.sizes.view(-1)) - 1)[:, None]
    return (held[:, None] + new_valid.long().cumsum(-1) - 1).clamp_min(0)
