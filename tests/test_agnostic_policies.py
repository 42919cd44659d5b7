"""The query-agnostic built-ins (issue #26): each score against an independent
implementation of its reference rule on small random tensors, the invariants of
kvpolicy.testing, budget 1.0 token-identical to the unpatched tiny model, and a
compress-then-ask flow."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvpolicy
from kvpolicy import Budget, Stats, get_policy
from kvpolicy.models import CACHE_ARG
from kvpolicy.testing import check_policy
from tiny_lm import ids, llama

AGNOSTIC = ["keydiff"]
NEW = 6


@pytest.fixture(scope="module")
def tiny():
    return llama()


def random_stats(L=3, B=2, G=2, N=20, D=8, seed=0) -> Stats:
    gen = torch.Generator().manual_seed(seed)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1:, :5] = False
    keys = torch.randn(L, B, G, N, D, generator=gen) * valid[None, :, None, :, None]
    return Stats(attn=torch.rand(L, B, G, N, generator=gen), queries=valid.clone(), valid=valid,
                 heads_per_group=2, keys=keys)


# ---- scores against the references' rules -------------------------------------------------
def test_keydiff_score_is_kvpress_rule():
    """kvpress KeyDiffPress: anchor = mean(normalize(k)), score = -cos(k, anchor), per
    (layer, sequence, KV head), over each sequence's real keys."""
    s = random_stats()
    got = get_policy("keydiff").score(s)
    L, B, G, N, _ = s.keys.shape
    for l in range(L):
        for b in range(B):
            real = s.valid[b]
            for h in range(G):
                k = s.keys[l, b, h][real].double()
                anchor = (k / k.norm(dim=-1, keepdim=True)).mean(0)
                want = -(k @ anchor) / (k.norm(dim=-1) * anchor.norm())
                torch.testing.assert_close(got[l, b, h][real].double(), want, rtol=1e-5, atol=1e-6)


def test_keydiff_scores_are_permutation_equivariant():
    s = random_stats(B=1)
    s.valid[:] = True
    perm = torch.randperm(s.valid.shape[-1], generator=torch.Generator().manual_seed(1))
    permuted = Stats(attn=s.attn[..., perm], queries=s.queries, valid=s.valid,
                     keys=s.keys[..., perm, :])
    policy = get_policy("keydiff")
    torch.testing.assert_close(policy.score(permuted), policy.score(s)[..., perm])


# ---- the observation -----------------------------------------------------------------------
class Spy:
    """Wraps a policy's score to record the Stats it is given."""

    def __init__(self, policy):
        self.seen, self.score = [], policy.score
        policy.score = self

    def __call__(self, stats):
        self.seen.append(stats)
        return self.score(stats)


def test_keys_reach_the_policy_as_the_model_caches_them(tiny):
    prompt = ids(40, 7)
    with torch.no_grad():
        plain = DynamicCache(config=tiny.config)
        tiny(prompt, use_cache=True, **{CACHE_ARG: plain})
        policy = get_policy("keydiff")
        spy = Spy(policy)
        kvpolicy.compress(tiny, prompt, policy, 0.5)
    kvpolicy.detach(tiny)
    keys = spy.seen[0].keys
    assert keys.shape == (3, 1, 2, 40, 16)
    for l, layer in enumerate(plain.layers):
        torch.testing.assert_close(keys[l], layer.keys)


# ---- invariants, exactness, flows -----------------------------------------------------------
@pytest.mark.parametrize("name", AGNOSTIC)
def test_invariants(name):
    check_policy(name, examples=40, equivariant=False)


@pytest.mark.parametrize("name", AGNOSTIC)
def test_budget_one_is_token_identical(tiny, name):
    prompt = ids(60, 2)
    with torch.no_grad():
        want = tiny.generate(prompt, max_new_tokens=NEW, do_sample=False)
        with kvpolicy.apply(tiny, name, 1.0):
            got = tiny.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", AGNOSTIC)
def test_compress_then_ask(tiny, name):
    document, question = ids(90, 1), ids(12, 5)
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, document, name, 0.3, chunk_size=32, max_new_tokens=NEW)
        kept = [int((layer.pos[0, 0] >= 0).sum()) for layer in cache.layers]
        out = tiny.generate(torch.cat([document, question], -1), max_new_tokens=NEW,
                            do_sample=False, **{CACHE_ARG: cache.copy()})
    kvpolicy.detach(tiny)
    assert 0 < sum(kept) <= round(0.3 * 90 * 3)
    assert out.shape == (1, 90 + 12 + NEW)
