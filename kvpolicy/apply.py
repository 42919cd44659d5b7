"""``kvpolicy.apply``: patch a transformers model so that ``generate`` runs with a
compressed PolicyCache; the returned handle (also a context manager) undoes it exactly.
``kvpolicy.compress``: prefill and compress a context once, without generating."""
from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationConfig
from transformers.generation.configuration_utils import CompileConfig

from . import interface, models
from .budget import Budget
from .cache import PolicyCache
from .chunks import chunk_spans
from .heads import with_per_head
from .hooks import CacheHooks, attach, new_tokens, prompt_of
from .policy import Policy
from .memory import Memory, storage
from .quantized import check_bits
from .registry import get_policy
from .rotary import CacheRotary
from .selection import POST_VISION_FALLBACK

COMPILE_BUCKET = 64  # compiled decode: append buffers rounded up to this many slots
# generate options a PolicyCache cannot serve: the option, the value that is fine, why
UNSUPPORTED = {
    "use_cache": (True, "the policy compresses the cache; use_cache=False has none"),
    "cache_implementation": (None, "kvpolicy brings its own cache"),
    "num_beams": (1, "beam search reorders the cache"),
    "num_return_sequences": (1, "it repeats the cache along the batch"),
    "assistant_model": (None, "assisted decoding crops the cache"),
    "prompt_lookup_num_tokens": (None, "assisted decoding crops the cache"),
}


