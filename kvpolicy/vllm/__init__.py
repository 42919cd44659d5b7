"""kvpolicy inside vLLM (CPU backend): ``LLM(model, additional_config={"kvpolicy":
{"policy": "snapkv", "budget": 0.1, ...}})`` or ``vllm serve --additional-config``.

``register`` is the ``vllm.general_plugins`` entry point; vLLM runs it in every process.
It registers the plugin's attention backend as CPU_ATTN (CPU_ATTN unchanged for engines
without the ``kvpolicy`` key) and installs two patches that act only for engines with it:
the engine-config check (``EngineArgs.create_engine_config``) and the runner's row
publication (``kvpolicy.vllm.runner``). The scheduler is vLLM's ``scheduler_cls``.
"""
from __future__ import annotations

import functools

from .config import KEY, Settings, request_settings, settings

__all__ = ["KEY", "Settings", "register", "request_settings", "settings"]
BACKEND = "kvpolicy.vllm.backend.KVPolicyCPUBackend"


def register() -> None:
    """Install the plugin's hooks in this process (idempotent)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from . import runner

    if getattr(EngineArgs, "_kvpolicy_patched", False):
        return
    EngineArgs.create_engine_config = _checked(EngineArgs.create_engine_config)
    register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND)
    runner.install()
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
