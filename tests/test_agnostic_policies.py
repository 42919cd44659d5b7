"""The query-agnostic built-ins (issue #26): each score against an independent
implementation of its reference rule on small random tensors, the invariants of
kvpolicy.testing, budget 1.0 token-identical to the unpatched tiny model, and a
compress-then-ask flow."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import kvpolicy
from kvpolicy import Budget, Stats, attention, get_policy, reconstruction
from kvpolicy import cache as cache_module
from kvpolicy.heads import global_heads, with_per_head
from kvpolicy.models import CACHE_ARG
from kvpolicy.testing import check_policy
from families import build
from test_defer import eager_attention
from tiny_lm import ids, llama

AGNOSTIC = ["keydiff", "tova", "kvzip", "kvzip_floor", "expected_attention"]
NOT_MONOTONE = {"kvzip_floor"}  # its per-head floor grows with the total
NEW = 6


class CharTokenizer:
    """A stand-in tokenizer for the tiny model: one id per character, no chat template."""

    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) % 890 for c in text]}


PARAMS = {"kvzip": {"tokenizer": CharTokenizer()}, "kvzip_floor": {"tokenizer": CharTokenizer()}}


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


def ragged_query_free_stats(data, heads_per_group: int = 2) -> Stats:
    """Stats of a continued cache whose layers and KV heads hold different slots
    (``head_valid``: at least 6 random slots each), with random keys (garbage in the slots
    a head does not hold), query moments, value norms and rotary."""
    L, B, G, N, D, F_ = 2, 1, 2, 14, 8, 3
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 16), label="seed"))
    head_valid = torch.zeros(L, B, G, N, dtype=torch.bool)
    for l in range(L):
        for g in range(G):
            held = data.draw(st.sets(st.integers(0, N - 1), min_size=6), label=f"held {l} {g}")
            head_valid[l, 0, g, sorted(held)] = True
    H = G * heads_per_group
    half = torch.randn(L, B, H, D, D, generator=gen)
    angles = torch.rand(B, F_, D, generator=gen) * 6
    return Stats(attn=torch.zeros(L, B, G, N), queries=head_valid.any(2).any(0),
                 valid=head_valid.any(2).any(0), heads_per_group=heads_per_group,
                 keys=torch.randn(L, B, G, N, D, generator=gen),
                 query_mean=torch.randn(L, B, H, D, generator=gen),
                 query_cov=half @ half.transpose(-1, -2) / D,
                 value_norms=torch.rand(L, B, G, N, generator=gen) + 0.5,
                 future_rotary=torch.stack([angles.cos(), angles.sin()], 1), head_valid=head_valid)


@pytest.mark.parametrize("name", ["keydiff", "expected_attention"])
@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_query_free_scores_of_a_ragged_cache_are_each_heads_held_slots_scored_alone(name, data):
    """In a continued cache whose layers and heads hold different slots, each (layer, KV
    head)'s scores are those of the slots it holds scored on their own: what the other
    heads hold, and what sits in the slots it does not hold, change nothing."""
    s = ragged_query_free_stats(data)
    g_ = s.heads_per_group
    policy = get_policy(name)
    got = policy.score(s)
    for l in range(s.num_layers):
        for g in range(s.keys.shape[2]):
            idx = s.head_valid[l, 0, g].nonzero()[:, 0]
            n = idx.shape[0]
            alone = Stats(attn=torch.zeros(1, 1, 1, n), queries=torch.ones(1, n, dtype=torch.bool),
                          valid=torch.ones(1, n, dtype=torch.bool), heads_per_group=g_,
                          keys=s.keys[l:l + 1, :, g:g + 1, idx], query_mean=s.query_mean[l:l + 1, :, g * g_:(g + 1) * g_],
                          query_cov=s.query_cov[l:l + 1, :, g * g_:(g + 1) * g_],
                          value_norms=s.value_norms[l:l + 1, :, g:g + 1, idx],
                          future_rotary=s.future_rotary)
            torch.testing.assert_close(got[l, :, g, idx], policy.score(alone)[0, :, 0],
                                       rtol=1e-5, atol=1e-6)
            assert not got[l, 0, g][~s.head_valid[l, 0, g]].any()


def test_tova_score_is_the_last_rows_head_mean(tiny):
    """kvpress TOVAPress: the last prompt query's attention, mean over all query heads,
    copied to every KV head."""
    prompt = ids(50, 3)
    policy = get_policy("tova")
    got = policy.score(compressed_stats(tiny, prompt, policy, 0.5))  # [L, 1, G, N]
    for l, attn in enumerate(eager_attention(tiny, prompt)):
        want = attn[:, -1, :].mean(0)
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


def kvzip_reference(model, context, tok, chunk: int, sinks: int = 4, plus: bool = False) -> torch.Tensor:
    """KVzip's scores from the rule (paper Algorithm 1, kvpress KVzipPress): after the
    context, each pass = repeat request + "\n" + a context chunk teacher-forced, at the
    positions after the context; a chunk key's score is the max, over the pass's queries
    and its group's heads, of its probability under the softmax restricted to the sinks,
    the chunk and the pass's own tokens. Here from the unpatched eager model's full
    probabilities P, renormalised over that subset. ``plus`` (KVzip+, kvpress's
    ``kvzip_plus_normalization``): each probability times ||W_O^(h) v_i|| / ||x_t||, with x
    the attention module's input, W_O^(h) query head h's columns of o_proj. Returns fp32
    [L, G, n] (sinks 0)."""
    n, L = context.shape[1], model.config.num_hidden_layers
    G = model.config.num_key_value_heads
    heads = model.config.num_attention_heads // G
    encode = lambda text: torch.tensor(tok(text)["input_ids"])
    full = DynamicCache(config=model.config)
    scores = torch.zeros(L, G, n)
    inputs = {}
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda m, args, kwargs, l=l: inputs.__setitem__(l, kwargs["hidden_states"][0]), with_kwargs=True)
        for l, layer in enumerate(model.model.layers)]
    implementation = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(context, use_cache=True, **{CACHE_ARG: full})
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                head = encode("\n\nRepeat the previous context exactly.") if start == 0 else torch.cat(
                    [encode("\n\nRepeat the part of the previous context exactly, starting with"),
                     context[0, max(0, start - 8):start]])
                ids_ = torch.cat([head, encode("\n"), context[0, start:stop]])[None]
                pos = torch.arange(n, n + ids_.shape[1])[None]
                pass_cache = copy.deepcopy(full)
                out = model(ids_, position_ids=pos, use_cache=True, output_attentions=True,
                            **{CACHE_ARG: pass_cache})
                subset = torch.cat([torch.arange(min(sinks, start)), torch.arange(start, stop)])
                for l, P in enumerate(out.attentions):  # [1, H, q, n + q]
                    kept = torch.cat([P[0][..., subset], P[0][..., n:]], -1)
                    p = kept[..., :len(subset)] / kept.sum(-1, keepdim=True)  # [H, q, s]
                    if plus:
                        attn = model.model.layers[l].self_attn
                        values = pass_cache.layers[l].values[0][:, subset]  # [G, s, Dv]
                        Dv = values.shape[-1]
                        Wo = attn.o_proj.weight.T.reshape(G, heads, Dv, -1)  # [G, g, Dv, d]
                        out_norm = torch.einsum("gjde,gsd->gjse", Wo, values).norm(dim=-1)  # [G, g, s]
                        p = p / inputs[l].norm(dim=-1)[None, :, None] * out_norm.reshape(G * heads, 1, -1)
                    best = p.view(G, heads, *p.shape[1:]).amax(dim=(1, 2))  # [G, s]
                    scores[l][:, subset] = torch.maximum(scores[l][:, subset], best)
    finally:
        model.set_attn_implementation(implementation)
        for hook in hooks:
            hook.remove()
    scores[..., :sinks] = 0
    return scores


@pytest.mark.parametrize("fused", [True, False])  # scores from the attention's softmax or apart
@pytest.mark.parametrize("chunk", [32, 128])  # three passes; one
def test_kvzip_plus_scores_are_kvpress_rule(tiny, chunk, fused, monkeypatch):
    """KVzip+ (``kvzip(plus=True)``): the passes' probabilities weighted by each key's
    output norm through its query head's o_proj columns over the query's input norm."""
    monkeypatch.setattr(reconstruction, "BLOCK_ELEMENTS", 4 * 24 * 160)
    if not fused:
        monkeypatch.setattr(reconstruction.PassObserver, "fuses", staticmethod(lambda *_: False))
    context = ids(70, 9)
    policy = get_policy("kvzip", tokenizer=CharTokenizer(), chunk=chunk, plus=True)
    got = compressed_stats(tiny, context, policy, 0.3).attn[:, 0, :, 4:70]
    want = kvzip_reference(tiny, context, CharTokenizer(), chunk, plus=True)[..., 4:]
    plain = kvzip_reference(tiny, context, CharTokenizer(), chunk)[..., 4:]
    assert want.min() > 0 and not torch.allclose(want, plain, rtol=0.1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kvzip_plus_refuses_a_model_without_o_proj(tiny):
    model = copy.deepcopy(tiny)
    attn = model.model.layers[1].self_attn
    attn.out_proj = attn.o_proj
    del attn.o_proj
    with pytest.raises(ValueError, match=r"kvzip\(plus=True\).*no linear o_proj"):
        kvpolicy.compress(model, ids(20, 1), "kvzip", 0.5, tokenizer=CharTokenizer(), plus=True)
    with pytest.raises(TypeError, match="plus must be a bool"):
        get_policy("kvzip", tokenizer=CharTokenizer(), plus=1)


@pytest.mark.parametrize("fused", [True, False])  # scores from the attention's softmax or apart
@pytest.mark.parametrize("chunk", [32, 128])  # three passes; one
def test_kvzip_scores_are_the_reconstruction_rule(tiny, chunk, fused, monkeypatch):
    monkeypatch.setattr(reconstruction, "BLOCK_ELEMENTS", 4 * 24 * 160)  # blocks of ~24 queries
    if not fused:
        monkeypatch.setattr(reconstruction.PassObserver, "fuses", staticmethod(lambda *_: False))
    context = ids(70, 8)
    policy = get_policy("kvzip", tokenizer=CharTokenizer(), chunk=chunk)
    stats = compressed_stats(tiny, context, policy, 0.3)
    got = stats.attn[:, 0, :, 4:70]
    want = kvzip_reference(tiny, context, CharTokenizer(), chunk)[..., 4:]
    assert want.min() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_kvzip_scores_under_softcapping_are_the_reconstruction_rule():
    """Gemma2's tanh-capped logits through the fused softmax: its full-attention layer 1,
    the one layer planned (layers 0 and 2 slide over 16 tokens and keep them)."""
    model = build("gemma2")
    for layer in model.model.layers:  # a cap the tiny model's logits reach
        layer.self_attn.attn_logit_softcapping = 0.02
    context = ids(70, 8)
    stats = compressed_stats(model, context, get_policy("kvzip", tokenizer=CharTokenizer(), chunk=32),
                             0.3)
    want = kvzip_reference(model, context, CharTokenizer(), 32)[1, :, 4:]
    assert stats.attn.shape[0] == 1
    torch.testing.assert_close(stats.attn[0, 0, :, 4:70], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("min_share", [0.0, 0.5])
def test_kvzip_per_layer_allocation_is_the_global_top_k(min_share):
    """kvzip with per_head=False. Brute force: among all layer counts within [lo, N]
    summing to the total, the chosen one keeps the largest sum of per-rank head-mean scores
    (protected first); lo is the floor, or with ``min_share`` that share of an equal split
    if larger."""
    import itertools

    s = random_stats(L=3, B=1, G=2, N=7)
    s.attn = s.attn ** torch.tensor([1.0, 3.0, 0.3])[:, None, None, None]  # layers differ
    policy = with_per_head(get_policy("kvzip", sinks=1, min_share=min_share), False)
    floor, N = policy.floor(s), s.num_tokens
    key = s.attn.masked_fill(policy.protected(s)[None, :, None], 1e9)
    ranked = key.sort(-1, descending=True).values.mean(dim=(1, 2)).double()  # [L, N]
    for total in range(floor * 3, N * 3 + 1):
        lo = max(floor, int(min_share * total / 3))
        best = max((c for c in itertools.product(range(lo, N + 1), repeat=3) if sum(c) == total),
                   key=lambda c: sum(float(ranked[l, :k].sum()) for l, k in enumerate(c)))
        got = policy.allocate(s, total, floor)
        assert sum(float(ranked[l, :k].sum()) for l, k in enumerate(got.tolist())) == \
            pytest.approx(sum(float(ranked[l, :k].sum()) for l, k in enumerate(best)))


@pytest.mark.parametrize("min_share", [0.5, 1.0])
def test_kvzip_floor_gives_every_head_its_share_then_the_global_top_k(min_share):
    """kvzip_floor: every KV head of every layer keeps at least ``min_share`` of an equal
    split, the entries sum to total x G, and the rest is KVzip's head-level selection with
    that floor (kvpolicy.heads.global_heads); at 1.0 every head keeps the equal split."""
    s = random_stats(L=3, B=1, G=2, N=30)
    s.attn = s.attn ** torch.tensor([1.0, 6.0, 0.2])[:, None, None, None]  # layers differ
    policy = get_policy("kvzip_floor", tokenizer=CharTokenizer(), min_share=min_share)
    paper = get_policy("kvzip", tokenizer=CharTokenizer())  # the paper's head-level selection
    floor, starved = policy.floor(s), 0
    for total in range(floor * 3, 30 * 3 + 1, 7):
        share = max(floor, int(min_share * total / 3))
        got = policy.allocate(s, total, floor)  # [L, B, G]
        assert got.shape == (3, 1, 2) and int(got.sum()) == total * 2
        assert (got >= share).all()
        want = global_heads(policy.score(s), total, share, policy.protected(s), s.valid)
        assert torch.equal(got, want)
        starved += int((paper.allocate(s, total, paper.floor(s)) < share).any())
    assert starved  # without the floor some head keeps less than its share


def kept_entries(layer, n: int) -> list[tuple[int, int]]:
    """Sorted (KV head, position) of the context tokens (positions < n) a closed layer of
    batch row 0 holds, in the flat per-head layout or one row shared by the heads."""
    pos = layer.pos[0, 0]
    heads = layer.slot_heads[0].tolist() if layer.flat else None
    return sorted((h, int(p)) for i, p in enumerate(pos) if 0 <= p < n
                  for h in ([heads[i]] if heads is not None else range(layer.kv_heads)))


@pytest.mark.parametrize("name", ["kvzip", "kvzip_floor"])
def test_kvzip_plans_per_head_unless_told_otherwise(tiny, name):
    """The paper's head-level selection by default (per_head=None), one count per layer
    with per_head=False or kvzip(layerwise=True); the plan and the layout follow."""
    context, tok = ids(40, 3), CharTokenizer()
    cases = [({}, None, True), ({}, True, True), ({}, False, False)]
    if name == "kvzip":
        cases += [({"layerwise": True}, None, False), ({"layerwise": True}, True, True)]
    with torch.no_grad():
        for params, per_head, want in cases:
            cache = kvpolicy.compress(tiny, context, name, 0.3, tokenizer=tok, per_head=per_head,
                                      **params)
            assert cache.policy.per_head is want, (params, per_head)
            assert (cache.plan.counts is not None) is want
            assert all(layer.flat is want for layer in cache.layers)
    kvpolicy.detach(tiny)


@pytest.mark.parametrize("name, default", [("kvzip", 0), ("kvzip_floor", 8)])
def test_kvzip_window_keeps_the_contexts_last_tokens_in_every_head(tiny, name, default):
    """``window=W`` protects the context's last W tokens as the sinks are protected: every
    KV head of every layer keeps them, with the whole context compressed at once and under
    ``chunk_size`` (the last chunk's plan protects the context's last W); without it some
    head drops the last token. kvzip's default is the paper's 0, kvzip_floor's 8."""
    context, tok, n = ids(60, 4), CharTokenizer(), 60
    assert get_policy(name, tokenizer=tok).window == default
    with torch.no_grad():
        for chunk_size in (None, 16):
            cache = kvpolicy.compress(tiny, context, name, 0.2, tokenizer=tok, window=6,
                                      chunk_size=chunk_size)
            for layer in cache.layers:
                kept = kept_entries(layer, n)
                for head in range(layer.kv_heads):
                    assert {p for h, p in kept if h == head} >= {0, 1, 2, 3, *range(n - 6, n)}
            zero = kvpolicy.compress(tiny, context, name, 0.2, tokenizer=tok, window=0,
                                     chunk_size=chunk_size)
            assert any(not {(h, n - 1) for h in range(layer.kv_heads)} <= set(kept_entries(layer, n))
                       for layer in zero.layers)  # without the window some head drops the last
    kvpolicy.detach(tiny)


