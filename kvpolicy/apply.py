"""``kvpolicy.apply``: patch a transformers model so that ``generate`` runs with a
compressed PolicyCache; the returned handle (also a context manager) undoes it exactly."""
from __future__ import annotations

import functools

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from . import attention, models
from .budget import Budget
from .cache import PolicyCache
from .policy import Policy
from .registry import get_policy

COMPILE_BUCKET = 64  # compiled decode: append buffers rounded up to this many slots


class PolicyHandle:
    """The patch of one model: ``remove()`` (or leaving the ``with`` block) restores it.

    policy, budget: what generate uses; ``new_cache(max_new_tokens)`` builds the cache
    generate would inject (for manual forward loops).
    """

    def __init__(self, model: nn.Module, policy: Policy, budget: Budget, compile: bool):
        self.model, self.policy, self.budget, self.compile = model, policy, budget, compile
        self.num_layers = len(models.decoder_layers(model))
        self._attn = models.attn_implementation(model)
        self._own_generate = "generate" in vars(model)
        self._compiled_call = {k: vars(model)[k] for k in ("_compiled_call", "_last_compile_config")
                               if k in vars(model)}
        self._compile_config = compile_config(model.device) if compile else None
        self._hook = None
        self._removed = False

    def install(self) -> None:
        attention.register()
        models.set_attn_implementation(self.model, attention.NAME)
        if models.attn_implementation(self.model) != attention.NAME:
            models.set_attn_implementation(self.model, self._attn)
            raise RuntimeError(f"{type(self.model).__name__}: its attention implementation could "
                               f"not be switched to {attention.NAME!r}")
        self._hook = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self.model.generate = self._wrap_generate(self.model.generate)
        self.model._kvpolicy_handle = self

    def new_cache(self, max_new_tokens: int) -> PolicyCache:
        bucket = COMPILE_BUCKET if self.compile else 1
        return PolicyCache(self.num_layers, self.policy, self.budget, max_new_tokens, bucket)

    def remove(self) -> None:
        """Restore the model exactly: attention implementation, generate, hooks."""
        if self._removed:
            return
        model = self.model
        self._hook.remove()
        if self._own_generate:
            model.generate = self._original_generate
        else:
            del model.generate
        models.set_attn_implementation(model, self._attn)
        for key in ("_compiled_call", "_last_compile_config"):
            vars(model).pop(key, None)
        vars(model).update(self._compiled_call)
        del model._kvpolicy_handle
        self._removed = True

    def __enter__(self) -> PolicyHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        return f"PolicyHandle({self.policy!r}, budget={self.budget}, {state})"

    # ---- the patch ---------------------------------------------------------------------
    def _wrap_generate(self, generate):
        self._original_generate = generate

        @functools.wraps(generate)
        def wrapper(*args, **kwargs):
            cache = kwargs.get("past_key_values")
            if cache is None:
                kwargs["past_key_values"] = self.new_cache(self._max_new_tokens(args, kwargs))
            elif not isinstance(cache, PolicyCache):
                raise TypeError(f"kvpolicy is applied to this model: pass no past_key_values (or a "
                                f"PolicyCache), not {type(cache).__name__}; remove the handle to use it")
            if self._compile_config is not None:
                kwargs.setdefault("compile_config", self._compile_config)
            return generate(*args, **kwargs)

        return wrapper

    def _max_new_tokens(self, args: tuple, kwargs: dict) -> int:
        config: GenerationConfig = kwargs.get("generation_config") or self.model.generation_config
        new = kwargs.get("max_new_tokens", config.max_new_tokens)
        if new is not None:
            return int(new)
        prompt = kwargs.get("input_ids", args[0] if args else kwargs.get("inputs_embeds"))
        max_length = kwargs.get("max_length", config.max_length)
        return max(0, int(max_length) - prompt.shape[1])

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get("past_key_values")
        if not isinstance(cache, PolicyCache):
            return None
        if not cache.compacted:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            ref = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            B, N = ref.shape[:2]
            mask = kwargs.get("attention_mask")
            if isinstance(mask, dict):  # Qwen2-VL: masks per layer type
                mask = mask.get("full_attention")
            if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 2):
                raise ValueError("kvpolicy needs a 2-D padding attention_mask [batch, length] at prefill")
            valid = mask.bool() if mask is not None else torch.ones(B, N, dtype=torch.bool, device=ref.device)
            cache.begin_prefill(valid, self._vision(input_ids))
        kwargs[attention.CACHE_KWARG] = cache
        return args, kwargs

    def _vision(self, input_ids: torch.Tensor | None) -> torch.Tensor | None:
        if input_ids is not None:
            return models.vision_mask(self.model, input_ids)
        if models.vision_token_ids(self.model) and self.policy.queries == "post_vision":
            raise ValueError(f"{self.policy.name} needs input_ids to find the vision tokens; "
                             f"inputs_embeds alone carry no token ids")
        return None


def compile_config(device: torch.device) -> CompileConfig:
    """Decode-step compilation for generate: one full graph, CUDA graphs on GPU; on other
    devices too (transformers compiles only CUDA-like devices unless told to)."""
    config = CompileConfig(fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True
    return config


def apply(model: nn.Module, policy: str | Policy, budget: float | int = 0.1, *,
          compile: bool = False, **params) -> PolicyHandle:
    """Patch ``model`` so that ``model.generate`` keeps ``budget`` of the prompt's KV cache
    under ``policy`` (a registered name with its ``params``, or a Policy instance).

    budget: float in (0, 1] (kept fraction) or int (average tokens per layer).
    compile: compile the decode step (fullgraph; CUDA graphs on GPU).
    Everything is validated before the model is touched; errors leave it unpatched.
    """
    pol = get_policy(policy, **params)
    b = Budget(budget)
    if not b.is_fraction and b.value < pol.min_tokens():
        raise ValueError(f"budget {b} cannot hold the {pol.min_tokens()} protected tokens per layer "
                         f"of {pol.name}: pass budget >= {pol.min_tokens()} (or a float fraction)")
    if not isinstance(compile, bool):
        raise TypeError(f"compile must be a bool, got {compile!r}")
    models.decoder_layers(model)
    if getattr(model, "_kvpolicy_handle", None) is not None:
        raise RuntimeError(f"kvpolicy is already applied to this model ({model._kvpolicy_handle!r}); "
                           f"remove that handle first")
    if not models.can_switch_attention(model):
        raise RuntimeError(f"{type(model).__name__} cannot switch its attention implementation "
                           f"(it does not dispatch through transformers' AttentionInterface)")
    handle = PolicyHandle(model, pol, b, compile)
    handle.install()
    return handle
