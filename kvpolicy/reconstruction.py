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

import torch
from torch import Tensor, nn

from . import models
from .attention import attend, probabilities, prompt_mask
from .layer import KVLayer
from .pipeline import Observation, ScoreTally

QUERY_BLOCK = 256  # reconstruction queries whose probabilities are held at once


class PassObserver:
    """One reconstruction pass over ``layers`` (closed, holding the whole context): its q
    tokens at the positions after the context; it scores the context slots whose position is
    below ``sinks`` or in [start, stop), with the softmax over those keys and the pass's own
    (KVzip's chunk-local softmax), and keeps each slot's max in ``tally``."""

    def __init__(self, layers: list[KVLayer], q: int, start: int, stop: int, sinks: int,
                 tally: ScoreTally):
        first = layers[0]
        self.new_pos = first.next_pos[:, None] + torch.arange(q, device=first.next_pos.device)
        self.start, self.stop, self.sinks, self.tally = start, stop, sinks, tally
        self.attended: set[int] = set()

    def attend(self, layer_idx: int, layer: KVLayer, module, query: Tensor, key: Tensor,
               value: Tensor, scaling: float, softcap: float | None,
               sinks: Tensor | None) -> Tensor:
        """query [1, H, q, D]; key/value [1, G, C + q, D] (the context slots, then the
        pass's tokens). Returns the model's attention out [1, q, H, Dv]; scores a planned
        layer's context slots."""
        self.attended.add(layer_idx)
        visible = prompt_mask(layer.pos[:, 0], self.new_pos, layer.attention_window)
        out = attend(module, query, key, value, visible, scaling, softcap, sinks)
        if layer.scored:
            self.observe(layer_idx, layer, query, key, scaling, softcap, sinks)
        return out

    def observe(self, layer_idx: int, layer: KVLayer, query: Tensor, key: Tensor, scaling: float,
                softcap: float | None, sinks: Tensor | None) -> None:
        B, H, q, _ = query.shape
        G, C = key.shape[1], key.shape[2] - q
        pos = layer.pos[0, 0, :C]
        scored = (pos >= 0) & ((pos < self.sinks) | ((pos >= self.start) & (pos < self.stop)))
        slots = scored.nonzero()[:, 0]
        sub = torch.cat([key[:, :, slots], key[:, :, C:]], 2).float()  # [B, G, s + q, D]
        s = slots.shape[0]
        own = torch.ones(q, s + q, dtype=torch.bool, device=key.device)
        own[:, s:] = torch.tril(own[:, s:])
        group_sinks = None if sinks is None else sinks.view(G, H // G)
        best = torch.zeros(B, G, s, device=key.device)
        grouped = query.view(B, G, H // G, q, -1)  # query head g * H/G + j is KV head g's
        for a in range(0, q, QUERY_BLOCK):
            block = grouped[:, :, :, a:a + QUERY_BLOCK].float()
            logits = torch.einsum("bghtd,bgsd->btghs", block, sub) * scaling
            probs = probabilities(logits, own[a:a + QUERY_BLOCK, None, None, :], softcap,
                                  group_sinks)
            best = torch.maximum(best, probs[..., :s].amax(dim=(1, 3)))
        full = best.new_zeros(B, G, C)
        full[:, :, slots] = best
        self.tally.add_max(layer_idx, Observation(full))


def reconstruct(model: nn.Module, cache) -> None:
    """Run the policy's reconstruction passes of the context ``cache`` holds (a PolicyCache
    whose first prompt is complete and uncompressed), then let it plan and compact."""
    context = cache.reconstruction_context()
    n = context.shape[1]
    with torch.no_grad():
        for start, stop, ids in cache.policy.reconstruction(context, cache.reconstruction_chunk):
            cache.begin_pass(start, stop)
            positions = torch.arange(n, n + ids.shape[1], device=ids.device)[None]
            model(input_ids=ids.to(model.device), position_ids=positions.to(model.device),
                  use_cache=True, logits_to_keep=1, **{models.CACHE_ARG: cache})
    cache.end_reconstruction()
