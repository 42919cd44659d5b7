"""PolicyCache driven as the attention function drives it, on random tensors: compaction
(invariant 10) and decode-time eviction (invariant 9)."""
from types import SimpleNamespace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy import Budget, PolicyCache, get_policy

POLICIES = {
    "uniform": dict(window=2), "snapkv": dict(window=2, kernel=3), "pyramidkv": dict(window=2, kernel=3),
    "prefixkv": {}, "vlcache": {}, "h2o": {}, "streamingllm": {},
}


@st.composite
def prompts(draw, policies=tuple(POLICIES)):
    """(cache, q, k, v, valid): a random left-padded prompt pushed through a fresh cache's
    prefill. q [L, B, H, N, D], k/v [L, B, G, N, D], valid bool [B, N]."""
    name = draw(st.sampled_from(policies))
    L, B, G, g = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    N, D = draw(st.integers(8, 40)), 8
    pads = [0] + [draw(st.integers(0, N - 6)) for _ in range(B - 1)]
    valid = torch.arange(N)[None, :] >= torch.tensor(pads)[:, None]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    q = torch.randn(L, B, G * g, N, D, generator=gen)
    k, v = torch.randn(L, B, G, N, D, generator=gen), torch.randn(L, B, G, N, D, generator=gen)
    budget = Budget(draw(st.floats(0.05, 1.0)))
    cache = PolicyCache(L, get_policy(name, **POLICIES[name]), budget, draw(st.integers(0, 12)))
    prefill(cache, q, k, v, valid)
    return cache, q, k, v, valid


def prefill(cache, q, k, v, valid):
    """Drive one multi-token forward as the patched model does: begin it, each layer's
    update and attention, then end it (plan and compact). q [L, B, H, N, D], k/v [L, B, G,
    N, D]."""
    cache.begin_forward("test", [None] * len(cache.layers), valid, None, decode=False)
    for l, layer in enumerate(cache.layers):
        keys, values = layer.update(k[l], v[l])
        cache.attend(module(l, q.shape[2] // k.shape[2]), q[l], keys, values,
                     q.shape[-1] ** -0.5, None, None, None)
    cache.end_forward()


def module(l: int, groups: int):
    """What sdpa_attention_forward reads from an attention module."""
    return SimpleNamespace(layer_idx=l, is_causal=True, num_key_value_groups=groups)


@settings(max_examples=60, deadline=None)
@given(prompts(), st.integers(0, 2**31 - 1))
def test_compacted_attention_equals_masked_full_attention(prompt, seed):
    """Invariant 10: the kept rows are the gather of the full rows, and one query's
    attention over the compacted slots equals attention over the full prompt with every
    other key (and padding) masked out."""
    cache, q, k, v, valid = prompt
    B, G, N, D = k.shape[1:]
    H = q.shape[2]
    query = torch.randn(B, H, 1, D, generator=torch.Generator().manual_seed(seed))
    for l, (layer, keep) in enumerate(zip(cache.layers, cache.plan.keep)):
        n = keep.shape[-1]
        rows = keep[..., None].expand(B, G, n, D)
        assert torch.equal(layer.keys[:, :, :n], torch.gather(k[l], 2, rows))
        assert torch.equal(layer.values[:, :, :n], torch.gather(v[l], 2, rows))
        kept = torch.zeros(B, G, N, dtype=torch.bool).scatter_(2, keep, True) & valid[:, None]
        filler = torch.cat([torch.zeros_like(keep[..., :1], dtype=torch.bool),
                            keep[..., 1:] == keep[..., :-1]], -1)  # a shorter row's padding
        assert torch.equal(layer.pos[..., :n] >= 0, torch.gather(kept, 2, keep) & ~filler)
        expected = masked_attention(query, k[l], v[l], kept)
        scores_before = layer.scores.clone() if layer.kind == "evict" else None
        got, _ = layer.attend(query, D ** -0.5, None, None, None)
        torch.testing.assert_close(got.transpose(1, 2), expected, atol=1e-5, rtol=1e-5)
        if layer.kind == "evict":  # the same pass adds each slot's probabilities to its running score
            added = (layer.scores - scores_before).sum(-1)
            torch.testing.assert_close(added, torch.full((B, G), float(H // G)))


def masked_attention(query, key, value, allowed):
    """float64 reference: query [B, H, 1, D] over key/value [B, G, N, D] where allowed [B, G, N]."""
    g = query.shape[1] // key.shape[1]
    k, v = key.double().repeat_interleave(g, 1), value.double().repeat_interleave(g, 1)
    logits = query.double() @ k.transpose(-1, -2) * query.shape[-1] ** -0.5
    logits = logits.masked_fill(~allowed.repeat_interleave(g, 1)[:, :, None, :], -torch.inf)
    return (torch.softmax(logits, -1) @ v).float()


@settings(max_examples=60, deadline=None)
@given(prompts(policies=("h2o", "streamingllm")), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_decode_eviction_invariants(prompt, steps, seed):
    """Invariant 9 on the decode update alone, with random running scores: the layer never
    holds more than its fixed size, the newest token is always present, an evicted
    position never returns, sinks never leave, and the rest of the recent window stays."""
    cache, q, k, v, valid = prompt
    gen = torch.Generator().manual_seed(seed)
    policy = cache.policy
    for l, layer in enumerate(cache.layers):
        B, G, C, D = layer.keys.shape
        assert C == cache.plan.capacity[l]
        gone = [[set() for _ in range(G)] for _ in range(B)]
        sinks = [[held(layer, b, h) & set(range(policy.sinks)) for h in range(G)] for b in range(B)]
        for _ in range(steps):
            before = [[held(layer, b, h) for h in range(G)] for b in range(B)]
            layer.scores.copy_(torch.rand(B, G, C, generator=gen))
            newest = layer.next_pos.clone()
            layer.update(torch.randn(B, G, 1, D, generator=gen), torch.randn(B, G, 1, D, generator=gen))
            assert layer.keys.shape == (B, G, C, D)
            for b in range(B):
                for h in range(G):
                    now = held(layer, b, h)
                    assert int(newest[b]) in now
                    assert len(now) <= int(layer.sizes[b]) and not now & gone[b][h]
                    assert sinks[b][h] <= now
                    gone[b][h] |= before[b][h] - now
                    if policy.name == "h2o":  # the recent window is never the victim
                        size = int(layer.sizes[b])
                        recent = set(range(int(newest[b]) - policy.recent(size) + 1, int(newest[b]) + 1))
                        assert recent & before[b][h] <= now


def held(layer, b, h) -> set:
    """Positions a layer holds for sequence b, KV head h."""
    pos = layer.pos[b, h]
    return set(pos[pos >= 0].tolist())


def test_logical_length_and_bytes():
    cache = PolicyCache(2, get_policy("uniform", window=2), Budget(0.5), max_new_tokens=3)
    k = torch.randn(2, 1, 2, 10, 4)
    prefill(cache, torch.randn(2, 1, 2, 10, 4), k, k, torch.ones(1, 10, dtype=torch.bool))
    assert cache.kept == [5, 5] and int(cache.get_seq_length()) == 10
    for _ in range(3):
        for l in range(2):
            cache.layers[l].update(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert int(cache.get_seq_length()) == 13
    assert bool((cache.layers[0].pos >= 0).all())
    G, C, D = 2, 8, 4  # 5 kept + 3 new slots per layer
    # per layer K, V, slot positions, next position, next slot, length; the plan's indices
    assert cache.nbytes() == 2 * (2 * G * C * D * 4 + G * C * 8 + 8 + 8 + 8) + 2 * G * 5 * 8
