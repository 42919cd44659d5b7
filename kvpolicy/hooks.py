"""The engine's side of a PolicyCache on a Hugging Face model: a wrapper of ``generate``
that begins and ends the cache's call, and forward hooks that begin and end each forward
(the cache plans and compacts). They act only when a PolicyCache is passed, so a model can
keep them (``attach``) and still run every other cache exactly as before: on a model whose
attention is not ``kvpolicy`` they switch it for that forward only, so its own mask builder
never sees a ragged cache."""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import interface, models
from .cache import PolicyCache
from .probe import check_attention_reached
from .reconstruction import reconstruct
from .rotary import cache_position_ids

DEFAULT_MAX_LENGTH = 20  # new tokens generate makes when neither length argument is set


class CacheHooks:
    """Pre/post forward hooks on ``model`` for PolicyCache forwards; ``remove()`` undoes."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.windows = models.layer_windows(model)
        self._switched: str | None = None
        interface.register()
        self._pre = model.register_forward_pre_hook(self.before, with_kwargs=True)
        self._post = model.register_forward_hook(self.after, with_kwargs=True)
        self._own_generate = vars(model).get("generate")
        model.generate = self._wrap_generate(model.generate)

    def remove(self) -> None:
        self._pre.remove()
        self._post.remove()
        if self._own_generate is None:
            vars(self.model).pop("generate", None)
        else:
            self.model.generate = self._own_generate

    def _wrap_generate(self, generate):
        """generate, beginning and ending the call of a PolicyCache it is given. On a model
        patched by ``apply`` the handle prepares each call first (a fresh cache unless one
        is given); on an unpatched model the cache keeps the decode steps it was sized for
        (``compress(max_new_tokens=...)``)."""

        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            handle = getattr(self.model, "_kvpolicy_handle", None)
            if handle is not None:
                handle.prepare_generate(args, kwargs)
            cache = models.given_cache(kwargs)
            if not isinstance(cache, PolicyCache):
                return generate(*args, **kwargs)
            models.pass_cache(kwargs, cache)  # under the installed transformers' keyword
            config = kwargs.get("generation_config") or self.model.generation_config
            ids = prompt_of(args, kwargs)
            patched = handle is not None
            cache.begin_call(ids, new_tokens(config, kwargs, ids) if patched else None,
                             defer=patched, compileable=patched)
            out = None
            try:
                out = generate(*args, **kwargs)
            finally:
                cache.end_call(None if out is None else (
                    out if isinstance(out, torch.Tensor) else getattr(out, "sequences", None)))
            return out

        return wrapper

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
            kwargs[interface.CACHE_KWARG] = cache
            return args, kwargs
        decode = q == 1 and cache.compacted
        new_valid = torch.ones(B, 1, dtype=torch.bool, device=ref.device) if decode else \
            self.new_valid(kwargs.get("attention_mask"), B, q, ref.device)
        positions = None
        if cache.rotary is not None:  # positions inside the cache, checked before the forward
            positions = kwargs["position_ids"] = place_positions(cache, new_valid, decode)
        vision = None if decode else self.vision(cache, input_ids)
        cache.begin_forward(type(self.model).__name__, self.windows, new_valid, vision, decode,
                            positions)
        if models.attn_implementation(self.model) != interface.NAME:
            self._switched = models.attn_implementation(self.model)
            models.set_attn_implementation(self.model, interface.NAME)
        kwargs[interface.CACHE_KWARG] = cache
        return args, kwargs

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output):
        cache = models.given_cache(kwargs)
        if not isinstance(cache, PolicyCache) or torch.compiler.is_compiling():
            return None
        cache.end_forward()
        self._restore()
        if cache.reconstruction_due:
            reconstruct(self.model, cache)
        return None

    def _restore(self) -> None:
        """Give back the attention implementation switched for this forward."""
        if self._switched is not None:
            models.set_attn_implementation(self.model, self._switched)
            self._switched = None

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
        if models.vision_token_ids(self.model) and cache.policy.requirements().vision:
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
    return given


def attach(model: nn.Module) -> CacheHooks:
    """Keep hooks on ``model`` so that forwards and generate calls given a PolicyCache (from
    ``kvpolicy.compress``) run it; other caches are untouched. Idempotent; ``detach``
    removes them."""
    hooks = getattr(model, "_kvpolicy_hooks", None)
    if hooks is None:
        models.check_supported(model)
        hooks = model._kvpolicy_hooks = CacheHooks(model)
        try:
            check_attention_reached(model, hooks.windows)
        except BaseException:
            detach(model)
            raise
    return hooks


def detach(model: nn.Module) -> None:
    """Remove the hooks ``attach`` left (a no-op if there are none)."""
    hooks = vars(model).pop("_kvpolicy_hooks", None)
    if hooks is not None:
        hooks.remove()


def prompt_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The prompt tensor generate was given (input_ids, inputs or inputs_embeds)."""
    for key in ("input_ids", "inputs", "inputs_embeds"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    return args[0] if args else None


def new_tokens(config, kwargs: dict, prompt: torch.Tensor | None) -> int:
    """The decode steps a generate call plans: its max_new_tokens, or max_length minus the
    prompt, or generate's default of 20 new tokens."""
    new = kwargs.get("max_new_tokens", config.max_new_tokens)
    if new is not None:
        return int(new)
    max_length = kwargs.get("max_length", config.max_length)
    if max_length is None:  # transformers 5 then generates its default count of new tokens
        return DEFAULT_MAX_LENGTH
    return max(0, int(max_length) - (prompt.shape[1] if prompt is not None else 0))
