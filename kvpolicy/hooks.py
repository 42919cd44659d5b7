"""The forward hooks that drive a PolicyCache through a model's forward: before it, open a
multi-token step (or make room for a decode step); after it, plan and compact. They act
only when a PolicyCache is passed, so a model can keep them (``attach``) and still run
every other cache exactly as before: on a model whose attention is not ``kvpolicy`` they
switch it for that forward only, so its own mask builder never sees a ragged cache."""
from __future__ import annotations

import torch
from torch import nn

from . import attention, models
from .cache import PolicyCache
from .prefill import Step
from .rotary import cache_position_ids


class CacheHooks:
    """Pre/post forward hooks on ``model`` for PolicyCache forwards; ``remove()`` undoes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.windows = models.layer_windows(model)
        self._switched: str | None = None
        attention.register()
        self._pre = model.register_forward_pre_hook(self.before, with_kwargs=True)
        self._post = model.register_forward_hook(self.after, with_kwargs=True)

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()

    def before(self, module: nn.Module, args: tuple, kwargs: dict):
        cache = models.given_cache(kwargs)
        if not isinstance(cache, PolicyCache):
            return None
        models.pass_cache(kwargs, cache)  # under the installed transformers' keyword
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if ref is None:
            raise ValueError("kvpolicy: the forward got neither input_ids nor inputs_embeds")
        B, q = ref.shape[:2]
        if torch.compiler.is_compiling():
            kwargs[attention.CACHE_KWARG] = cache
            return args, kwargs
        self.check(cache, B)
        if models.attn_implementation(self.model) != attention.NAME:
            self._switched = models.attn_implementation(self.model)
            models.set_attn_implementation(self.model, attention.NAME)
        decode = q == 1 and cache.compacted
        new_valid = torch.ones(B, 1, dtype=torch.bool, device=ref.device) if decode else \
            self.new_valid(kwargs.get("attention_mask"), B, q, ref.device)
        if cache.rotary is not None:  # positions inside the cache, checked before the forward
            kwargs["position_ids"] = place_positions(cache, new_valid, decode)
        if decode:
            cache.reserve(1)
        else:
            cache.settle()  # a deferred step compacts before the next one opens
            Step(cache, new_valid, self.vision(cache, input_ids))
        kwargs[attention.CACHE_KWARG] = cache
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        cache = models.given_cache(kwargs)
        if not isinstance(cache, PolicyCache) or torch.compiler.is_compiling():
            return None
        if cache.step is not None:
            cache.step.finish()
        elif cache.pending is not None:  # a decode step of a deferred compaction
            cache.pending.tick()
        if self._switched is not None:
            models.set_attn_implementation(self.model, self._switched)
            self._switched = None
        return None

    def check(self, cache: PolicyCache, batch: int) -> None:
        """Refuse a cache built for another model or batch before anything is touched."""
        name = type(self.model).__name__
        if cache.owner is not None and cache.owner != name:
            raise ValueError(f"this PolicyCache was filled by a {cache.owner}, not this {name}")
        if [layer.window for layer in cache.layers] != self.windows:
            raise ValueError(f"this PolicyCache's {len(cache.layers)} layers were shaped for another "
                             f"model than this {name}")
        if cache.layers[0].next_pos is not None and cache.layers[0].next_pos.shape[0] != batch:
            raise ValueError(f"this PolicyCache holds {cache.layers[0].next_pos.shape[0]} sequences; "
                             f"a continuation must keep the batch size (got {batch})")
        cache.owner = name

    @staticmethod
    def new_valid(mask, batch: int, q: int, device) -> torch.Tensor:
        """bool [B, q]: which of the step's tokens are real (the 2-D mask's last q columns)."""
        if isinstance(mask, dict):  # Qwen2-VL: masks per layer type
            mask = mask.get("full_attention")
        if mask is None:
            return torch.ones(batch, q, dtype=torch.bool, device=device)
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("kvpolicy needs a 2-D padding attention_mask [batch, length]")
        return mask[:, -q:].bool()

    def vision(self, cache: PolicyCache, input_ids) -> torch.Tensor | None:
        if input_ids is not None:
            return models.vision_mask(self.model, input_ids)
        if models.vision_token_ids(self.model) and cache.policy.queries == "post_vision":
            raise ValueError(f"{cache.policy.name} needs input_ids to find the vision tokens; "
                             f"inputs_embeds alone carry no token ids")
        return None


def place_positions(cache: PolicyCache, new_valid: torch.Tensor, decode: bool) -> torch.Tensor:
    """The position ids int64 [B, q] of a forward's tokens inside the cache (positions=
    "cache"), handed to every layer; refuses a forward whose positions, or whose layers'
    fixed size after it, would reach the model's max_position_embeddings."""
    given = cache_position_ids(cache, new_valid, decode)
    limit = cache.rotary.max_positions
    reach = int(given.max()) + 1
    if not decode:  # the fixed size each layer keeps after this step (budget.total / L, rounded up)
        first, L = cache.layers[0], len(cache.layers)
        held = 0 if first.next_pos is None else int(first.next_pos.max())
        seen = held + int(new_valid.sum(-1).max()) + cache.max_new_tokens
        reach = max(reach, -(-cache.budget.total(seen, L) // L))
    if reach > limit:
        raise ValueError(f"kvpolicy {cache.policy.name}(positions='cache'): {reach} positions inside "
                         f"the cache exceed the model's {limit} (max_position_embeddings); prefill "
                         f"a long prompt in chunks (kvpolicy.compress(..., chunk_size=...)) and keep "
                         f"budget x (tokens + max_new_tokens) within {limit}")
    for layer in cache.layers:
        layer.given = given
    return given


def attach(model: nn.Module) -> CacheHooks:
    """Keep hooks on ``model`` so that forwards and generate calls given a PolicyCache (from
    ``kvpolicy.compress``) run it; other caches are untouched. Idempotent; ``detach``
    removes them."""
    hooks = getattr(model, "_kvpolicy_hooks", None)
    if hooks is None:
        models.check_supported(model)
        hooks = model._kvpolicy_hooks = CacheHooks(model)
    return hooks


def detach(model: nn.Module) -> None:
    """Remove the hooks ``attach`` left (a no-op if there are none)."""
    hooks = vars(model).pop("_kvpolicy_hooks", None)
    if hooks is not None:
        hooks.remove()
