"""The ``kvpolicy`` attention and mask functions registered with transformers: routing only.

A forward over a PolicyCache goes to the cache (``PolicyCache.attend``: a multi-token
forward to its prefill observer, a one-token forward to the layer's decode step); without a
PolicyCache (a plain forward) it is the model's own attention with the causal mask it
would have built.
"""
from __future__ import annotations

from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import plain_attention
from .cache import PolicyCache

NAME = "kvpolicy"
CACHE_KWARG = "kvpolicy_cache"


def register() -> None:
    """Register the attention and mask functions under ``kvpolicy`` (idempotent)."""
    AttentionInterface.register(NAME, kvpolicy_attention)
    AttentionMaskInterface.register(NAME, kvpolicy_mask)


def kvpolicy_mask(batch_size: int, q_length: int, kv_length: int, *args,
                  attention_mask: Tensor | None = None, **kwargs) -> Tensor | None:
    """The raw 2-D padding mask bool [B, kv] for multi-token steps, None for decode steps
    (each layer masks its own slots; None keeps compiled decode inputs static)."""
    return attention_mask if q_length > 1 else None


def kvpolicy_attention(module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0,
                       scaling: float | None = None, sliding_window: int | None = None,
                       softcap: float | None = None, s_aux: Tensor | None = None,
                       **kwargs) -> tuple[Tensor, None]:
    """query [B, H, q, D], key/value as the cache returned them -> (out [B, q, H, D], None)."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    cache: PolicyCache | None = kwargs.get(CACHE_KWARG)
    if cache is None:
        return plain_attention(module, query, key, value, attention_mask, scaling,
                               sliding_window, softcap, s_aux), None
    return cache.attend(module, query, key, value, scaling, sliding_window, softcap, s_aux), None
