"""The torch custom ops (namespace ``kvpolicy``): reference or Triton, chosen per call.

``kvpolicy::accumulate_scores``, ``kvpolicy::head_attention`` and
``kvpolicy::quantized_attention`` are ``triton_op``s:
torch.compile traces each body, which branches on the device (CUDA -> ``wrap_triton`` kernels, else the reference), so compiled
CPU graphs take the reference and compiled CUDA graphs see the kernels; the body doubles as
the fake implementation. ``kvpolicy::compact_layers`` is an opaque ``custom_op`` with a
registered fake: its kernel reads raw addresses from a table built with ``data_ptr()``,
which FakeTensors do not have, so the body must only ever run on real tensors.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import use_triton
from .compact_ref import compact_layers_ref
from .compact_triton import _compact_kernel, compact_layers_triton
from .head_attention_ref import head_attention_ref
from .head_attention_triton import _head_attention_kernel, head_attention_triton
from .quantized_attention_ref import TOKEN_GROUP, quantized_attention_ref
from .quantized_attention_triton import _quantized_attention_kernel, quantized_attention_triton
from .score_ref import accumulate_scores_ref
from .score_triton import _column_sums_kernel, accumulate_scores_triton


@torch.library.triton_op("kvpolicy::accumulate_scores", mutates_args=())
def accumulate_scores_op(
    query: Tensor, key: Tensor, scaling: float, tau: float,
    key_mask: Tensor | None, query_mask: Tensor | None,
    softcap: float = 0.0, sinks: Tensor | None = None, lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(scores fp32 [B, G, N], below fp32 [B, G]); tau == 0 skips the count; softcap 0 = off."""
    if sinks is not None and tuple(sinks.shape) != (query.shape[1],):
        raise ValueError(f"sinks must be [H] = [{query.shape[1]}], got {tuple(sinks.shape)}")
    if lse is not None and lse.shape != query.shape[:3]:
        raise ValueError(f"lse must be [B, H, Q] = {list(query.shape[:3])}, got {list(lse.shape)}")
    if use_triton(query.device, _column_sums_kernel):
        return accumulate_scores_triton(query, key, scaling, tau, key_mask, query_mask,
                                        softcap, sinks, lse)
    return accumulate_scores_ref(query, key, scaling, key_mask, query_mask, tau, softcap, sinks, lse)


@torch.library.triton_op("kvpolicy::head_attention", mutates_args=())
def head_attention_op(
    query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, visible: Tensor,
    kv_heads: int, scaling: float, softcap: float = 0.0, sinks: Tensor | None = None,
) -> Tensor:
    """out [B, 1, H, Dv] in the query's dtype: decode attention over flat per-head slots
    (see head_attention_ref); softcap 0 = off; sinks float [H] or None."""
    check_head_attention(query, keys, values, heads, visible, kv_heads, sinks)
    if use_triton(query.device, _head_attention_kernel):
        return head_attention_triton(query, keys, values, heads, visible, kv_heads, scaling, softcap, sinks)
    return head_attention_ref(query, keys, values, heads, visible, kv_heads=kv_heads, scaling=scaling,
                              softcap=softcap, sinks=sinks)


def check_head_attention(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor,
                         visible: Tensor, kv_heads: int, sinks: Tensor | None) -> None:
    """A ValueError naming what disagrees among head_attention's inputs (shapes only)."""
    B, H, Q, D = query.shape
    if Q != 1 or H % kv_heads:
        raise ValueError(f"query must be [B, H, 1, D] with H a multiple of kv_heads = {kv_heads}, "
                         f"got {list(query.shape)}")
    slots = tuple(keys.shape[:2])
    if tuple(values.shape[:2]) != slots or tuple(heads.shape) != slots or tuple(visible.shape) != slots:
        raise ValueError(f"keys [B, T, D], values [B, T, Dv], heads and visible [B, T] disagree: "
                         f"{list(keys.shape)}, {list(values.shape)}, {list(heads.shape)}, {list(visible.shape)}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be [H] = [{H}], got {tuple(sinks.shape)}")


