"""The scheduler side of the plugin (engine-core process): free the blocks a compacted
request no longer needs, as vLLM's sliding-window manager does (the freed positions hold
the null block in the request's block list; the worker never reads them again)."""
from __future__ import annotations

import functools
import logging

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

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


def install() -> None:
    """Patch the scheduler class once per process; inert without reports from a worker."""
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
    Scheduler._kvpolicy_patched = True
