"""The scheduler side of the plugin (engine-core process), vLLM's ``scheduler_cls``: free
the blocks a planned request no longer needs, as vLLM's sliding-window manager does (the
freed positions hold the null block in the request's block list; the worker never reads
them again), and end a resumed request's recomputed chunk at its plan point, so that the
tokens after it are recomputed over the compacted cache, as they were first computed."""
from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from .config import request_settings, settings
from .runner import REPORT_ATTR

log = logging.getLogger("vllm.kvpolicy")


def free_prefix(scheduler, req_id: str, base: int) -> int:
    """Free the blocks holding request ``req_id``'s slots [0, base); returns how many."""
    freed = 0
    for manager in scheduler.kv_cache_manager.coordinator.single_type_managers:
        if not isinstance(manager, FullAttentionManager):
            continue
        blocks = manager.req_to_blocks.get(req_id, [])
        count = min(base // manager.block_size, len(blocks))
        before = sum(b is manager._null_block for b in blocks[:count])
        manager._remove_blocks_in_range(req_id, 0, count)
        freed += count - before
    return freed


def stop_at_plan(plan_at: int, num_computed: int, num_new: int) -> int:
    """The tokens to schedule so that a chunk never runs past the plan point (the prompt's
    end plus the deferred decode steps): a request resumed after preemption recomputes its
    prompt and generated tokens, and those after the plan point must see the compacted
    cache, as when they were first computed."""
    if num_computed < plan_at < num_computed + num_new:
        return plan_at - num_computed
    return num_new


class KVPolicyScheduler(Scheduler):
    """vLLM's scheduler, freeing planned requests' unused blocks. Each request's plan
    (base, kept per layer) is kept as ``request.kvpolicy_plan`` for logs and tests."""

    def __init__(self, vllm_config, *args, **kwargs):
        super().__init__(vllm_config, *args, **kwargs)
        self.kvpolicy_settings = settings(vllm_config.additional_config)

    def plan_at(self, request) -> int | None:
        """The position count at which the request is planned (None: not compressed)."""
        if not hasattr(request, "kvpolicy_plan_at"):
            config = request_settings(self.kvpolicy_settings, request.sampling_params.extra_args
                                      if request.sampling_params else None)
            request.kvpolicy_plan_at = (None if config is None else
                                        request.num_prompt_tokens + config.policy.requirements().defer)
        return request.kvpolicy_plan_at

    def update_from_output(self, scheduler_output, model_runner_output):
        for req_id, (base, kept) in (getattr(model_runner_output, REPORT_ATTR, None) or {}).items():
            freed = free_prefix(self, req_id, base)
            if req_id in self.requests:
                self.requests[req_id].kvpolicy_plan = (base, kept)
            log.debug("kvpolicy: request %s planned at slot %d, %d blocks freed", req_id, base, freed)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = super()._reserve_prefill_lookahead(request, num_computed_tokens, num_new_tokens)
        plan_at = self.plan_at(request)
        return num_new_tokens if plan_at is None else stop_at_plan(plan_at, num_computed_tokens,
                                                                   num_new_tokens)