@pytest.mark.parametrize("per_head", [None, False])
def test_kvzip_under_generate_keeps_what_compress_keeps(tiny, per_head):
    """The passes run after generate's prefill too, before the first decode step, with
    the paper's head-level selection (the default) and per layer."""
    context, tok = ids(60, 9), CharTokenizer()
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, context, "kvzip", 0.3, tokenizer=tok, per_head=per_head)
        want = [kept_entries(layer, 60) for layer in cache.layers]
        with kvpolicy.apply(tiny, "kvzip", 0.3, tokenizer=tok, per_head=per_head):
            res = tiny.generate(context, max_new_tokens=NEW, do_sample=False,
                                return_dict_in_generate=True)
    kvpolicy.detach(tiny)
    layers = res.past_key_values.layers
    assert all(layer.flat == (per_head is None) for layer in layers)
    got = [kept_entries(layer, 60) for layer in layers]
    assert got == want and sum(map(len, got)) == round(0.3 * 60 * 3) * layers[0].kv_heads


def test_kvzip_copies_the_context_once(tiny, monkeypatch):
    """Without chunk_size compress holds the context without copying it: no compaction
    until the passes (of kvzip's ``chunk`` tokens) have scored it, one in all, and a pass's
    tokens are attended, never stored (each layer holds only the context while the pass
    attends)."""
    compactions, held = [], []
    real_compact = cache_module.compact_layers_into
    real_attend = reconstruction.PassObserver.attend

    def compact(*args, **kwargs):
        compactions.append(1)
        return real_compact(*args, **kwargs)

    def attend(self, layer_idx, layer, module, query, key, *args):
        held.append((layer.keys.shape[2], key.shape[2] - query.shape[2]))
        return real_attend(self, layer_idx, layer, module, query, key, *args)

    monkeypatch.setattr(cache_module, "compact_layers_into", compact)
    monkeypatch.setattr(reconstruction.PassObserver, "attend", attend)
    with torch.no_grad():
        kvpolicy.compress(tiny, ids(8, 3), "snapkv", 0.5)  # attaching probes the model once
        compactions.clear()
        cache = kvpolicy.compress(tiny, ids(70, 3), "kvzip", 0.3, chunk=16,
                                  tokenizer=CharTokenizer())
    assert len(compactions) == 1
    assert len(held) == 5 * 3 and all(own == context == 70 for own, context in held)
    kvpolicy.detach(tiny)
    kept = sum(len(kept_entries(layer, 70)) for layer in cache.layers)
    assert kept == round(0.3 * 70 * 3) * cache.layers[0].kv_heads


