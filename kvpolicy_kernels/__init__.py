"""Hot-path ops of kvpolicy: each a PyTorch reference (CPU path) and a Triton kernel (CUDA path)."""
from __future__ import annotations

from torch import Tensor

from .compact_ref import compact_layers_ref
from .score_ref import accumulate_scores_ref
from .select import select_keep

__all__ = ["accumulate_scores", "accumulate_scores_sparsity", "compact_layers", "select_keep"]


def accumulate_scores(
    query: Tensor, key: Tensor, *, scaling: float, key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> Tensor:
    """float32 [B, G, N]: attention each key receives from the counted queries (see score_ref)."""
    return accumulate_scores_ref(query, key, scaling, key_mask, query_mask)[0]


def accumulate_scores_sparsity(
    query: Tensor, key: Tensor, *, scaling: float, tau: float, key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(scores float32 [B, G, N], below float32 [B, G]): scores plus the count of
    probabilities below tau x row max, in the same pass."""
    return accumulate_scores_ref(query, key, scaling, key_mask, query_mask, tau)


def compact_layers(keys, values, keep, dst_keys, dst_values) -> None:
    """Gather kept rows of all layers into their buffers in one call (see compact_ref)."""
    compact_layers_ref(keys, values, keep, dst_keys, dst_values)
