"""kvpolicy inside vLLM (CPU backend): ``LLM(model, additional_config={"kvpolicy":
{"policy": "snapkv", "budget": 0.1, ...}})`` or ``vllm serve --additional-config``.

``register`` is the ``vllm.general_plugins`` entry point; vLLM runs it in every process.
Each patch it installs acts only for engines whose ``additional_config`` has the
``kvpolicy`` key; without it vLLM runs unchanged.
"""
from __future__ import annotations

import functools

from .config import KEY, Settings, settings

__all__ = ["KEY", "Settings", "register", "settings"]
BACKEND = "kvpolicy.vllm.backend.KVPolicyCPUBackend"


def register() -> None:
    """Install the plugin's hooks in this process (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform

    from . import scheduler

    if getattr(EngineArgs, "_kvpolicy_patched", False):
        return
    EngineArgs.create_engine_config = _checked(EngineArgs.create_engine_config)
    CpuPlatform.get_attn_backend_cls = classmethod(_selecting(CpuPlatform.get_attn_backend_cls.__func__))
    _clear_backend_cache_on_load()
    scheduler.install()
    EngineArgs._kvpolicy_patched = True


def _checked(create):
    @functools.wraps(create)
    def create_engine_config(self, *args, **kwargs):
        from .config import check_engine_config, log, prepare_engine_args

        notes = prepare_engine_args(self)
        vllm_config = create(self, *args, **kwargs)  # also configures vLLM's logging
        check_engine_config(vllm_config)
        for note in notes:
            log.info(note)
        return vllm_config

    return create_engine_config


def _selecting(select):
    @functools.wraps(select)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        from vllm.config import get_current_vllm_config_or_none

        path = select(cls, selected_backend, attn_selector_config, num_heads)
        config = get_current_vllm_config_or_none()
        if config is not None and KEY in (config.additional_config or {}) and path.endswith("CPUAttentionBackend"):
            return BACKEND
        return path

    return get_attn_backend_cls


def _clear_backend_cache_on_load() -> None:
    """vLLM memoises the backend choice per process; an engine built in the same process
    as an earlier one (no engine multiprocessing) must choose again for its own config."""
    from vllm.v1.attention import selector
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner

    load = CPUModelRunner.load_model

    @functools.wraps(load)
    def load_model(self, *args, **kwargs):
        selector._cached_get_attn_backend.cache_clear()
        return load(self, *args, **kwargs)

    CPUModelRunner.load_model = load_model