class PolicyHandle:
    """The patch of one model: ``remove()`` (or leaving the ``with`` block) restores it.

    policy, budget, bits: what generate uses; ``new_cache(max_new_tokens)`` builds the
    cache generate would inject (for manual forward loops).
    """

    def __init__(self, model: nn.Module, policy: Policy, budget: Budget, compile: bool,
                 recompress: bool, rotary: CacheRotary | None = None,
                 query_rotary: CacheRotary | None = None, bits: int = 16):
        self.model, self.policy, self.budget, self.compile = model, policy, budget, compile
        self.bits = bits
        self.rotary, self.query_rotary = rotary, query_rotary
        self.recompress = recompress
        self.windows = models.layer_windows(model)
        self._attn = models.attn_implementation(model)
        self._compiled_call = {k: vars(model)[k] for k in ("_compiled_call", "_last_compile_config")
                               if k in vars(model)}
        self._compile_config = compile_config(model.device) if compile else None
        self._own_hooks = False
        self._removed = False

    def install(self) -> None:
        interface.register()
        models.set_attn_implementation(self.model, interface.NAME)
        if models.attn_implementation(self.model) != interface.NAME:
            models.set_attn_implementation(self.model, self._attn)
            raise RuntimeError(f"{type(self.model).__name__}: its attention implementation could "
                               f"not be switched to {interface.NAME!r}")
        self._own_hooks = getattr(self.model, "_kvpolicy_hooks", None) is None
        try:
            attach(self.model)  # its generate wrapper asks this handle to prepare each call
        except BaseException:
            models.set_attn_implementation(self.model, self._attn)
            raise
        if self.policy.requirements().defer:
            self.model.get_compiled_call = self._wrap_compiled_call(self.model.get_compiled_call)
        self.model._kvpolicy_handle = self

    def new_cache(self, max_new_tokens: int) -> PolicyCache:
        bucket = COMPILE_BUCKET if self.compile else 1
        cache = PolicyCache(self.windows, self.policy, self.budget, max_new_tokens, bucket,
                            self.recompress, self.rotary, query_rotary=self.query_rotary,
                            bits=self.bits)
        cache.begin_call(None, max_new_tokens, defer=True, compileable=True)
        return cache

    def remove(self) -> None:
        """Restore the model exactly: attention implementation, generate, hooks."""
        if self._removed:
            return
        model = self.model
        if self._own_hooks:
            vars(model).pop("_kvpolicy_hooks").remove()
        models.set_attn_implementation(model, self._attn)
        vars(model).pop("get_compiled_call", None)
        for key in ("_compiled_call", "_last_compile_config"):
            vars(model).pop(key, None)
        vars(model).update(self._compiled_call)
        del model._kvpolicy_handle
        self._removed = True

    def __enter__(self) -> PolicyHandle:
        if self._removed:
            raise RuntimeError("this kvpolicy handle was removed; call kvpolicy.apply again")
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else "applied"
        bits = f", bits={self.bits}" if self.bits != 16 else ""
        heads = ", per_head=True" if self.policy.per_head else ""
        return f"PolicyHandle({self.policy!r}, budget={self.budget}{bits}{heads}, {state})"

    # ---- the patch ---------------------------------------------------------------------
    def prepare_generate(self, args: tuple, kwargs: dict) -> None:
        """Before a generate call (the hooks' generate wrapper calls it): refuse options the
        cache cannot serve, check the budget, and put a fresh PolicyCache (unless one is
        given) and the compile configuration into ``kwargs``."""
        config: GenerationConfig = kwargs.get("generation_config") or self.model.generation_config
        self._refuse_options(config, kwargs)
        ids = prompt_of(args, kwargs)
        cache = models.given_cache(kwargs)
        if cache is not None and not isinstance(cache, PolicyCache):
            raise TypeError(f"kvpolicy is applied to this model: pass no cache (or a "
                            f"PolicyCache), not {type(cache).__name__}; remove the handle to use it")
        seen = None if cache is None else cache.tokens
        check_prompt_budget(self.model, self.policy, self.budget, ids,
                            kwargs.get("attention_mask"), 0 if seen is None else seen.shape[1])
        if cache is None:
            models.pass_cache(kwargs, self.new_cache(new_tokens(config, kwargs, ids)))
        if self._compile_config is not None:
            kwargs.setdefault("compile_config", self._compile_config)

    def _wrap_compiled_call(self, get_compiled_call):
        """generate's compiled decode step, except while a deferred compaction waits: those
        decode steps run eagerly (their hooks count them), so the graph sees one shape."""

        def wrapper(compile_config):
            compiled = get_compiled_call(compile_config)

            def call(*args, **kwargs):
                cache = models.given_cache(kwargs)
                if isinstance(cache, PolicyCache) and cache.pending is not None:
                    return self.model(*args, **kwargs)
                return compiled(*args, **kwargs)

            return call

        return wrapper

    def _refuse_options(self, config: GenerationConfig, kwargs: dict) -> None:
        for name, (fine, why) in UNSUPPORTED.items():
            value = kwargs.get(name, getattr(config, name, fine))
            if value is not None and value != fine:
                raise ValueError(f"kvpolicy cannot serve generate({name}={value!r}): {why}; "
                                 f"remove that option or the kvpolicy handle")
        if self.compile and kwargs.get("prefill_chunk_size", config.prefill_chunk_size):
            raise ValueError("kvpolicy: prefill_chunk_size with apply(compile=True) would compile the "
                             "prefill steps; use one of the two")


def check_prompt_budget(model: nn.Module, policy: Policy, budget: Budget, ids: torch.Tensor | None,
                        attention_mask: torch.Tensor | None, seen: int = 0) -> None:
    """Refuse, before any forward, an int budget that cannot hold the tokens ``policy``
    protects in every layer of this prompt (VL-Cache: the tokens after its last vision
    token). ids int [B, N]; seen: tokens a continued cache already holds (vision tokens
    among them no longer count). Prompts given as embeddings are not checked."""
    if budget.is_fraction or ids is None or ids.dim() != 2 or ids.is_floating_point():
        return
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    vision = models.vision_mask(model, ids)
    if vision is not None and seen:
        vision = torch.cat([torch.zeros_like(vision[:, :seen]), vision[:, seen:]], -1)
    budget.check_holds(policy.prompt_min_tokens(valid, vision), policy.name, policy.protects)


