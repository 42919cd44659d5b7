"""PyTorch reference for score accumulation (the CPU path and the kernels' test oracle)."""
from __future__ import annotations

import torch
from torch import Tensor


def accumulate_scores_ref(
    query: Tensor,
    key: Tensor,
    scaling: float,
    key_mask: Tensor | None = None,
    query_mask: Tensor | None = None,
    tau: float = 0.0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    lse: Tensor | None = None,
    chunk: int = 128,
) -> tuple[Tensor, Tensor]:
    """Attention mass each key receives, summed over counted queries and group heads.

    query: [B, H, Q, D], the last Q positions of the sequence (row i sits at N - Q + i).
    key: [B, G, N, D], H a multiple of G. key_mask: bool [B, N], False = padding.
    query_mask: bool [B, Q], False = row not counted. Any float dtype.
    The model's softmax: logits = scaling * q.k, then softcap * tanh(logits / softcap) if
    softcap > 0; sinks (float [H]) adds exp(sinks[h]) to each row's denominator (the sink
    itself gets no score). lse: fp32 [B, H, Q], each counted row's natural log-sum-exp under
    that softmax (sink included), reused instead of recomputed; other rows' values are unused.
    Returns (scores float32 [B, G, N], below float32 [B, G]) where ``below`` counts the
    causal, unmasked probabilities smaller than ``tau`` x their row maximum (0 if tau == 0).
    Rows are processed ``chunk`` at a time against only the keys they can see (in place), so
    memory is O(B * H * chunk * N), never N x N.
    """
    B, H, Q, D = query.shape
    G, N = key.shape[1], key.shape[2]
    g = H // G
    q = query.float().reshape(B, G, g, Q, D)
    k = key.float()
    sink = None if sinks is None else sinks.float().reshape(1, G, g, 1, 1)
    given = None if lse is None else lse.float().reshape(B, G, g, Q, 1)
    scores = torch.zeros(B, G, N, dtype=torch.float32, device=key.device)
    below = torch.zeros(B, G, dtype=torch.float32, device=key.device)
    key_pos = torch.arange(N, device=key.device)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        end = N - Q + stop  # keys at or before the chunk's last query
        logits = torch.einsum("bgiqd,bgnd->bgiqn", q[:, :, :, start:stop], k[:, :, :end])
        q_pos = torch.arange(N - Q + start, end, device=key.device)
        allowed = (key_pos[None, :end] <= q_pos[:, None])[None, None, None]
        if key_mask is not None:
            allowed = allowed & key_mask[:, None, None, None, :end]
        if query_mask is not None:
            allowed = allowed & query_mask[:, None, None, start:stop, None]
        logits.mul_(scaling)
        if softcap > 0:
            logits.div_(softcap).tanh_().mul_(softcap)
        logits.masked_fill_(~allowed, float("-inf"))
        if given is not None:
            row_lse = given[:, :, :, start:stop]
        else:
            row_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            if sink is not None:
                row_lse = torch.logaddexp(row_lse, sink)
        probs = logits.sub_(row_lse).exp_().nan_to_num_(nan=0.0)
        scores[:, :, :end] += probs.sum(dim=(2, 3))
        if tau > 0:
            row_max = probs.amax(dim=-1, keepdim=True)
            below += ((probs < tau * row_max) & allowed).sum(dim=(2, 3, 4)).float()
    return scores, below
