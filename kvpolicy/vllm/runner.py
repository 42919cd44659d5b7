"""The model-runner side of the plugin (worker process): the attention metadata carries no
request ids, so the runner publishes each step's rows (request id, prompt length, planned
new tokens) before it builds the metadata, and attaches the compaction bases computed in
the step to its ModelRunnerOutput (``kvpolicy_bases``: {request id: base in tokens}), which
reaches the scheduler even across processes (the output is pickled as a whole)."""
from __future__ import annotations

import functools

from .config import KEY
from .worker import Worker

REPORT_ATTR = "kvpolicy_bases"
_worker: Worker | None = None


def worker() -> Worker:
    """The worker process's kvpolicy state (installed by the backend's metadata builder)."""
    return _worker


def install(w: Worker) -> None:
    """Make ``w`` the worker state and patch the runner class once per process."""
    global _worker
    _worker = w
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvpolicy_patched", False):
        return
    GPUModelRunner._build_attention_metadata = _publishing(GPUModelRunner._build_attention_metadata)
    GPUModelRunner.sample_tokens = _reporting(GPUModelRunner.sample_tokens)
    GPUModelRunner._kvpolicy_patched = True


def _publishing(build):
    @functools.wraps(build)
    def wrapper(self, num_tokens, num_reqs, *args, **kwargs):
        if (_worker is not None and KEY in (self.vllm_config.additional_config or {})
                and not kwargs.get("for_cudagraph_capture")):
            batch = self.input_batch
            ids = batch.req_ids[:num_reqs]
            if len(ids) == num_reqs and all(r in self.requests for r in ids):
                rows = [(r, int(batch.num_prompt_tokens[i]),
                         self.requests[r].sampling_params.max_tokens or 0)
                        for i, r in enumerate(ids)]
                _worker.publish_batch(rows, set(self.requests))
        return build(self, num_tokens, num_reqs, *args, **kwargs)

    return wrapper


def _reporting(sample_tokens):
    @functools.wraps(sample_tokens)
    def wrapper(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        if _worker is not None and _worker.unreported and output is not None:
            setattr(output, REPORT_ATTR, _worker.take_reports())
        return output

    return wrapper
