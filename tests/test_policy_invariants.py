"""Invariants 1-3 and 5-8 of docs/policies.md as hypothesis properties over every built-in policy."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import Budget, get_policy
from kvpolicy.policies import H2O
from kvpolicy.selection import select_keep
from strategies import budgets, stats

BUILTINS = ["h2o", "prefixkv", "pyramidkv", "snapkv", "spankv", "streamingllm", "tova",
            "uniform", "vlcache"]
MONOTONE = ["uniform", "prefixkv", "vlcache", "pyramidkv"]
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def quiet_plan(policy, s, budget):
    """policy.plan without the short-prompt warning (tested on its own below)."""
    logging.disable(logging.WARNING)
    try:
        return policy.plan(s, budget)
    finally:
        logging.disable(logging.NOTSET)


def test_builtins_registered():
    assert set(BUILTINS) <= set(kvpolicy.available_policies())


@pytest.mark.parametrize("name", BUILTINS)
@PROPERTY
@given(s=stats(), budget=budgets())
def test_allocation_bounds_and_total(name, s, budget):
    """Invariant 1: 1 <= n_l <= N, sum <= total, and == total when it fits."""
    policy = get_policy(name)
    plan = quiet_plan(policy, s, budget)
    L, N = s.num_layers, s.num_tokens
    fixed = policy.requirements().decode == "evict"
    sizes = torch.tensor(plan.capacity if fixed else plan.kept)
    cap = N + s.max_new_tokens if fixed else N
    floor = policy.floor(s)
    total = max(policy.total(budget, s), floor * L)
    assert sizes.min() >= 1 and sizes.max() <= cap
    assert sizes.sum() <= total
    if total <= cap * L:
        assert sizes.sum() == total
    if not fixed:
        assert plan.capacity == [n + s.max_new_tokens for n in plan.kept]


@pytest.mark.parametrize("name", BUILTINS)
@PROPERTY
@given(s=stats(), budget=budgets())
def test_keep_rows_valid_and_protected(name, s, budget):
    """Invariants 2 and 3: rows sorted, unique, in range, no padding; protected kept."""
    policy = get_policy(name)
    plan = quiet_plan(policy, s, budget)
    protected = policy.protected(s)
    real = s.valid.sum(-1)
    for keep, size in zip(plan.keep, plan.capacity):
        B, G, n = keep.shape
        assert keep.dtype == torch.int64 and n >= 1
        assert (keep[..., 1:] > keep[..., :-1]).all()  # sorted and unique
        assert keep.min() >= 0 and keep.max() < s.valid.shape[-1]
        for b in range(B):
            kept_valid = s.valid[b][keep[b]]
            assert kept_valid.sum(-1).eq(min(n, int(real[b]))).all()  # padding only if short
            mask = torch.zeros(G, s.valid.shape[-1], dtype=torch.bool)
            mask.scatter_(1, keep[b], True)
            assert (mask | ~protected[b]).all()
            if isinstance(policy, H2O):  # its protected window is the recent part of the size
                recent = kvpolicy.selection.edge_tokens(s.valid[b:b + 1], 0, policy.recent(size))
                assert (mask | ~recent).all()


@pytest.mark.parametrize("name", MONOTONE)
@PROPERTY
@given(s=stats(), data=st.data())
def test_allocation_monotone(name, s, data):
    """Invariant 5: a larger budget never lowers any layer's budget."""
    policy = get_policy(name)
    floor = policy.floor(s)
    L, N = s.num_layers, s.num_tokens
    t1 = data.draw(st.integers(floor * L, N * L))
    t2 = data.draw(st.integers(t1, N * L))
    assert (policy.allocate(s, t1, floor) <= policy.allocate(s, t2, floor)).all()