def validated(model: nn.Module, policy: str | Policy, budget: float | int | Memory, params: dict,
              bits: int | None = None, per_head: bool | None = None
              ) -> tuple[Policy, Budget, CacheRotary | None, int]:
    """The policy, the budget, the rotary and the bits of a call of ``apply`` or
    ``compress``, each refused by name (a model kvpolicy cannot hold exactly, an unknown
    policy or parameter, a budget that cannot hold the policy's protected tokens, ``bits``
    not 16/8/4/2, below 16 for an evicting policy or given with a Memory budget,
    ``per_head`` for a policy it has no meaning for) before the model is touched.
    per_head: None keeps the policy's own choice (``Policy.per_head``); True / False its
    per-head / per-layer copy (kvpolicy.heads)."""
    if per_head is not None and not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool or None, got {per_head!r}")
    pol = get_policy(policy, **params)
    per_head = pol.per_head if per_head is None else per_head  # kvzip plans per head by its own rule
    b, bits = storage(model, pol, budget, bits, per_head)
    b.check_holds(pol.min_tokens(), pol.name)
    bits = check_bits(bits, pol)
    if per_head or pol.per_head:
        pol = with_per_head(pol, per_head)
    models.check_supported(model)
    if pol.requirements().reconstruct:
        if models.vision_token_ids(model):
            raise ValueError(f"{pol.name}: its reconstruction passes repeat the prompt's ids, "
                             f"which cannot carry images; use it on text models")
        pol.reconstruction(torch.ones(1, 1, dtype=torch.long), 1)  # refuses what it lacks, by name
        if pol.requirements().contribution:
            models.output_projections(model)  # refuses a model without o_proj, by name
    return pol, b, cache_rotary(model, pol), bits


def query_rotary(model: nn.Module, policy: Policy) -> CacheRotary | None:
    """The rotary a policy asking for query statistics or future positions reads (refused
    by name where kvpolicy cannot un-rotate queries exactly); None for every other policy."""
    needs = policy.requirements()
    if not (needs.query_stats or needs.future_positions):
        return None
    return CacheRotary(model, f"{policy.name} reads the pre-RoPE queries and the rotary at future "
                              f"positions", "Use another query-agnostic policy (keydiff, kvzip).")


def cache_rotary(model: nn.Module, policy: Policy) -> CacheRotary | None:
    """The rotary a positions="cache" policy re-applies (refused by name where it cannot
    be exact); None for every other policy."""
    if policy.requirements().positions == "original":
        return None
    return CacheRotary(model)


