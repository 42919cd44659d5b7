"""Per-request settings checked at admission: vLLM calls a logits processor's
``validate_params`` for each request before it reaches the engine, and the OpenAI server
answers its ValueError with HTTP 400. The processors change no logits."""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor

from .config import request_settings


class _NoLogitsChange(LogitsProcessor):
    def __init__(self, vllm_config, device, is_pin_memory):
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update) -> None:
        pass


class KVPolicyRequests(_NoLogitsChange):
    """Installed in engines with the ``kvpolicy`` key: a request's ``kvpolicy_*`` keys must
    make valid settings."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        try:
            request_settings(None, sampling_params.extra_args)
        except TypeError as exc:  # an unknown parameter: a bad value like any other
            raise ValueError(str(exc)) from exc