@pytest.mark.parametrize("name", ["uniform", "h2o", "vlcache", "prefixkv"])
@PROPERTY
@given(s=stats(with_vision=False), data=st.data())
def test_scores_permutation_equivariant(name, s, data):
    """Invariant 6: permuting keys with their statistics permutes scores and the kept set."""
    assume(bool(s.valid.all()))
    N = s.valid.shape[-1]
    perm = torch.tensor(data.draw(st.permutations(range(N))))
    s.attn = s.attn + torch.arange(N) * 1e-3  # distinct scores: ties aside
    policy = get_policy(name)
    scores = policy.score(s)
    permuted = kvpolicy.Stats(attn=s.attn[..., perm], queries=s.queries, valid=s.valid,
                              heads_per_group=s.heads_per_group, below=s.below)
    assert torch.equal(policy.score(permuted), scores[..., perm])
    n = data.draw(st.integers(1, N))
    protected = torch.zeros_like(s.valid)
    protected[:, data.draw(st.integers(0, N - 1))] = True
    keep = select_keep(scores[0], n, protected, s.valid)
    keep_p = select_keep(scores[0][..., perm], n, protected[:, perm], s.valid)
    assert torch.equal(torch.sort(perm[keep_p], dim=-1).values, keep)


@PROPERTY
@given(s=stats(max_layers=8), data=st.data())
def test_vlcache_allocation_follows_density(s, data):
    """Invariant 7: equal sparsity -> budgets within 1; denser never fewer (unclipped)."""
    L, B, G = s.below.shape
    levels = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=L, max_size=L)))
    entries = s.causal_entries()[None, :, None] * s.heads_per_group
    s.below = torch.floor(entries * levels[:, None, None] / 4).expand(L, B, G).clone()
    policy = get_policy("vlcache")
    floor = policy.floor(s)
    total = data.draw(st.integers(floor * L, s.num_tokens * L))
    n = policy.allocate(s, total, floor)
    free = (n > floor) & (n < s.num_tokens)
    d = policy.density(s)
    for a in range(L):
        for b in range(L):
            if free[a] and free[b]:
                if d[a] == d[b]:
                    assert abs(int(n[a]) - int(n[b])) <= 1
                elif d[a] > d[b]:
                    assert n[a] >= n[b]


@PROPERTY
@given(s=stats(), data=st.data())
def test_prefixkv_layers_reach_shared_level(s, data):
    """Invariant 8: every layer's kept prefix reaches the shared level p."""
    policy = get_policy("prefixkv")
    floor = policy.floor(s)
    L, N = s.num_layers, s.num_tokens
    total = data.draw(st.integers(floor * L, N * L))
    p, n = policy.level(s, total, floor)
    _, curve = policy.curves(s)
    reached = curve.gather(1, (n - 1)[:, None]).squeeze(1)
    assert (reached >= p - 1e-9).all()
    assert int(n.sum()) == total


@PROPERTY
@given(s=stats(), budget=budgets())
def test_pyramidkv_budgets_fall_with_depth(s, budget):
    policy = get_policy("pyramidkv")
    floor = policy.floor(s)
    total = max(policy.total(budget, s), floor * s.num_layers)
    n = policy.allocate(s, total, floor)
    assert (n[1:] <= n[:-1] + 1).all()


def test_uniform_spreads_remainder_over_first_layers():
    s = kvpolicy.Stats(attn=torch.rand(5, 1, 2, 40), queries=torch.ones(1, 40, dtype=torch.bool),
                       valid=torch.ones(1, 40, dtype=torch.bool))
    assert get_policy("uniform").allocate(s, 53, 8).tolist() == [11, 11, 11, 10, 10]


def test_budget_exactly_the_window_keeps_the_window():
    s = kvpolicy.Stats(attn=torch.rand(3, 1, 1, 30), queries=torch.ones(1, 30, dtype=torch.bool),
                       valid=torch.ones(1, 30, dtype=torch.bool))
    plan = get_policy("snapkv", window=5).plan(s, Budget(5))
    assert all(k.flatten().tolist() == list(range(25, 30)) for k in plan.keep)


