"""The CPU attention backend with kvpolicy: vLLM's CPU_ATTN kernels, fed per-layer metadata
for compacted requests, with score observation and compaction. Registered in place of
CPU_ATTN (``kvpolicy.vllm.register``); for an engine without the ``kvpolicy`` key it is
CPU_ATTN unchanged. Each step's state reaches the layers in the attention metadata the
builder builds for that step (``KVPolicyCPUMetadata.forward_pass``), as vLLM's backends
carry theirs."""
from __future__ import annotations

import dataclasses

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, CPUAttentionMetadataBuilder)

from .config import enabled, settings
from .worker import ForwardPass, Worker


class KVPolicyCPUBackend(CPUAttentionBackend):
    """CPU_ATTN with kvpolicy's compaction (active when ``additional_config`` has it)."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"

    @staticmethod
    def get_impl_cls():
        return KVPolicyCPUImpl

    @staticmethod
    def get_builder_cls():
        return KVPolicyCPUBuilder


@dataclasses.dataclass
class KVPolicyCPUMetadata(CPUAttentionMetadata):
    """CPU_ATTN's metadata and the step's kvpolicy forward pass (None: nothing to do)."""

    forward_pass: ForwardPass | None = None


class KVPolicyCPUBuilder(CPUAttentionMetadataBuilder):
    """Builds CPU metadata as vLLM does, with the step's forward pass attached. ``worker``
    holds the requests' kvpolicy state of this runner (None without the kvpolicy key)."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.worker = None
        if enabled(vllm_config.additional_config):
            num_layers = max(extract_layer_index(n) for n in layer_names) + 1
            self.worker = Worker(settings(vllm_config.additional_config), num_layers,
                                 kv_cache_spec.block_size)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if self.worker is None:
            return metadata
        fields = {f.name: getattr(metadata, f.name) for f in dataclasses.fields(metadata)}
        out = KVPolicyCPUMetadata(**fields)
        out.forward_pass = self.worker.begin(metadata, self)
        return out

    def rebuild(self, metadata, seq_lens: torch.Tensor, block_table: torch.Tensor,
                slot_mapping: torch.Tensor):
        """``metadata`` with other seq_lens int32 [R], block_table int32 [R, W] and
        slot_mapping int64 [T], and the CPU kernel's scheduler metadata recomputed."""
        scheduler_metadata = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seq_lens), num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, seq_lens=seq_lens, dtype=self.dtype,
            query_start_loc=metadata.query_start_loc, causal=metadata.causal,
            sliding_window_size=self.window_size, isa=self.isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=metadata.dynamic_causal,
            kv_cache_dtype=self.kv_cache_dtype)
        return dataclasses.replace(metadata, seq_lens=seq_lens, block_table=block_table,
                                   slot_mapping=slot_mapping, max_seq_len=int(seq_lens.max()),
                                   scheduler_metadata=scheduler_metadata)


class KVPolicyCPUImpl(CPUAttentionBackendImpl):
    """CPU attention over each layer's view; uncompacted requests are observed and, once
    they reach their plan, compacted."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from vllm.config import get_current_vllm_config

        if enabled(get_current_vllm_config().additional_config) and (
                self.sliding_window != -1 or self.alibi_slopes is not None or self.sinks is not None):
            raise ValueError("kvpolicy on vLLM supports full causal attention layers only "
                             "(no sliding window, ALiBi or attention sinks)")

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,
                output_scale=None, output_block_scale=None):
        fp = getattr(attn_metadata, "forward_pass", None)
        if fp is None:
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                   output_scale, output_block_scale)
        l = extract_layer_index(layer.layer_name)
        view, _ = fp.view(l)
        super().forward(layer, query, key, value, kv_cache, view, output, output_scale,
                        output_block_scale)
        n = attn_metadata.num_actual_tokens
        fp.observe(self, layer, l, kv_cache, query[:n], key[:n], value[:n])
        return output

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        metadata = get_forward_context().attn_metadata
        metadata = metadata.get(layer.layer_name) if isinstance(metadata, dict) else None
        fp = getattr(metadata, "forward_pass", None)
        if fp is not None:
            _, slot_mapping = fp.view(extract_layer_index(layer.layer_name), slot_mapping)
        self.write(layer, key, value, kv_cache, slot_mapping)

    def write(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
        """Write key/value [T, G, D] at slot_mapping [T] with the CPU backend's own op."""
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
