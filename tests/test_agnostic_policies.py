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

AGNOSTIC = ["keydiff", "tova"]
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


def eager_attentions(model, prompt):
    """Per layer the unpatched model's attention probabilities [B, H, N, N] (eager)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(prompt, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def test_tova_score_is_the_last_rows_head_mean(tiny):
    """kvpress TOVAPress: the last prompt query's attention, mean over all query heads,
    copied to every KV head."""
    prompt = ids(50, 3)
    policy = get_policy("tova")
    spy = Spy(policy)
    with torch.no_grad():
        kvpolicy.compress(tiny, prompt, policy, 0.5)
    kvpolicy.detach(tiny)
    got = policy.score(spy.seen[0])  # [L, 1, G, N]
    for l, attn in enumerate(eager_attentions(tiny, prompt)):
        want = attn[0, :, -1, :].mean(0)
        for g in range(got.shape[2]):
            torch.testing.assert_close(got[l, 0, g], want, rtol=1e-4, atol=1e-6)


def tova_reference(model, prompt, cache_size: int, new_tokens: int):
    """The original TOVA (schwartz-lab-NLP/TOVA, tova_cache.py) on the unpatched eager
    model: after each forward every layer drops, until it holds ``cache_size`` tokens, the
    ones the newest token attends to least (mean over all heads, its own key included);
    positions stay the original ones. Returns (greedy ids [1, N + new], per layer the
    positions held at the end)."""
    model.set_attn_implementation("eager")
    cache = DynamicCache(config=model.config)
    held = [[] for _ in range(model.config.num_hidden_layers)]
    tokens, x, pos = prompt, prompt, torch.arange(prompt.shape[1])[None]
    try:
        with torch.no_grad():
            for _ in range(new_tokens):
                out = model(x, position_ids=pos, output_attentions=True, use_cache=True,
                            **{CACHE_ARG: cache})
                for l, (layer, attn) in enumerate(zip(cache.layers, out.attentions)):
                    held[l] += pos[0].tolist()
                    score = attn[0, :, -1, :].mean(0)
                    if score.shape[0] > cache_size:
                        keep = torch.sort(score.topk(cache_size).indices).values
                        layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
                        held[l] = [held[l][i] for i in keep.tolist()]
                nxt = out.logits[:, -1:].argmax(-1)
                tokens = torch.cat([tokens, nxt], -1)
                x, pos = nxt, torch.tensor([[tokens.shape[1] - 1]])
    finally:
        model.set_attn_implementation("sdpa")
    return tokens, [sorted(h) for h in held]


def test_tova_decode_is_the_original_fixed_size_cache(tiny):
    """A layer of ``size`` slots overwrites, before each step, the slot the previous token
    attended to least: the original's cache of size - 1 tokens plus the newest."""
    prompt, size = ids(40, 4), 12
    want, want_held = tova_reference(tiny, prompt, size - 1, NEW + 1)
    with torch.no_grad(), kvpolicy.apply(tiny, "tova", size):
        res = tiny.generate(prompt, max_new_tokens=NEW + 1, do_sample=False,
                            return_dict_in_generate=True)
    assert torch.equal(res.sequences, want)
    cache = res.past_key_values
    for layer, held in zip(cache.layers, want_held):
        got = sorted(int(p) for p in layer.pos[0, 0] if p >= 0)
        assert layer.pos.shape[-1] == size
        assert set(held) <= set(got) and len(got) == size


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
    assert 0 < sum(kept) <= round(0.3 * (90 + NEW) * 3)  # fixed-size policies hold new tokens too
    assert out.shape == (1, 90 + 12 + NEW)
