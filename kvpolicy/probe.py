"""The check ``attach`` (and so ``apply``) runs before keeping a model: its layers must hand
kvpolicy's attention function the cache."""
from __future__ import annotations

import torch
from torch import nn

from . import interface, models
from .budget import Budget
from .cache import PolicyCache
from .prefill import UnreachedLayersError
from .registry import get_policy

_REACHED: set[type] = set()  # model classes whose layers were seen handing over the cache


def check_attention_reached(model: nn.Module, windows: list[int | None]) -> None:
    """Refuse a model whose layers do not hand kvpolicy's attention function the cache (an
    attention computed outside transformers' AttentionInterface, or a forward that drops
    the keyword arguments on the way): one 2-token forward with a throwaway cache that
    keeps everything, once per model class. It calls ``model.forward`` as the hooks would
    drive it, so forward hooks of the caller's see no forward of ours."""
    if type(model) in _REACHED:
        return
    vocab = models.text_config(model).vocab_size
    token = next(t for t in range(min(3, vocab - 1), vocab) if t not in models.vision_token_ids(model))
    ids = torch.full((1, 2), token, dtype=torch.long, device=model.device)
    cache = PolicyCache(windows, get_policy("uniform", window=1), Budget(1.0))
    cache.begin_forward(type(model).__name__, windows, torch.ones_like(ids, dtype=torch.bool), None,
                        decode=False)
    own = models.attn_implementation(model)
    models.set_attn_implementation(model, interface.NAME)
    try:
        with torch.no_grad():
            model.forward(input_ids=ids, use_cache=True,
                          **{models.CACHE_ARG: cache, interface.CACHE_KWARG: cache})
        cache.end_forward()
    except UnreachedLayersError:
        raise models.UnsupportedModelError(
            f"{type(model).__name__}: its layers do not pass the cache to transformers' attention "
            f"interface, so kvpolicy cannot see their attention. Run it without kvpolicy.") from None
    finally:
        models.set_attn_implementation(model, own)
    _REACHED.add(type(model))