@torch.library.triton_op("kvpolicy::quantized_attention", mutates_args=())
def quantized_attention_op(
    query: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
    value_scale: Tensor, value_zero: Tensor, keys: Tensor, values: Tensor, visible: Tensor,
    bits: int, scaling: float, softcap: float = 0.0, sinks: Tensor | None = None,
) -> Tensor:
    """out [B, 1, H, Dv] in the query's dtype: decode attention over quantized rows, then
    full-precision ones (see quantized_attention_ref); softcap 0 = off; sinks float [H] or None."""
    rows = (key_codes, key_scale, key_zero, value_codes, value_scale, value_zero)
    check_quantized_attention(query, rows, keys, values, visible, bits, sinks)
    if use_triton(query.device, _quantized_attention_kernel):
        return quantized_attention_triton(query, *rows, keys, values, visible, bits, scaling, softcap, sinks)
    return quantized_attention_ref(query, *rows, keys, values, visible, bits=bits, scaling=scaling,
                                   softcap=softcap, sinks=sinks)


def check_quantized_attention(query: Tensor, rows, keys: Tensor, values: Tensor, visible: Tensor,
                              bits: int, sinks: Tensor | None) -> None:
    """A ValueError naming what disagrees among quantized_attention's inputs (shapes, bits and
    the codes' dtype); rows: (key_codes, key_scale, key_zero, value_codes, value_scale,
    value_zero)."""
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = rows
    B, H, Q, D = query.shape
    G, n, Dv = keys.shape[1], keys.shape[2], values.shape[-1]
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, got {bits!r}")
    if Q != 1 or H % G or tuple(keys.shape) != (B, G, n, D) or tuple(values.shape[:3]) != (B, G, n):
        raise ValueError(f"query [B, H, 1, D] (H a multiple of G), keys [B, G, n, D] and values "
                         f"[B, G, n, Dv] disagree: {list(query.shape)}, {list(keys.shape)}, "
                         f"{list(values.shape)}")
    M = key_codes.shape[2] if key_codes.dim() == 4 else 0
    N = M * 8 // bits
    if key_codes.dtype != torch.uint8 or value_codes.dtype != torch.uint8:
        raise ValueError(f"key_codes and value_codes must be uint8, got {key_codes.dtype}, {value_codes.dtype}")
    groups = key_scale.shape[2] if key_scale.dim() == 4 else 0
    if (tuple(key_codes.shape) != (B, G, M, D) or key_scale.shape != key_zero.shape
            or tuple(key_scale.shape) != (B, G, -(-N // TOKEN_GROUP), D) or not N):
        raise ValueError(f"key_codes [B, G, M, D] and key_scale, key_zero [B, G, ceil(N / {TOKEN_GROUP}), D] "
                         f"({bits} bits: N = {N}) disagree with keys {list(keys.shape)}: "
                         f"{list(key_codes.shape)}, {list(key_scale.shape)}, {list(key_zero.shape)}")
    channels = value_scale.shape[3] if value_scale.dim() == 4 else 0
    if (tuple(value_codes.shape) != (B, G, M, Dv) or value_scale.shape != value_zero.shape or not channels
            or Dv % channels or tuple(value_scale.shape) != (B, G, N, channels)):
        raise ValueError(f"value_codes [B, G, M, Dv] and value_scale, value_zero [B, G, N, Dv / c] "
                         f"({bits} bits: N = {N}) disagree with values {list(values.shape)}: "
                         f"{list(value_codes.shape)}, {list(value_scale.shape)}, {list(value_zero.shape)}")
    if tuple(visible.shape) != (B, G, N + n):
        raise ValueError(f"visible must be [B, G, N + n] = {[B, G, N + n]}, got {list(visible.shape)}")
    if sinks is not None and tuple(sinks.shape) != (H,):
        raise ValueError(f"sinks must be [H] = [{H}], got {tuple(sinks.shape)}")


@torch.library.custom_op("kvpolicy::compact_layers", mutates_args=("dst_keys", "dst_values"))
def compact_layers_op(
    keys: list[Tensor], values: list[Tensor], keep: list[Tensor],
    dst_keys: list[Tensor], dst_values: list[Tensor],
) -> None:
    """Writes dst_*[l][:, :, :n_l] = gather of keys/values[l] at keep[l]; see compact_triton."""
    if use_triton(keys[0].device, _compact_kernel):
        compact_layers_triton(keys, values, keep, dst_keys, dst_values)
    else:
        compact_layers_ref(keys, values, keep, dst_keys, dst_values)


@compact_layers_op.register_fake
def _(keys, values, keep, dst_keys, dst_values) -> None:
    return None