def test_short_prompt_warns_once_and_keeps_protected(caplog):
    s = kvpolicy.Stats(attn=torch.rand(4, 1, 1, 20), queries=torch.ones(1, 20, dtype=torch.bool),
                       valid=torch.ones(1, 20, dtype=torch.bool))
    with caplog.at_level(logging.WARNING, logger="kvpolicy"):
        plan = get_policy("snapkv").plan(s, Budget(0.1))
    assert plan.kept == [20] * 4
    assert len(caplog.records) == 1 and "20-token prompt" in caplog.text
    assert "effective budget 1.000" in caplog.text


def test_h2o_size_covers_new_tokens_and_budget_one_keeps_all():
    s = kvpolicy.Stats(attn=torch.rand(2, 1, 1, 100), queries=torch.ones(1, 100, dtype=torch.bool),
                       valid=torch.ones(1, 100, dtype=torch.bool), max_new_tokens=20)
    plan = get_policy("h2o").plan(s, Budget(0.1))
    assert plan.capacity == [12, 12] and plan.kept == [12, 12]
    full = get_policy("h2o").plan(s, Budget(1.0))
    assert full.capacity == [120, 120] and full.kept == [100, 100]


def test_spankv_keeps_the_upper_layers_peak_span_in_every_layer():
    L, N = 6, 200
    attn = torch.rand(L, 1, 2, N) * 0.01
    attn[L // 2:, :, :, 120] = 5.0  # the last query points at position 120 in the upper layers
    s = kvpolicy.Stats(attn=attn, queries=torch.ones(1, N, dtype=torch.bool),
                       valid=torch.ones(1, N, dtype=torch.bool))
    policy = get_policy("spankv")
    plan = policy.plan(s, Budget(0.2))
    span = set(range(120 - policy.span // 2, 120 + policy.span // 2 + 1))
    for keep in plan.keep:
        for row in keep[0]:
            assert span <= set(row.tolist())
    same = get_policy("spankv", shared=1.0).plan(s, Budget(0.2)).keep
    assert all(torch.equal(k, same[0]) for k in same)


VARIANTS = {  # non-default modes: name -> policy for a Stats
    "prefixkv-fixed-point": lambda s: get_policy("prefixkv", fixed_point=True),
    "prefixkv-ratios": lambda s: get_policy("prefixkv", ratios=[1.0 + l % 3 for l in range(s.num_layers)]),
    "vlcache-per-head": lambda s: get_policy("vlcache", shared_heads=False),
    "uniform-prefixkv": lambda s: get_policy("uniform", scores="prefixkv"),
    "uniform-vlcache": lambda s: get_policy("uniform", scores="vlcache"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@PROPERTY
@given(s=stats(), budget=budgets())
def test_variants_bounds_rows_and_protected(variant, s, budget):
    """Invariants 1-3 for the non-default modes: sizes within [1, room], the total exact
    when it fits, rows sorted, unique, without padding unless short, protected kept."""
    policy = VARIANTS[variant](s)
    plan = quiet_plan(policy, s, budget)
    fixed = policy.requirements().decode == "evict"
    room = s.num_tokens + (s.max_new_tokens if fixed else 0)
    sizes = torch.tensor(plan.capacity if fixed else plan.kept)
    total = max(policy.total(budget, s), policy.floor(s) * s.num_layers)
    assert sizes.min() >= 1 and sizes.max() <= room and sizes.sum() <= total
    if total <= room * s.num_layers:
        assert sizes.sum() == total
    protected, real = policy.protected(s), s.valid.sum(-1)
    for keep in plan.keep:
        assert (keep[..., 1:] > keep[..., :-1]).all()
        for b in range(keep.shape[0]):
            assert s.valid[b][keep[b]].sum(-1).eq(min(keep.shape[-1], int(real[b]))).all()
            mask = torch.zeros(keep.shape[1], s.valid.shape[-1], dtype=torch.bool)
            assert (mask.scatter_(1, keep[b], True) | ~protected[b]).all()
