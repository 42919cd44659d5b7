"""The engine-neutral scoring pipeline: what both engines (Hugging Face generate through
kvpolicy.prefill, and the vLLM plugin) call to turn attention into a plan.

1. ``observe``: one forward's counted queries against the keys they see -> the attention
   each key received (and the policy's sparsity count), never an N x N matrix.
2. ``ScoreTally``: a request's (or a batch's) observations per layer, summed as chunks,
   new turns or deferred decode steps arrive.
3. ``plan_row``: one batch row's ``Stats`` built from a tally, then the policy's plan.

The engine owns everything else (which queries a forward counts, buffers, compaction).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvpolicy_kernels import accumulate_scores, accumulate_scores_sparsity

from .budget import Budget
from .policy import Plan, Policy, Stats


@dataclass
class Observation:
    """attn: float32 [B, G, S] attention each key received from the counted queries (summed
    over the query heads of its KV group); below: float32 [B, G] the count of counted
    probabilities under tau x row max (policies with tau > 0), else None."""

    attn: Tensor
    below: Tensor | None = None


def observe(policy: Policy, query: Tensor, key: Tensor, *, scaling: float, query_mask: Tensor,
            key_mask: Tensor | None = None, softcap: float | None = None,
            sinks: Tensor | None = None, lse: Tensor | None = None) -> Observation:
    """The counted queries' attention on every key, under the model's softmax.

    query [B, H, q, D]: queries at the positions of the last q keys (causal among them);
    key [B, G, S, D]; query_mask bool [B, q]: the rows the policy counts; key_mask bool
    [B, S] | None: False at empty or padded keys; softcap, sinks float [H]: the model's
    softmax; lse fp32 [B, H, q]: the attention's log-sum-exp, when already computed.
    """
    extra = {"softcap": softcap} if softcap else {}
    if sinks is not None:
        extra["sinks"] = sinks
    if lse is not None:
        extra["lse"] = lse
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    args = dict(scaling=scaling, key_mask=key_mask, query_mask=query_mask, **extra)
    tau = policy.requirements().tau
    if tau > 0:
        return Observation(*accumulate_scores_sparsity(query, key, tau=tau, **args))
    return Observation(accumulate_scores(query, key, **args))


def nothing_observed(policy: Policy, key: Tensor) -> Observation:
    """The observation of a forward that counts no query: zeros for key [B, G, S, D]."""
    B, G, S, _ = key.shape
    below = key.new_zeros(B, G, dtype=torch.float32) if policy.requirements().sparsity else None
    return Observation(key.new_zeros(B, G, S, dtype=torch.float32), below)


class ScoreTally:
    """Per layer the observations summed so far: attn float32 [B, G, S_l] over the keys in
    arrival order (a later, longer observation extends it with zeros), below [B, G]."""

    def __init__(self, num_layers: int):
        self.attn: list[Tensor | None] = [None] * num_layers
        self.below: list[Tensor | None] = [None] * num_layers

    def add(self, layer: int, obs: Observation) -> None:
        """Add an observation of layer ``layer`` whose keys are this layer's first S keys."""
        old, new = self.attn[layer], obs.attn
        if old is None:
            self.attn[layer] = new.clone()
        else:
            if new.shape[-1] > old.shape[-1]:
                old = torch.nn.functional.pad(old, (0, new.shape[-1] - old.shape[-1]))
            old[..., :new.shape[-1]] += new
            self.attn[layer] = old
        if obs.below is not None:
            b = self.below[layer]
            self.below[layer] = obs.below.clone() if b is None else b + obs.below

    def add_max(self, layer: int, obs: Observation) -> None:
        """Keep, per key, the max of the tally and an observation over this layer's first S
        keys (a max-reduction: KVzip's reconstruction passes)."""
        old, new = self.attn[layer], obs.attn
        if old is None:
            self.attn[layer] = new.clone()
            return
        if new.shape[-1] > old.shape[-1]:
            old = torch.nn.functional.pad(old, (0, new.shape[-1] - old.shape[-1]))
        old[..., :new.shape[-1]] = torch.maximum(old[..., :new.shape[-1]], new)
        self.attn[layer] = old

    def set(self, layer: int, obs: Observation) -> None:
        """Replace layer ``layer``'s tally (a forward that observed its keys afresh)."""
        self.attn[layer] = obs.attn
        self.below[layer] = obs.below

    def layer(self, layer: int) -> Tensor | None:
        return self.attn[layer]


def plan_row(policy: Policy, budget: Budget, attn: Tensor, *, queries: Tensor, valid: Tensor,
             heads_per_group: int, vision: Tensor | None = None, below: Tensor | None = None,
             new_tokens: int = 0, seen: int | None = None, keys: Tensor | None = None,
             query_mean: Tensor | None = None, query_cov: Tensor | None = None,
             value_norms: Tensor | None = None, future_rotary: Tensor | None = None,
             reconstructed: bool = False, head_valid: Tensor | None = None,
             prompt_attn: Tensor | None = None) -> Plan:
    """The policy's plan for one batch row: attn float32 [L, 1, G, N] (each planned layer's
    tally, aligned on the row's N keys), queries / valid / vision bool [1, N], below float32
    [L, 1, G] | None, new_tokens: decode steps still planned, seen: tokens the budget is a
    fraction of when it differs from the valid keys (a continued cache), keys [L, 1, G, N,
    D] | None: the layers' cached keys (policies whose requirements ask ``needs_keys``);
    query_mean [L, 1, H, D], query_cov [L, 1, H, D, D], value_norms [L, 1, G, N],
    future_rotary [1, 2, F, D] (``query_stats`` / ``future_positions``; see Stats);
    reconstructed: attn is the max of the policy's reconstruction passes; head_valid bool
    [L, 1, G, N] | None: which KV heads hold each key, when they differ; prompt_attn fp32
    [L, 1, G, N] | None: a reconstructing policy's counted prompt queries' attention. An input the
    policy's requirements ask for and the engine did not give is refused by name."""
    needs = policy.requirements()
    inputs = (("the cached keys (needs_keys)", needs.needs_keys, keys is not None),
              ("query statistics (query_stats)", needs.query_stats, query_mean is not None),
              ("the future rotary (future_positions)", needs.future_positions,
               future_rotary is not None),
              ("reconstruction passes (reconstruct)", needs.reconstruct, reconstructed))
    missing = [what for what, asked, given in inputs if asked and not given]
    if missing:
        raise ValueError(f"kvpolicy {policy.name} needs {', '.join(missing)}, which this engine "
                         f"did not provide; use it through kvpolicy.apply or kvpolicy.compress")
    stats = Stats(attn, queries, valid, heads_per_group, vision, below, new_tokens, seen, keys,
                  query_mean, query_cov, value_norms, future_rotary, head_valid, prompt_attn)
    return policy.plan(stats, budget)