@pytest.mark.parametrize("per_head", [None, False])
def test_kvzip_with_chunk_size_scores_and_compacts_each_chunk(tiny, per_head, monkeypatch):
    """compress(chunk_size=C): one pass per chunk once it is read, attending what earlier
    chunks kept (budget x the tokens seen before it, in every layer and head) and the
    chunk, then a compaction planned on a score for every entry held (earlier chunks'
    entries keep the one their own pass gave them). A chunk_size past the context is the
    whole-context rule."""
    context, tok, L = ids(70, 4), CharTokenizer(), tiny.config.num_hidden_layers
    G, passes = tiny.config.num_key_value_heads, []
    real_attend = reconstruction.PassObserver.attend

    def attend(self, layer_idx, layer, module, query, key, *args):
        pos = layer.pos[0, :, :key.shape[2] - query.shape[2]]
        passes.append((self.start, int(((pos >= 0) & (pos < self.start)).sum()) * (G // pos.shape[0]),
                       int(((pos >= self.start) & (pos < self.stop)).sum()) * (G // pos.shape[0]),
                       layer.is_split))
        return real_attend(self, layer_idx, layer, module, query, key, *args)

    monkeypatch.setattr(reconstruction.PassObserver, "attend", attend)
    policy = with_per_head(get_policy("kvzip", tokenizer=tok), per_head is None)
    spy = Spy(policy)
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, context, policy, 0.3, chunk_size=16)
        chunked = list(passes)  # the chunked compress's passes
        whole = kvpolicy.compress(tiny, context, get_policy("kvzip", tokenizer=tok), 0.3,
                                  per_head=per_head is None)
        longer = kvpolicy.compress(tiny, context, get_policy("kvzip", tokenizer=tok), 0.3,
                                   per_head=per_head is None, chunk_size=100)
    kvpolicy.detach(tiny)
    starts = sorted({a for a, *_ in chunked})
    assert starts == [0, 16, 32, 48, 64] and len(chunked) == 5 * L
    for a in starts:
        earlier = sum(e for a2, e, _, _ in chunked if a2 == a)
        chunk = sum(c for a2, _, c, _ in chunked if a2 == a)
        assert earlier == round(0.3 * a * L) * G  # what the chunks before kept, in all
        assert chunk == (min(a + 16, 70) - a) * L * G
        assert all(split == (per_head is None and a > 0) for a2, _, _, split in chunked if a2 == a)
    assert len({id(stats) for stats in spy.seen}) == 5  # one plan a chunk
    kept = sum(len(kept_entries(layer, 70)) for layer in cache.layers)
    assert kept == round(0.3 * 70 * L) * G
    assert [kept_entries(a, 70) for a in longer.layers] == [kept_entries(b, 70) for b in whole.layers]
    final = spy.seen[-1]  # every entry held scored, by its own chunk's pass
    held = final.head_valid if final.head_valid is not None else final.valid[None, :, None]
    assert bool((final.attn[held.expand_as(final.attn)] > 0).all())


@pytest.fixture(scope="module", params=["llama", "gpt_oss"])
def with_sinks_or_not(request, tiny):
    """The tiny llama, and a tiny GPT-OSS whose full-attention layers add sink logits to
    the softmax (random sinks, so that they weigh)."""
    if request.param == "llama":
        return tiny
    model, gen = build("gpt_oss"), torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(generator=gen)
    return model


def test_kvzip_chunks_score_the_same_through_the_fused_and_the_separate_softmax(
        with_sinks_or_not, monkeypatch):
    """With chunk_size and per-head rows (each head holding its own earlier entries), the
    scores from the pass's own attentions equal those computed apart from the attention
    (the path of layers with sliding windows), plan after plan; in several blocks of
    queries; with and without sink logits."""
    monkeypatch.setattr(reconstruction, "BLOCK_ELEMENTS", 4 * 8 * 60)  # blocks of ~8 queries
    tiny, context, tok = with_sinks_or_not, ids(70, 5), CharTokenizer()
    seen = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(reconstruction.PassObserver, "fuses", staticmethod(lambda *_: False))
        policy = get_policy("kvzip", tokenizer=tok)
        spy = Spy(policy)
        with torch.no_grad():
            cache = kvpolicy.compress(tiny, context, policy, 0.3, chunk_size=16)
        kvpolicy.detach(tiny)
        plans = list({id(s): s for s in spy.seen}.values())  # score runs twice a plan
        seen.append(([s.attn for s in plans], [kept_entries(l, 70) for l in cache.layers]))
    (fused_attn, fused_kept), (apart_attn, apart_kept) = seen
    assert len(fused_attn) == 5 and fused_kept == apart_kept
    for a, b in zip(fused_attn, apart_attn):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_kvzip_pass_attention_is_the_models_in_every_block(with_sinks_or_not, monkeypatch):
    """The fused pass's attention output (what the pass's later layers read) equals the
    model's attention over the same keys (with its sink logits, where it has them), in
    every block of queries, where per-head rows leave masked slots between the sinks and
    the chunk (chunk_size, per head)."""
    monkeypatch.setattr(reconstruction, "BLOCK_ELEMENTS", 4 * 8 * 60)  # blocks of ~8 queries
    fused, calls, tiny = reconstruction.PassObserver.attend_and_observe, [], with_sinks_or_not

    def checked(self, layer_idx, layer, module, scored, query, key, value, scaling, softcap, sinks):
        out = fused(self, layer_idx, layer, module, scored, query, key, value, scaling, softcap,
                    sinks)
        visible = self.mask(layer, key.shape[2] - query.shape[2])
        masked = not bool(visible[..., :key.shape[2] - query.shape[2]].all())
        calls.append((masked, sinks is not None,
                      (out - attention.attend(module, query, key, value, visible, scaling,
                                              softcap, sinks)).abs().max()))
        return out

    monkeypatch.setattr(reconstruction.PassObserver, "attend_and_observe", checked)
    with torch.no_grad():
        kvpolicy.compress(tiny, ids(70, 5), get_policy("kvzip", tokenizer=CharTokenizer()), 0.3,
                          chunk_size=16)
    kvpolicy.detach(tiny)
    assert any(masked for masked, _, _ in calls)
    assert all(sinks == hasattr(tiny.model.layers[0].self_attn, "sinks") for _, sinks, _ in calls)
    assert max(float(err) for _, _, err in calls) < 1e-5


def test_expected_attention_refuses_a_rotary_it_cannot_undo():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).eval()
    with pytest.raises(Exception, match="expected_attention reads the pre-RoPE queries"):
        kvpolicy.compress(model, torch.ones(1, 8, dtype=torch.long), "expected_attention", 0.5)


