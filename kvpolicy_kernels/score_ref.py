"""PyTorch reference for score accumulation (the CPU path and the kernels' test oracle)."""
from __future__ import annotations

import torch
from torch import Tensor

from .visibility import causal


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
    key: [B, G, N, D], H a multiple of G. key_mask: bool [B, N], False = padding, or
    [B, G, N] when the KV heads hold different keys (per-head plans: False where a head
    holds none).
    query_mask: bool [B, Q], False = row not counted. Any float dtype.
    The model's softmax: logits = scaling * q.k, then softcap * tanh(logits / softcap) if
    softcap > 0; sinks (float [H]) adds exp(sinks[h]) to each row's denominator (the sink
    itself gets no score). lse: fp32 [B, H, Q], each counted row's natural log-sum-exp under
    that softmax (sink included), reused instead of recomputed; other rows' values are unused.
    Returns (scores float32 [B, G, N], below float32 [B, G]) where ``below`` counts the
    causal, unmasked probabilities smaller than ``tau`` x their row maximum (0 if tau == 0).
    Rows are processed ``chunk`` at a time against only the keys they can see, as one batched
    matmul per chunk (logits minus the row's lse in the same op when it is given), one exp
    and one weighted row sum (a matmul), all in place; the causal mask touches only the
    chunk's diagonal block. Memory is O(B * H * chunk * N), never N x N.
    """
    B, H, Q, D = query.shape
    G, N = key.shape[1], key.shape[2]
    g = H // G
    dev = key.device
    q = query.float().reshape(B * G, g, Q, D)
    k = key.float().reshape(B * G, N, D)
    weight = torch.ones(B, Q, device=dev) if query_mask is None else query_mask.float()
    visible = None  # [B, 1 or G, N]: real keys at or before each position, per KV head when the
    if key_mask is not None or tau > 0:  # mask is per head (for empty rows and tau)
        real = torch.ones(B, N, device=dev) if key_mask is None else key_mask.float()
        visible = (real[:, None] if real.dim() == 2 else real).cumsum(-1)
    scores = torch.zeros(B * G, 1, N, dtype=torch.float32, device=dev)
    below = torch.zeros(B, G, dtype=torch.float32, device=dev)
    for start in range(0, Q, chunk):
        stop = min(start + chunk, Q)
        c, diag, end = stop - start, N - Q + start, N - Q + stop  # keys >= diag: causal block
        rows = weight[:, None, start:stop]  # [B, 1 or G, c]
        if visible is not None:
            rows = rows * (visible[:, :, diag:end] > 0)  # rows that see a key (in the head)
        w = rows[:, :, None, :].expand(B, G, g, c).reshape(B * G, 1, g * c)
        qc = q[:, :, start:stop].reshape(B * G, g * c, D)
        kt = k[:, :end].transpose(1, 2)
        given = None  # the reused lse of each row, +inf for skipped rows (their probabilities: 0)
        if lse is not None:
            given = lse.float().reshape(B * G, g, Q)[:, :, start:stop].reshape(B * G, g * c, 1)
            given = given.masked_fill((w == 0).transpose(1, 2), float("inf"))
        inside = given is not None and softcap <= 0  # logits - lse in the matmul itself
        logits = (torch.baddbmm(given.neg(), qc, kt, alpha=scaling) if inside
                  else capped(torch.bmm(qc, kt).mul_(scaling), softcap))
        masked(logits, B, G, g, c, diag, end, key_mask)
        if given is not None:  # probabilities = exp(logits - lse)
            probs = (logits if inside else logits.sub_(given)).exp_()
        else:  # exp(logits - row max), the softmax denominator folded into the row weights
            top = logits.amax(dim=-1, keepdim=True)
            top.masked_fill_(top == float("-inf"), 0.0)  # a row without a visible key
            probs = logits.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)  # [B * G, g * c, 1]
            if sinks is not None:
                sink = sinks.float().reshape(1, G, g, 1).expand(B, G, g, c).reshape(B * G, g * c, 1)
                total += (sink - top).exp()
            w = w / total.transpose(1, 2).clamp_min(torch.finfo(torch.float32).tiny)
        scores[:, :, :end] += torch.bmm(w, probs)  # [B * G, 1, end]: weighted column sums
        if tau > 0:  # hidden keys are 0 < tau x max: count them out per row
            count = (probs < tau * probs.amax(dim=-1, keepdim=True)).sum(-1).view(B, G, g, c).float()
            hidden = end - visible[:, :, diag:end]  # [B, 1 or G, c]
            below += ((count - hidden[:, :, None, :]) * rows[:, :, None, :]).sum((2, 3))
    return scores.view(B, G, N), below


def capped(logits: Tensor, softcap: float) -> Tensor:
    """In place: softcap * tanh(logits / softcap) when softcap > 0."""
    return logits.div_(softcap).tanh_().mul_(softcap) if softcap > 0 else logits


def masked(logits: Tensor, B: int, G: int, g: int, c: int, diag: int, end: int,
           key_mask: Tensor | None) -> None:
    """In place on logits [B * G, g * c, end]: -inf where row i of the chunk (position diag
    + i) cannot see key j: j > diag + i, or padding (key_mask bool [B, N] or [B, G, N])."""
    view = logits.view(B, G, g, c, end)
    if c > 1:
        view[..., diag:end].masked_fill_(~causal(c, c, logits.device), float("-inf"))
    if key_mask is not None:
        heads = key_mask[:, None] if key_mask.dim() == 2 else key_mask  # [B, 1 or G, N]
        view.masked_fill_(~heads[:, :, None, None, :end], float("-inf"))
