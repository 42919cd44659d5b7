"""Each built-in policy against numbers worked out by hand from the authors' code (the
formulas are quoted in the comments), on toy inputs; docs/policies.md states the rules."""
from __future__ import annotations

import json
import logging

import pytest
import torch

import kvpolicy
from kvpolicy import Budget, Stats, get_policy
from kvpolicy.policies import PrefixKV, PyramidKV, calibrate
from kvpolicy.policies.prefixkv import Calibration


def flat_stats(L: int, N: int, G: int = 1, attn: torch.Tensor | None = None, **kw) -> Stats:
    """Stats of one unpadded prompt; attn float32 [L, 1, G, N] (random when None)."""
    attn = torch.rand(L, 1, G, N, generator=torch.Generator().manual_seed(0)) if attn is None else attn
    ones = torch.ones(1, N, dtype=torch.bool)
    return Stats(attn=attn, queries=ones, valid=ones.clone(), **kw)


# ---- PyramidKV (KVCache-Factory pyramidkv_utils.py, PyramidKVCluster.update_kv) -------------
# c = max_capacity_prompt - window; min_num = c // beta; max_num = 2c - min_num;
# if max_num >= N - window: max_num = N - window, min_num = 2c - max_num;
# steps = (max_num - min_num) // (L - 1); layer l keeps max_num - l * steps selected + window.

def test_pyramidkv_authors_example_in_exact_arithmetic():
    # L = 30, N = 1000, 100 per layer, window 32, beta 20: c = 68.
    # Authors (integer division): min 68 // 20 = 3, max 136 - 3 = 133, steps 130 // 29 = 4,
    # layer l keeps 133 - 4 l + 32 = 165 - 4 l: 165 ... 49, 3,210 tokens for a 3,000 budget.
    authors = [165 - 4 * l for l in range(30)]
    assert sum(authors) == 3210
    # Exact: min 68 / 20 = 3.4, max 136 - 3.4 = 132.6: layer l keeps 164.6 - l * 129.2 / 29,
    # from 164.6 down to 35.4, summing to 30 * (164.6 + 35.4) / 2 = 3,000.
    exact = [164.6 - l * 129.2 / 29 for l in range(30)]
    n = PyramidKV(window=32, beta=20).allocate(flat_stats(30, 1000), 3000, 32)
    assert int(n.sum()) == 3000
    assert max(abs(a - b) for a, b in zip(n.tolist(), exact)) < 1
    assert n[0] == 165 and n[-1] == 35


@pytest.mark.parametrize("L, N, avg, window, beta, expected", [
    # c = 16: min 16 // 4 = 4, max 32 - 4 = 28 < N - w = 96, steps 24 // 4 = 6:
    # selected 28, 22, 16, 10, 4, plus the window 4.
    (5, 100, 20, 4, 4, [32, 26, 20, 14, 8]),
    # c = 16: min 4, max 28 >= N - w = 26, so max 26, min 32 - 26 = 6, steps 20 // 4 = 5:
    # selected 26, 21, 16, 11, 6, plus the window 8 (the first layer keeps all N = 34).
    (5, 34, 24, 8, 4, [34, 29, 24, 19, 14]),
])
def test_pyramidkv_matches_the_authors_when_their_division_is_exact(L, N, avg, window, beta,
                                                                     expected):
    n = PyramidKV(window=window, beta=beta).allocate(flat_stats(L, N), avg * L, window)
    assert n.tolist() == expected


def test_pyramidkv_deepest_layer_keeps_selected_tokens_at_low_budget():
    # avg 40, window 32: c = 8, the last layer keeps 32 + 8 / 20 = 32.4 -> 32, the first
    # 32 + 16 - 0.4 = 47.6; every layer above the last selects beyond the window.
    n = PyramidKV().allocate(flat_stats(30, 2000), 40 * 30, 32)
    assert int(n.sum()) == 1200 and n[0] == 48 and (n[:-2] > 32).all()


# ---- SnapKV pooling (SnapKV / KVCache-Factory: pool attn_weights[..., :-window] only) -------