@pytest.mark.parametrize("name", ["keydiff", "kvzip", "expected_attention"])
def test_an_engine_missing_an_input_is_refused_by_name(name):
    """An engine that plans a row without what the policy asks for (the vLLM plugin today)
    gets an error naming it, not a plan from zeros."""
    from kvpolicy.pipeline import plan_row

    s = random_stats(B=1)
    with pytest.raises(ValueError, match=f"kvpolicy {name} needs .*(keys|reconstruction)"):
        plan_row(get_policy(name), Budget(0.5), s.attn, queries=s.queries, valid=s.valid,
                 heads_per_group=2)


def test_kvzip_refuses_what_it_cannot_serve(tiny):
    with pytest.raises(ValueError, match=r"kvzip\(tokenizer=\.\.\.\)"):
        kvpolicy.apply(tiny, "kvzip", 0.5)
    with pytest.raises(ValueError, match="batch of one"):
        kvpolicy.compress(tiny, torch.cat([ids(20, 1), ids(20, 2)]), "kvzip", 0.5,
                          tokenizer=CharTokenizer())
    kvpolicy.detach(tiny)


def pre_rope_queries(model, prompt):
    """Per layer the queries [H, N, D] before the rotary (q_proj's output), by forward hooks."""
    out, hooks = [], []
    H, D = model.config.num_attention_heads, model.config.head_dim
    for layer in model.model.layers:
        hooks.append(layer.self_attn.q_proj.register_forward_hook(
            lambda m, a, y: out.append(y[0].view(-1, H, D).transpose(0, 1))))
    try:
        with torch.no_grad():
            cache = DynamicCache(config=model.config)
            model(prompt, use_cache=True, **{CACHE_ARG: cache})
    finally:
        for h in hooks:
            h.remove()
    return out, cache


