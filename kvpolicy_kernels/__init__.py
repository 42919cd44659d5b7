"""Hot-path ops of kvpolicy: each a PyTorch reference (CPU path) and a Triton kernel (CUDA
path) behind one torch custom op; ``KVPOLICY_BACKEND`` = auto | triton | torch (see backend).
``attention`` / ``attention_with_lse``: attention with the model's own softmax (softcap,
sinks), the latter also returning the log-sum-exp the score ops can reuse;
``attention_and_scores``: the output and every key's score from one pass (CPU path);
``head_attention``: decode attention over flat per-head slots (per-head budgets, #27);
``quantized_attention``: decode attention over quantized prompt rows, dequantized as it reads
them (#28). Beside them, ``quantized_cpu``: C kernels built on first use for eager CPU
decode over float32 quantized rows: ``quantized_attention``'s CPU path (twin: its reference)
and the rows dequantized in one pass (twin: kvpolicy.quantized's ATen path)."""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import quantized_cpu
from .attention_ref import attention, attention_and_scores, attention_with_lse
from .backend import use_triton
from .head_attention_ref import head_attention_ref
from .head_attention_triton import _head_attention_kernel
from .ops import (accumulate_scores_op, check_head_attention, check_quantized_attention, compact_layers_op,
                  head_attention_op, quantized_attention_op)
from .quantized_attention_ref import quantized_attention_ref
from .quantized_attention_triton import _quantized_attention_kernel

__all__ = ["accumulate_scores", "accumulate_scores_sparsity", "attention", "attention_and_scores",
           "attention_with_lse", "compact_layers", "head_attention", "quantized_attention"]


def accumulate_scores(
    query: Tensor, key: Tensor, *, scaling: float, key_mask: Tensor | None = None,
    query_mask: Tensor | None = None, softcap: float = 0.0, sinks: Tensor | None = None,
    lse: Tensor | None = None,
) -> Tensor:
    """float32 [B, G, N]: attention each key receives from the counted queries under the
    model's softmax (softcap > 0: tanh cap; sinks float [H]: per-head sink logits); lse fp32
    [B, H, Q] reuses the attention's log-sum-exp instead of recomputing it (see score_ref)."""
    return accumulate_scores_op(query, key, scaling, 0.0, key_mask, query_mask, softcap, sinks, lse)[0]


def accumulate_scores_sparsity(
    query: Tensor, key: Tensor, *, scaling: float, tau: float, key_mask: Tensor | None = None,
    query_mask: Tensor | None = None, softcap: float = 0.0, sinks: Tensor | None = None,
    lse: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(scores float32 [B, G, N], below float32 [B, G]): scores plus the count of
    probabilities below tau x row max (over the real keys), in the same pass."""
    return accumulate_scores_op(query, key, scaling, tau, key_mask, query_mask, softcap, sinks, lse)


def head_attention(query: Tensor, keys: Tensor, values: Tensor, heads: Tensor, visible: Tensor, *,
                   kv_heads: int, scaling: float, softcap: float = 0.0,
                   sinks: Tensor | None = None) -> Tensor:
    """out [B, 1, H, Dv] in the query's dtype: decode attention over flat per-head slots.

    query [B, H, 1, D]; keys [B, T, D], values [B, T, Dv] (one float dtype); heads int
    [B, T]: the KV head of each slot (< 0: none); visible bool [B, T]. Query head h reads the
    visible slots of KV head h // (H // kv_heads), under the model's softmax (softcap > 0: tanh
    cap; sinks float [H] join each head's denominator). See head_attention_ref and
    head_attention_triton. Where the reference runs (CPU) it is called directly: a decode
    step spares the custom op's dispatch (about 60 us a layer on CPU)."""
    if not use_triton(query.device, _head_attention_kernel):
        check_head_attention(query, keys, values, heads, visible, kv_heads, sinks)
        return head_attention_ref(query, keys, values, heads, visible, kv_heads=kv_heads,
                                  scaling=scaling, softcap=softcap, sinks=sinks)
    return head_attention_op(query, keys, values, heads, visible, kv_heads, scaling, softcap, sinks)


def quantized_attention(query: Tensor, rows: Sequence[Tensor], keys: Tensor, values: Tensor,
                        visible: Tensor, *, bits: int, scaling: float, softcap: float = 0.0,
                        sinks: Tensor | None = None) -> Tensor:
    """out [B, 1, H, Dv] in the query's dtype: decode attention over N quantized rows then n
    full-precision rows, each KV head with its query group.

    query [B, H, 1, D]; rows: (key_codes uint8 [B, G, M, D], key_scale, key_zero [B, G, N /
    Tk, D], value_codes uint8 [B, G, M, Dv], value_scale, value_zero [B, G, N, Dv / c]) in
    ``bits`` (8, 4, 2; M = N * bits / 8), as ``kvpolicy.quantized.QuantizedRows.tensors()``
    lists them; keys [B, G, n, D], values [B, G, n, Dv]; visible bool [B, G, N + n]
    (quantized rows first). The model's softmax (softcap > 0: tanh cap; sinks float [H]).
    See quantized_attention_ref and quantized_attention_triton; float32 CPU tensors (eager)
    take quantized_cpu's C kernels, anything else on CPU the reference, called directly,
    as head_attention's."""
    rows = tuple(rows)
    if not use_triton(query.device, _quantized_attention_kernel):
        check_quantized_attention(query, rows, keys, values, visible, bits, sinks)
        if quantized_cpu.serves(query, values):
            return quantized_cpu.quantized_attention(query, rows, keys, values, visible, bits=bits,
                                                     scaling=scaling, softcap=softcap, sinks=sinks)
        return quantized_attention_ref(query, *rows, keys, values, visible, bits=bits, scaling=scaling,
                                       softcap=softcap, sinks=sinks)
    return quantized_attention_op(query, *rows, keys, values, visible, bits, scaling, softcap, sinks)


def compact_layers(keys, values, keep, dst_keys, dst_values) -> None:
    """Gather kept rows of all layers into their buffers in one call, in place.

    Per layer l: keys[l], values[l] [B, G, N_l, D]; keep[l] int64 [B, G, n_l];
    dst_keys[l], dst_values[l] contiguous [B, G, C_l, D], C_l >= n_l. Writes
    dst[:, :, :n_l]; dst[:, :, n_l:] is left untouched (see compact_ref, compact_triton).
    """
    compact_layers_op(list(keys), list(values), list(keep), list(dst_keys), list(dst_values))
