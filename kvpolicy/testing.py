"""The policy author's kit: hypothesis strategies for prompt statistics and budgets, and the
invariants every policy must hold, as plain checks and as one property test::

    from kvpolicy.testing import check_policy
    def test_invariants(): check_policy(MyPolicy)

Needs hypothesis (``pip install 'kvpolicy[test]'``).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

try:
    from hypothesis import HealthCheck, assume, given, settings
    from hypothesis import strategies as st
except ModuleNotFoundError as exc:
    raise ModuleNotFoundError("kvpolicy.testing needs hypothesis: pip install 'kvpolicy[test]'",
                              name="hypothesis") from exc

from .budget import Budget
from .policy import Plan, Policy, Stats
from .registry import get_policy
from .selection import select_keep

__all__ = ["budgets", "check_equivariant", "check_head_plan", "check_monotone", "check_plan",
           "check_policy",
           "quiet_plan", "stats"]


@st.composite
def stats(draw, max_layers: int = 6, max_tokens: int = 64, with_vision: bool | None = None,
          max_new_tokens: int = 16, with_keys: bool = False, with_query_stats: bool = False,
          with_prompt_attn: bool = False) -> Stats:
    """Stats of a random left-padded batch: L 1-6, B 1-3, G 1-4, heads per group 1-3,
    N 1-max_tokens; scores random, all equal, or peaked; optional vision spans; with_keys:
    random keys [L, B, G, N, D] (D 2-8 even, 0 at padding) for policies that need them;
    with_query_stats: also a query mean and covariance, value norms and a future rotary;
    with_prompt_attn: a reconstructing policy's counted prompt queries' attention (0-4)."""
    L, B = draw(st.integers(1, max_layers)), draw(st.integers(1, 3))
    G, g = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    N = draw(st.integers(1, max_tokens))
    pads = torch.tensor([0] + [draw(st.integers(0, N - 1)) for _ in range(B - 1)])
    valid = torch.arange(N)[None, :] >= pads[:, None]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "equal", "peaked"]))
    attn = {"random": lambda: torch.rand(L, B, G, N, generator=gen),
            "equal": lambda: torch.ones(L, B, G, N),
            "peaked": lambda: torch.rand(L, B, G, N, generator=gen) ** 8}[kind]()
    attn = attn * valid[None, :, None, :]
    vision = None
    if with_vision or (with_vision is None and draw(st.booleans())):
        start = draw(st.integers(0, N - 1))
        stop = draw(st.integers(start, N))
        vision = valid & (torch.arange(N) >= start) & (torch.arange(N) < stop)
    s = Stats(attn=attn, queries=valid.clone(), valid=valid, heads_per_group=g, vision=vision,
              max_new_tokens=draw(st.integers(0, max_new_tokens)))
    entries = s.causal_entries()[None, :, None] * g
    s.below = torch.floor(torch.rand(L, B, G, generator=gen) * entries)
    if with_keys or with_query_stats:
        D = 2 * draw(st.integers(1, 4))
        s.keys = torch.randn(L, B, G, N, D, generator=gen) * valid[None, :, None, :, None]
    if with_query_stats:
        s.query_mean = torch.randn(L, B, G * g, D, generator=gen)
        spread = torch.randn(L, B, G * g, D, D, generator=gen)
        s.query_cov = spread @ spread.transpose(-1, -2) / D
        s.value_norms = torch.rand(L, B, G, N, generator=gen) * valid[None, :, None]
        angles = torch.rand(B, 3, D, generator=gen) * 6.3
        s.future_rotary = torch.stack([angles.cos(), angles.sin()], 1)
    if with_prompt_attn:
        s.prompt_attn = 4 * torch.rand(L, B, G, N, generator=gen) ** 4 * valid[None, :, None, :]
    return s


def budgets(max_tokens: int = 128):
    """A float fraction in (0, 1] or an int token count per layer."""
    return st.one_of(st.floats(0.001, 1.0), st.just(1.0),
                     st.integers(1, max_tokens)).map(Budget)


def quiet_plan(policy: Policy, s: Stats, budget: Budget) -> Plan:
    """``policy.plan`` without the short-prompt warning."""
    logging.disable(logging.WARNING)
    try:
        return policy.plan(s, budget)
    finally:
        logging.disable(logging.NOTSET)


def check_plan(policy: Policy, s: Stats, budget: Budget) -> Plan:
    """Invariants 1-3 of one plan: 1 <= n_l <= N, sum <= total and == total when it fits;
    keep rows sorted, unique, in range, padding only when a sequence is short; protected
    tokens kept. Returns the plan."""
    plan = quiet_plan(policy, s, budget)
    if plan.counts is not None:
        return check_head_plan(policy, s, budget, plan)
    L, N = s.num_layers, s.num_tokens
    fixed = policy.requirements().decode == "evict"
    sizes = torch.tensor(plan.capacity if fixed else plan.kept)
    cap = N + s.max_new_tokens if fixed else N
    total = max(policy.total(budget, s), policy.floor(s) * L)
    assert sizes.min() >= 1 and sizes.max() <= cap, f"layer sizes {sizes.tolist()} outside 1..{cap}"
    assert sizes.sum() <= total, f"{int(sizes.sum())} kept over the total {total}"
    if total <= cap * L:
        assert sizes.sum() == total, f"{int(sizes.sum())} kept, the total is {total}"
    if not fixed:
        assert plan.capacity == [n + s.max_new_tokens for n in plan.kept]
    protected, real = policy.protected(s), s.valid.sum(-1)
    for keep in plan.keep:
        B, G, n = keep.shape
        assert keep.dtype == torch.int64 and n >= 1
        assert (keep[..., 1:] > keep[..., :-1]).all(), "keep rows not sorted and unique"
        assert keep.min() >= 0 and keep.max() < s.valid.shape[-1], "keep index out of range"
        for b in range(B):
            kept_valid = s.valid[b][keep[b]]
            assert kept_valid.sum(-1).eq(min(n, int(real[b]))).all(), "padding kept"
            mask = torch.zeros(G, s.valid.shape[-1], dtype=torch.bool).scatter_(1, keep[b], True)
            assert (mask | ~protected[b]).all(), "a protected token evicted"
    return plan


def check_head_plan(policy: Policy, s: Stats, budget: Budget, plan: Plan) -> Plan:
    """The invariants of a per-head plan (``Plan.counts``): per row, the entries kept over
    every layer and KV head sum to at most the total x G, exactly for an unpadded row (or
    every entry when fewer); each
    head keeps every protected token, at least the layer floor (or all its real tokens),
    no padding; its first counts indices sorted, unique, in range."""
    L, G = s.num_layers, s.attn.shape[2]
    total = max(policy.total(budget, s), policy.floor(s) * L)
    protected, real = policy.protected(s), s.valid.sum(-1)
    floor = policy.floor(s)
    entries = torch.stack(plan.counts)  # [L, B, G]
    for b in range(entries.shape[1]):
        kept, want = int(entries[:, b].sum()), min(total, L * s.num_tokens) * G
        assert kept <= want, f"row {b} keeps {kept} entries, over the total {total} x {G}"
        if int(real[b]) == s.num_tokens:
            assert kept == want, f"row {b} keeps {kept} entries, the total is {total} x {G}"
    for l, keep in enumerate(plan.keep):
        counts = plan.counts[l]
        assert keep.dtype == torch.int64 and counts.shape == keep.shape[:2]
        assert keep.min() >= 0 and keep.max() < s.valid.shape[-1], "keep index out of range"
        for b in range(keep.shape[0]):
            for g in range(G):
                own = keep[b, g, :int(counts[b, g])]
                assert len(own) >= min(floor, int(real[b])), f"head {g} of layer {l} under the floor"
                assert (own[1:] > own[:-1]).all(), "a head's kept indices not sorted and unique"
                assert s.valid[b][own].all(), "padding kept"
                mask = torch.zeros(s.valid.shape[-1], dtype=torch.bool)
                mask[own] = True
                assert (mask | ~protected[b]).all(), "a protected token evicted from a head"
    return plan


def check_monotone(policy: Policy, s: Stats, t1: int, t2: int) -> None:
    """Invariant 5: a larger total (t2 >= t1) never lowers any layer's allocation."""
    floor = policy.floor(s)  # a per-head allocation (int64 [L, B, G]) compares per head
    assert (policy.allocate(s, t1, floor) <= policy.allocate(s, t2, floor)).all(), \
        f"a layer's allocation fell as the total grew from {t1} to {t2}"


