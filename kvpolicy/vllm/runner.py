"""The model-runner side of the plugin (worker process). vLLM's attention metadata carries
no request ids, so the runner hands each step's rows (request id, prompt length, max new
tokens, the request's settings) to its kvpolicy metadata builders before it builds the
metadata, and attaches the plans made in the step to its ModelRunnerOutput
(``kvpolicy_plans``: {request id: (base in tokens, kept per layer)}), which reaches the
scheduler even across processes (the output is pickled as a whole)."""
from __future__ import annotations

import functools

from .config import enabled, request_settings

REPORT_ATTR = "kvpolicy_plans"


def _workers(runner) -> list:
    """The kvpolicy state of each of ``runner``'s metadata builders (empty without the key)."""
    return [w for groups in runner.attn_groups for g in groups
            if (w := getattr(g.get_metadata_builder(), "worker", None)) is not None]


def install() -> None:
    """Patch the runner class once per process; inert for engines without the key."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvpolicy_patched", False):
        return
    GPUModelRunner._build_attention_metadata = _publishing(GPUModelRunner._build_attention_metadata)
    GPUModelRunner.sample_tokens = _reporting(GPUModelRunner.sample_tokens)
    GPUModelRunner._kvpolicy_patched = True


def _publishing(build):
    @functools.wraps(build)
    def wrapper(self, num_tokens, num_reqs, *args, **kwargs):
        if enabled(self.vllm_config.additional_config) and not kwargs.get("for_cudagraph_capture"):
            batch = self.input_batch
            ids = batch.req_ids[:num_reqs]
            workers = _workers(self)
            if workers and len(ids) == num_reqs and all(r in self.requests for r in ids):
                rows = []
                for i, r in enumerate(ids):
                    params = self.requests[r].sampling_params
                    rows.append((r, int(batch.num_prompt_tokens[i]), params.max_tokens or 0,
                                 _settings(workers[0], r, params.extra_args)))
                for w in workers:
                    w.publish_batch(rows, set(self.requests))
        return build(self, num_tokens, num_reqs, *args, **kwargs)

    return wrapper


def _settings(worker, req_id: str, extra_args: dict | None):
    """The request's settings, resolved once (the front end validated them already)."""
    if req_id not in worker.settings_of:
        worker.settings_of[req_id] = request_settings(worker.engine_settings, extra_args)
    return worker.settings_of[req_id]


def _reporting(sample_tokens):
    @functools.wraps(sample_tokens)
    def wrapper(self, *args, **kwargs):
        output = sample_tokens(self, *args, **kwargs)
        if output is not None and enabled(self.vllm_config.additional_config):
            reports = {}
            for w in _workers(self):
                reports.update(w.take_reports())
            if reports:
                setattr(output, REPORT_ATTR, reports)
        return output

    return wrapper
