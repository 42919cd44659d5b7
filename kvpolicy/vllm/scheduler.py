"""The scheduler side of the plugin (engine-core process): free the blocks a compacted
request no longer needs, as vLLM's sliding-window manager does (the freed positions hold
the null block in the request's block list; the worker never reads them again), and end
a resumed request's recomputed prefill at its prompt's end, so that its generated tokens
are recomputed over the compacted cache, as they were first computed."""
from __future__ import annotations

import functools
import logging

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from .config import KEY
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


def stop_at_prompt_end(num_prompt: int, num_computed: int, num_new: int) -> int:
    """The tokens to schedule so that a chunk never runs past the prompt's end: a request
    resumed after preemption recomputes prompt and generated tokens, and the generated
    ones must see the compacted cache (planned at the prompt's end), not the whole prompt."""
    if num_computed < num_prompt < num_computed + num_new:
        return num_prompt - num_computed
    return num_new


def install() -> None:
    """Patch the scheduler class once per process; inert for engines without the key."""
    from vllm.v1.core.sched.scheduler import Scheduler

    if getattr(Scheduler, "_kvpolicy_patched", False):
        return
    update = Scheduler.update_from_output

    @functools.wraps(update)
    def update_from_output(self, scheduler_output, model_runner_output):
        for req_id, base in (getattr(model_runner_output, REPORT_ATTR, None) or {}).items():
            freed = free_prefix(self, req_id, base)
            log.debug("kvpolicy: request %s compacted at slot %d, %d blocks freed", req_id, base, freed)
        return update(self, scheduler_output, model_runner_output)

    Scheduler.update_from_output = update_from_output
    reserve = Scheduler._reserve_prefill_lookahead

    @functools.wraps(reserve)
    def _reserve_prefill_lookahead(self, request, num_computed_tokens, num_new_tokens):
        num_new_tokens = reserve(self, request, num_computed_tokens, num_new_tokens)
        if KEY in (self.vllm_config.additional_config or {}):
            num_new_tokens = stop_at_prompt_end(request.num_prompt_tokens, num_computed_tokens,
                                                num_new_tokens)
        return num_new_tokens

    Scheduler._reserve_prefill_lookahead = _reserve_prefill_lookahead
    Scheduler._kvpolicy_patched = True