def check_equivariant(policy: Policy, s: Stats, perm: torch.Tensor, n: int,
                      protected: torch.Tensor) -> None:
    """Invariant 6: permuting the keys with their statistics permutes the scores and the
    kept set. ``s`` has no padding; ``perm`` [N]; ``protected`` bool [B, N]."""
    scores = policy.score(s)
    keys = None if s.keys is None else s.keys[..., perm, :]
    permuted = dataclasses.replace(s, attn=s.attn[..., perm], keys=keys)
    assert torch.equal(policy.score(permuted), scores[..., perm]), "scores not permuted"
    keep = select_keep(scores[0], n, protected, s.valid)
    keep_p = select_keep(scores[0][..., perm], n, protected[:, perm], s.valid)
    assert torch.equal(torch.sort(perm[keep_p], dim=-1).values, keep), "kept set not permuted"


def check_policy(policy: str | Callable[[], Policy], *, examples: int = 60,
                 monotone: bool = True, equivariant: bool = True) -> None:
    """Run the invariants over ``examples`` hypothesis examples each. ``policy``: a
    registered name or a factory (e.g. the class) called once per example. ``monotone``
    and ``equivariant`` switch invariants 5 and 6 (a policy may rightly break them:
    random scores are not permutation-equivariant)."""
    make = (lambda: get_policy(policy)) if isinstance(policy, str) else policy
    needs = make().requirements()
    inputs = dict(with_keys=needs.needs_keys, with_query_stats=needs.query_stats,
                  with_prompt_attn=needs.reconstruct and needs.queries != "none")
    prop = settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])

    @prop
    @given(s=stats(**inputs), budget=budgets())
    def plans(s, budget):
        check_plan(make(), s, budget)

    @prop
    @given(s=stats(**inputs), data=st.data())
    def allocation_monotone(s, data):
        p = make()
        L, floor = s.num_layers, p.floor(s)
        top = (s.num_tokens + (s.max_new_tokens if p.requirements().decode == "evict" else 0)) * L
        t1 = data.draw(st.integers(floor * L, top))
        check_monotone(p, s, t1, data.draw(st.integers(t1, top)))

    @prop
    @given(s=stats(with_vision=False, **inputs), data=st.data())
    def scores_equivariant(s, data):
        assume(bool(s.valid.all()))
        N = s.valid.shape[-1]
        perm = torch.tensor(data.draw(st.permutations(range(N))))
        s.attn = s.attn + torch.arange(N) * 1e-3  # distinct scores: ties aside
        protected = torch.zeros_like(s.valid)
        protected[:, data.draw(st.integers(0, N - 1))] = True
        check_equivariant(make(), s, perm, data.draw(st.integers(1, N)), protected)

    plans()
    if monotone:
        allocation_monotone()
    if equivariant:
        scores_equivariant()