def test_snapkv_pools_only_the_keys_before_the_window():
    # window 3, kernel 3: keys 7-9 are the window; pooling [1, 0, 0, 0, 0, 0, 0] gives
    # [1, 1, 0, 0, 0, 0, 0]: key 6 does not inherit the window's 9.
    attn = torch.tensor([1, 0, 0, 0, 0, 0, 0, 9, 9, 9], dtype=torch.float32).view(1, 1, 1, 10)
    scores = get_policy("snapkv", window=3, kernel=3).score(flat_stats(1, 10, attn=attn))
    assert scores[0, 0, 0, :7].tolist() == [1, 1, 0, 0, 0, 0, 0]
    assert scores[0, 0, 0, 7:].tolist() == [9, 9, 9]


# ---- VL-Cache (EffiVLM-Bench VlCacheKVCluster, head_adaptive=False) --------------------------

def vl_stats() -> Stats:
    """8 tokens, vision 0-5, post-vision 6-7; KV head 0 favours key 0, head 1 keys 1, 2."""
    attn = torch.tensor([[5, 0, 0, 1, 0, 0, 1, 1], [0, 4, 3, 1, 0, 0, 1, 1]], dtype=torch.float32)
    vision = torch.tensor([[True] * 6 + [False] * 2])
    return flat_stats(1, 8, G=2, attn=attn.view(1, 1, 2, 8), vision=vision)


def test_vlcache_keeps_one_token_set_from_scores_summed_over_heads():
    # Reference: importance summed over heads = [5, 4, 3, 2, 0, 0]; sorted, the top 2 are
    # keys 0 and 1, kept in every head, with the post-vision keys 6, 7.
    s = vl_stats()
    policy = get_policy("vlcache")
    keep = policy.evict(policy.score(s), torch.tensor([4]), s)[0]
    assert keep[0].tolist() == [[0, 1, 6, 7], [0, 1, 6, 7]]
    per_head = get_policy("vlcache", shared_heads=False)
    keep = per_head.evict(per_head.score(s), torch.tensor([4]), s)[0]
    assert keep[0].tolist() == [[0, 3, 6, 7], [1, 2, 6, 7]]


def test_vlcache_warns_when_post_vision_tokens_fill_the_budget(caplog):
    # 30 post-vision tokens (+ 1 scored) per layer cannot fit 20 per layer: every layer
    # keeps exactly those 31, the density allocation cannot act, and plan says so.
    N, L = 100, 4
    vision = torch.zeros(1, N, dtype=torch.bool)
    vision[0, :70] = True
    s = flat_stats(L, N, vision=vision, below=torch.zeros(L, 1, 1))
    with caplog.at_level(logging.WARNING, logger="kvpolicy"):
        plan = get_policy("vlcache").plan(s, Budget(20))
    assert plan.kept == [31] * L and "cannot hold the 31 protected" in caplog.text