def test_expected_attention_score_is_kvpress_rule(tiny):
    """kvpress ExpectedAttentionPress: mean / covariance of the pre-RoPE queries after the
    4 sinks, R = mean of the rotary matrices at positions n .. n + 511, z = (R mu).k/sqrt(d)
    + k.(R S R^T).k/(2d) per query head, softmax over the non-sink keys, mean over the
    group, x ||v||."""
    prompt = ids(40, 6)
    policy = get_policy("expected_attention")
    got = policy.score(compressed_stats(tiny, prompt, policy, 0.5))[:, 0]  # [L, G, N]
    queries, cache = pre_rope_queries(tiny, prompt)
    n, D, g = 40, tiny.config.head_dim, 2
    cos, sin = tiny.model.rotary_emb(torch.zeros(1), position_ids=torch.arange(n, n + 512)[None])
    half = D // 2
    for l, (q, layer) in enumerate(zip(queries, cache.layers)):
        q = q[:, 4:].double()
        mu = q.mean(1)  # [H, D]
        sigma = torch.einsum("hnd,hne->hde", q - mu[:, None], q - mu[:, None]) / q.shape[1]
        rotations = []
        for c, s_ in zip(cos[0].double(), sin[0].double()):
            P = torch.zeros(D, D, dtype=torch.float64)
            P[:half, half:] = -torch.eye(half)
            P[half:, :half] = torch.eye(half)
            rotations.append(torch.diag(c) + torch.diag(s_) @ P)
        R = torch.stack(rotations).mean(0)
        keys, values = layer.keys[0].double(), layer.values[0].double()  # [G, N, D]
        for h in range(q.shape[0]):
            k = keys[h // g, 4:]
            m, S = R @ mu[h], R @ sigma[h] @ R.T
            z = k @ m / D ** 0.5 + torch.einsum("nd,de,ne->n", k, S, k) / (2 * D)
            p = torch.softmax(z, 0)
            if h % g == 0:
                total = torch.zeros_like(p)
            total += p / g
            if h % g == g - 1:
                want = total * values[h // g, 4:].norm(dim=-1)
                torch.testing.assert_close(got[l, h // g, 4:].double(), want, rtol=1e-4, atol=1e-6)


def test_tova_compiled_decode_is_one_graph_and_eager_tokens(tiny):
    from torch._dynamo.utils import counters

    prompt = ids(40, 4)
    with torch.no_grad():
        with kvpolicy.apply(tiny, "tova", 12):
            eager = tiny.generate(prompt, max_new_tokens=20, do_sample=False)
        torch._dynamo.reset()
        counters.clear()
        with kvpolicy.apply(tiny, "tova", 12, compile=True), \
                torch._dynamo.config.patch(error_on_recompile=True):
            out = tiny.generate(prompt, max_new_tokens=20, do_sample=False)
    assert (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) == (1, 0)
    assert torch.equal(out, eager)


# ---- the observation -----------------------------------------------------------------------
class Spy:
    """Wraps a policy's score to record the Stats it is given."""

    def __init__(self, policy):
        self.seen, self.score = [], policy.score
        policy.score = self

    def __call__(self, stats):
        self.seen.append(stats)
        return self.score(stats)


def prefilled_stats(model, prompt, policy, budget, chunk: int | None):
    """The Stats ``policy`` was planned with when generate's prefill (in chunks of
    ``chunk`` tokens) compressed ``prompt``."""
    spy = Spy(policy)
    with torch.no_grad(), kvpolicy.apply(model, policy, budget):
        model.generate(prompt, max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk)
    return spy.seen[0]


def test_kvzip_question_needs_the_whole_prompt_in_compress(tiny):
    with pytest.raises(ValueError, match="question=.*compress without chunk_size"):
        kvpolicy.compress(tiny, ids(40, 1), "kvzip", 0.3, tokenizer=CharTokenizer(), question=4,
                          chunk_size=16)


def compressed_stats(model, prompt, policy, budget, **compress_kwargs):
    """The Stats ``policy`` was planned with when ``kvpolicy.compress`` compressed ``prompt``."""
    spy = Spy(policy)
    with torch.no_grad():
        kvpolicy.compress(model, prompt, policy, budget, **compress_kwargs)
    kvpolicy.detach(model)
    return spy.seen[0]


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
    check_policy(lambda: get_policy(name, **PARAMS.get(name, {})), examples=40,
                 monotone=name not in NOT_MONOTONE, equivariant=False)


def test_invariants_with_the_question_counted():
    check_policy(lambda: get_policy("kvzip", question=8, **PARAMS["kvzip"]), examples=40,
                 equivariant=False)


@pytest.mark.parametrize("name", AGNOSTIC)
def test_budget_one_is_token_identical(tiny, name):
    prompt = ids(60, 2)
    with torch.no_grad():
        want = tiny.generate(prompt, max_new_tokens=NEW, do_sample=False)
        with kvpolicy.apply(tiny, name, 1.0, **PARAMS.get(name, {})):
            got = tiny.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", AGNOSTIC)
def test_compress_then_ask(tiny, name):
    document, question = ids(90, 1), ids(12, 5)
    with torch.no_grad():
        cache = kvpolicy.compress(tiny, document, name, 0.3, chunk_size=32, max_new_tokens=NEW,
                                  **PARAMS.get(name, {}))
        kept = cache.kept  # per layer (a per-head plan: the mean over its heads)
        out = tiny.generate(torch.cat([document, question], -1), max_new_tokens=NEW,
                            do_sample=False, **{CACHE_ARG: cache.copy()})
    kvpolicy.detach(tiny)
    assert 0 < sum(kept) <= round(0.3 * (90 + NEW) * 3)  # fixed-size policies hold new tokens too
    assert out.shape == (1, 90 + 12 + NEW)


def prompt_window_reference(model, context, window: int) -> torch.Tensor:
    """The attention the last ``window`` tokens of ``context`` give every key in the
    unpatched eager model, summed over them and each KV group's query heads: fp32 [L, G, n]."""
    G = model.config.num_key_value_heads
    return torch.stack([P[:, -window:].sum(1).unflatten(0, (G, -1)).sum(1)
                        for P in eager_attention(model, context)])


@pytest.mark.parametrize("chunk", [None, 16])  # whole; generate's prefill in 5 chunks, the last of 6
def test_kvzip_question_counts_the_prompts_last_tokens(tiny, chunk):
    """question=Q: the first prompt's last Q queries (of its last chunk) are observed as a
    window policy's are, beside the passes' max; a key scores the larger of the two."""
    context = ids(70, 8)
    policy = get_policy("kvzip", tokenizer=CharTokenizer(), question=10)
    stats = prefilled_stats(tiny, context, policy, 0.3, chunk)
    want = prompt_window_reference(tiny, context, 10 if chunk is None else 6)
    torch.testing.assert_close(stats.prompt_attn[:, 0], want, rtol=1e-4, atol=1e-6)
    assert torch.equal(policy.score(stats), torch.maximum(stats.attn, stats.prompt_attn))
    plain = prefilled_stats(tiny, context, get_policy("kvzip", tokenizer=CharTokenizer()), 0.3,
                            chunk)
    assert plain.prompt_attn is None and torch.equal(plain.attn, stats.attn)