def compile_config(device: torch.device) -> CompileConfig:
    """Decode-step compilation for generate: one full graph, CUDA graphs on GPU; on other
    devices too (transformers compiles only CUDA-like devices unless told to)."""
    config = CompileConfig(fullgraph=True, dynamic=False,
                           mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True
    return config


def apply(model: nn.Module, policy: str | Policy, budget: float | int | Memory = 0.1, *,
          compile: bool = False, recompress: bool = True, bits: int | None = None,
          per_head: bool | None = None, **params) -> PolicyHandle:
    """Patch ``model`` so that ``model.generate`` keeps ``budget`` of the prompt's KV cache
    under ``policy`` (a registered name with its ``params``, or a Policy instance).

    budget: float in (0, 1] (kept fraction), int (average tokens per layer), or
    ``kvpolicy.Memory(fraction)`` (at most that fraction of the full cache's bytes; kvpolicy
    chooses the bits and the kept tokens, kvpolicy.memory).
    compile: compile the decode step (fullgraph; CUDA graphs on GPU).
    recompress: a continued cache (a new chat turn) is compressed again to ``budget`` of
    everything seen (default); False appends the new turn as it is.
    bits: 16 (the default with a token budget) keeps the kept prompt rows in the model's
    dtype; 8, 4 or 2 stores them quantized (kvpolicy.quantized; policies that append while
    decoding); not with a Memory budget, which chooses them.
    per_head: True splits each layer's budget across its KV heads by their scores (AdaKV's
    rule; kvzip selects across every layer and head), each head storing only its own rows;
    False keeps one count per layer; None (default) is the policy's own choice: per head
    for kvzip and kvzip_floor (the paper's selection), per layer for the others.
    Everything is validated before the model is touched; errors leave it unpatched.
    """
    for name, flag in (("compile", compile), ("recompress", recompress)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    pol, b, rotary, bits = validated(model, policy, budget, params, bits, per_head)
    if not models.vision_token_ids(model):  # a text model's post-vision span: its last 8 tokens
        text = torch.ones(1, POST_VISION_FALLBACK, dtype=torch.bool)
        b.check_holds(pol.prompt_min_tokens(text, None), pol.name, pol.protects)
    needs = pol.requirements()
    if needs.defer and (needs.decode != "append" or needs.sparsity):
        raise ValueError(f"{pol.name}: defer needs an append-only policy without sparsity counts "
                         f"(decode steps add attention only); pass defer=0")
    if rotary is not None and compile:
        raise ValueError(f"{pol.name}(positions='cache') runs eager decode steps only; pass "
                         f"compile=False or positions='original'")
    if getattr(model, "_kvpolicy_handle", None) is not None:
        raise RuntimeError(f"kvpolicy is already applied to this model ({model._kvpolicy_handle!r}); "
                           f"remove that handle first")
    handle = PolicyHandle(model, pol, b, compile, recompress, rotary, query_rotary(model, pol), bits)
    handle.install()
    return handle


def compress(model: nn.Module, input_ids: torch.Tensor, policy: str | Policy,
             budget: float | int | Memory = 0.1, *, attention_mask: torch.Tensor | None = None,
             chunk_size: int | None = None, max_new_tokens: int = 0, recompress: bool = True,
             bits: int | None = None, per_head: bool | None = None, **params) -> PolicyCache:
    """Prefill ``input_ids`` [B, N] and compress its cache under ``policy`` at ``budget``,
    without generating: the query-agnostic case (a document whose questions come later).

    Continue with ``model.generate(torch.cat([input_ids, question_ids], -1),
    cache=cache.copy())`` (``past_key_values=`` before transformers 5.25) on this model,
    patched or not (``compress`` leaves hooks that act only on a PolicyCache;
    ``kvpolicy.detach(model)`` removes them).
    chunk_size: prefill this many tokens at a time, compressing after each chunk, so the
    K/V held stays near ``budget x tokens seen + chunk_size`` per layer; a last piece
    shorter than chunk_size / 8 is read with the chunk before it (``chunks.chunk_spans``).
    A reconstructing policy (kvzip) scores each chunk with one reconstruction pass once it
    is read (the pass sees the chunk and what earlier chunks kept), then compresses;
    without ``chunk_size`` it holds the whole context until its passes (the paper's rule).
    max_new_tokens: decode steps to size buffers (and fixed-size policies) for.
    budget, bits: as for ``apply`` (with ``chunk_size`` each chunk's
    compaction puts the rows back in full precision and quantizes them again).
    per_head: a count per KV head, as for ``apply``.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2
            or input_ids.is_floating_point() or input_ids.shape[1] == 0):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"compress needs input_ids as a non-empty int tensor [batch, length], "
                         f"got {shape}")
    pol, b, rotary, bits = validated(model, policy, budget, params, bits, per_head)
    needs = pol.requirements()
    if chunk_size is not None and needs.reconstruct and needs.queries != "none":
        raise ValueError(f"kvpolicy {pol.name}: counting the prompt's last tokens (question=...) "
                         f"needs the whole prompt in one piece; compress without chunk_size, or "
                         f"with question=0")
    check_prompt_budget(model, pol, b, input_ids, attention_mask)
    hooks: CacheHooks = attach(model)
    cache = PolicyCache(hooks.windows, pol, b, max_new_tokens, 1, recompress, rotary, chunk_size,
                        query_rotary(model, pol), bits)
    # an unpatched model's generate would pre-build 4-D masks for a compileable cache
    cache.begin_call(input_ids, max_new_tokens, defer=False,
                     compileable=getattr(model, "_kvpolicy_handle", None) is not None)
    with torch.no_grad():
        for start, stop in chunk_spans(input_ids.shape[1], chunk_size or input_ids.shape[1]):
            extra = {}
            if attention_mask is not None:  # as generate: positions count real tokens only
                extra = dict(attention_mask=attention_mask[:, :stop],
                             position_ids=(attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, start:stop])
            model(input_ids=input_ids[:, start:stop], use_cache=True, logits_to_keep=1,
                  **{models.CACHE_ARG: cache}, **extra)
    cache.end_call(input_ids)
    return cache