def tiny_llama(max_positions: int = 512):
    """A random-weight 2-layer Llama (text only), float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=max_positions)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("policy", ["vlcache", "uniform-vlcache"])
def test_vlcache_int_budget_below_a_text_models_post_vision_span_is_refused_at_apply(policy):
    # a text model's post-vision queries are its last 8 prompt tokens: 8 protected + 1 scored
    model = tiny_llama()
    attn = model.config._attn_implementation
    params = dict(scores="vlcache") if policy == "uniform-vlcache" else {}
    with pytest.raises(ValueError, match=r"cannot hold the 9 protected tokens .*last 8 tokens"):
        kvpolicy.apply(model, policy.split("-")[0], 8, **params)
    assert model.config._attn_implementation == attn and not hasattr(model, "_kvpolicy_handle")
    kvpolicy.apply(model, policy.split("-")[0], 9, **params).remove()


def test_vlcache_int_budget_below_a_prompts_post_vision_span_is_refused_before_the_forward():
    import tiny_vlms

    model, inputs = tiny_vlms.llava()  # 5 text tokens, 16 image tokens, 12 text tokens
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with kvpolicy.apply(model, "vlcache", 12):  # a VLM's span is known per prompt only
        with pytest.raises(ValueError, match=r"cannot hold the 13 protected .*last vision token"):
            model.generate(**inputs, max_new_tokens=2, do_sample=False)
        assert not forwards
        with pytest.raises(ValueError, match="cannot hold the 13 protected"):
            kvpolicy.compress(model, inputs["input_ids"], "vlcache", 12)
        assert not forwards
    with kvpolicy.apply(model, "vlcache", 13), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
    assert out.past_key_values.kept == [13] * model.config.text_config.num_hidden_layers


# ---- PrefixKV (THU-MIG/PrefixKV prefixkv.py) ----------------------------------------------

def prefix_stats() -> Stats:
    """Two layers, 8 tokens. Sorted importance (already normalised):
    layer 0: .6 .2 .1 .1 0 0 0 0  -> C = .6 .8 .9 1 ...
    layer 1: .3 .2 .2 .1 .1 .05 .05 0  -> C = .3 .5 .7 .8 .9 .95 1 1"""
    imp = torch.tensor([[.6, .2, .1, .1, 0, 0, 0, 0], [.3, .2, .2, .1, .1, .05, .05, 0]])
    return flat_stats(2, 8, attn=imp.view(2, 1, 1, 8))


@pytest.mark.parametrize("total, expected", [(8, [3, 5]), (9, [4, 5]), (10, [4, 6])])
def test_prefixkv_counts_protected_tokens_after_the_prefix(total, expected):
    # obtain_cdf_num: a layer at level p keeps searchsorted(C, p) + 1 prefix tokens, and
    # the protected ones (start_size + protect_size, here 1 + 1) come on top.
    # p in (.5, .6]: prefixes 1 and 3 -> 3 + 5 = 8; p in (.6, .7]: 2 and 3 -> 4 + 5 = 9;
    # p in (.7, .8]: 2 and 4 -> 4 + 6 = 10.
    policy = PrefixKV(sinks=1, window=1)
    s = prefix_stats()
    assert policy.allocate(s, total, policy.floor(s)).tolist() == expected


def test_prefixkv_calibrated_ratios_are_averaged_then_rescaled(tmp_path):
    # Two calibration prompts at totals 9 and 10 keep [4, 5] and [4, 6] of 8 tokens:
    # fractions [.5, .625] and [.5, .75], averaged [.5, .6875]. At use the total is split in
    # proportion: 10 -> 10 / 1.1875 = 8.42 per unit -> [4.2, 5.8] -> [4, 6]; 12 -> [5, 7].
    recorder = Calibration(sinks=1, window=1)
    for total in (9, 10):
        recorder.plan(prefix_stats(), Budget(total / 16))
    assert recorder.ratios_mean() == [0.5, 0.6875]
    path = tmp_path / "ratios.json"
    path.write_text(json.dumps(recorder.ratios_mean()))
    for ratios in (recorder.ratios_mean(), str(path)):
        policy = PrefixKV(sinks=1, window=1, ratios=ratios)
        s = prefix_stats()
        assert policy.allocate(s, 10, 3).tolist() == [4, 6]
        assert policy.allocate(s, 12, 3).tolist() == [5, 7]


def test_prefixkv_fixed_point_holds_ratio_of_prompt_plus_new_tokens():
    # The example: N = 600 at 0.1 with 200 new tokens. The reference ends at
    # 0.1 * 800 = 80 tokens per layer (not 60 + 200 = 260): the layers hold 80 on average.
    L, N, M = 4, 600, 200
    s = flat_stats(L, N, max_new_tokens=M)
    plan = PrefixKV(fixed_point=True).plan(s, Budget(0.1))
    prompt = PrefixKV().allocate(s, 240, PrefixKV().floor(s))  # the per-prompt search
    assert sum(plan.capacity) == 320 and plan.kept == plan.capacity
    ratio = torch.tensor(plan.capacity) / prompt  # each layer scaled by (N + M) / N
    assert (ratio - 800 / 600).abs().max() < 0.05


def reference_fixed_point(kept: list[int], new: list[int], capacity: int) -> list[int]:
    """The reference's decode loop: cache = kept positions; each step appends the token,
    and while the cache is over ``capacity`` drops index j = len(kept) - 25 (len(kept) // 2
    when that is < 1) - a fixed index, so the token at it changes."""
    j = len(kept) - 25 if len(kept) - 25 >= 1 else len(kept) // 2
    cache = list(kept)
    for pos in new:
        cache.append(pos)
        if len(cache) > capacity:
            del cache[j]
    return sorted(cache)


@pytest.mark.parametrize("size", [8, 12, 25, 29, 40])
def test_prefixkv_fixed_point_victims_are_the_references(size):
    # A full layer of ``size`` slots holding prompt positions 0, 3, 6, ... then 60 new tokens
    # written the way the cache does: into the slot of lowest victim_priority.
    policy = PrefixKV(fixed_point=True)
    kept = list(range(0, 3 * size, 3))
    positions = torch.tensor(kept).view(1, 1, size)
    new = list(range(3 * size, 3 * size + 60))
    for pos in new:
        victim = policy.victim_priority(torch.zeros(1, 1, size), positions,
                                        torch.tensor([pos]), size).argmin()
        positions[0, 0, victim] = pos
    assert sorted(positions.flatten().tolist()) == reference_fixed_point(kept, new, size)


@pytest.mark.parametrize("size", [6, 7, 26, 27, 28])
def test_prefixkv_fixed_point_keeps_the_sinks(size):
    # There the reference's j (3, 3, 1, 2, 3) is below start_size = 4 and would drop a sink.
    assert PrefixKV(fixed_point=True).frozen(size) == 4


# ---- uniform with another policy's scores -------------------------------------------------

@pytest.mark.parametrize("source", ["prefixkv", "vlcache", "snapkv", "pyramidkv", "spankv"])
def test_uniform_with_a_policys_scores_changes_only_the_allocation(source):
    s = flat_stats(4, 64, G=2, vision=torch.arange(64)[None] < 40, below=torch.rand(4, 1, 2))
    policy, uniform = get_policy(source), get_policy("uniform", scores=source)
    assert torch.equal(uniform.query_mask(s.valid, s.vision), policy.query_mask(s.valid, s.vision))
    assert torch.equal(uniform.score(s), policy.score(s)) and uniform.floor(s) == policy.floor(s)
    plan = uniform.plan(s, Budget(0.55))
    assert plan.kept == [36, 35, 35, 35]  # round(0.55 * 64 * 4) = 141, split equally
    expected = policy.evict(policy.score(s), torch.tensor(plan.kept), s)
    assert all(torch.equal(a, b) for a, b in zip(plan.keep, expected))


def test_uniform_refuses_fixed_size_sources():
    with pytest.raises(ValueError, match="fixed size"):
        get_policy("uniform", scores="h2o")


# ---- end to end -----------------------------------------------------------------------------

@pytest.mark.slow
def test_calibrate_on_the_embedded_model(smollm2):
    from kvpolicy.tools.embedded import chat_prompt

    model, tok = smollm2
    samples = [chat_prompt(tok, words, "Summarize.") for words in (120, 160)]
    ratios = calibrate(model, samples, budget=0.2)
    L = model.config.num_hidden_layers
    assert len(ratios) == L and all(0 < r <= 1 for r in ratios)
    assert abs(sum(ratios) / L - 0.2) < 0.01  # each prompt's search keeps 0.2 exactly
    with kvpolicy.apply(model, "prefixkv", budget=0.2, ratios=ratios), torch.no_grad():
        out = model.generate(**samples[0], max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True)
    kept = torch.tensor(out.past_key_values.kept, dtype=torch.float64)
    N = samples[0]["input_ids"].shape[1]
    assert int(kept.sum()) == round(0.2 * N * L)
    assert (kept / kept.sum() - torch.tensor(ratios) / sum(ratios)).abs().max() < 2 / kept.sum()
