"""Per-head budgets (kvpolicy.heads, ``per_head=True``): the split and selection invariants
(hypothesis), the policy kit's per-head checks, and generate on the embedded SmolLM2:
exact at budget 1.0, the flat layout against the unflattened one, bytes that follow the
kept entries, chunked compress with a second turn, padded batches, compiled decode,
quantized rows (``bits``, ``kvpolicy.Memory``), and the refusals by name."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import kvpolicy
from kvpolicy import get_policy, models
from kvpolicy.memory import held_fraction
from kvpolicy.heads import SAFEGUARD, select_heads, split_heads, with_per_head
from kvpolicy.selection import edge_tokens
from kvpolicy.testing import check_policy
from kvpolicy.tools.embedded import chat_prompt
from kvpolicy.vllm.config import make_settings


@pytest.fixture(autouse=True)
def no_hooks_left(request):
    """``compress`` leaves its hooks on the shared model: take them off after each test,
    so that later modules find the model unpatched."""
    yield
    if "smollm2" in request.fixturenames:
        kvpolicy.detach(request.getfixturevalue("smollm2")[0])


@st.composite
def head_scores(draw):
    """(scores [L, B, G, N], n [L], protected [B, N], valid [B, N], head_valid or None)."""
    L, B, G, N = (draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 4)),
                  draw(st.integers(2, 40)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    pads = torch.tensor([0] + [draw(st.integers(0, N - 2)) for _ in range(B - 1)])
    valid = torch.arange(N)[None] >= pads[:, None]
    scores = torch.rand(L, B, G, N, generator=gen) ** draw(st.sampled_from([1, 8]))
    protected = edge_tokens(valid, draw(st.integers(0, 2)), draw(st.integers(0, 3)))
    n = torch.tensor([draw(st.integers(int(protected.sum(-1).max()) or 1, N)) for _ in range(L)])
    head_valid = None
    if draw(st.booleans()):  # heads holding different tokens (a continued per-head cache)
        head_valid = (torch.rand(L, B, G, N, generator=gen) < 0.7) & valid[None, :, None]
        head_valid |= protected[None, :, None]
    return scores, n, protected, valid, head_valid


@settings(max_examples=80, deadline=None)
@given(head_scores())
def test_split_heads_keeps_the_layer_total_and_every_heads_floor(case):
    scores, n, protected, valid, head_valid = case
    counts = split_heads(scores, n, protected, valid, head_valid)  # [L, B, G]
    L, B, G, N = scores.shape
    held = valid[None, :, None].expand(L, B, G, N) if head_valid is None else head_valid
    have = held.sum(-1)
    assert (counts <= have).all()
    assert torch.equal(counts.sum(-1), torch.minimum(n[:, None] * G, have.sum(-1)))
    floor = torch.maximum((protected[None, :, None] & held).sum(-1),
                          torch.minimum((n * SAFEGUARD).long()[:, None, None], have))
    assert (counts >= torch.minimum(floor, have)).all()
    more = split_heads(scores, n + 1, protected, valid, head_valid)
    assert (more.sum(-1) >= counts.sum(-1)).all()


@settings(max_examples=80, deadline=None)
@given(head_scores(), st.integers(0, 2**31 - 1))
def test_select_heads_takes_each_heads_top_counts(case, seed):
    scores, n, protected, valid, head_valid = case
    counts = split_heads(scores, n, protected, valid, head_valid)[0]  # [B, G]
    hv = None if head_valid is None else head_valid[0]
    keep = select_heads(scores[0], counts, protected, valid, hv)
    B, G, N = scores[0].shape
    held = valid[:, None].expand(B, G, N) if hv is None else hv
    for b in range(B):
        for g in range(G):
            own = keep[b, g, :int(counts[b, g])]
            assert (own[1:] > own[:-1]).all() and held[b, g, own].all()
            assert held[b, g][protected[b]].sum() == (protected[b][own]).sum()  # protected first
            rest = held[b, g] & ~protected[b]
            rest[own] = False
            chosen = own[~protected[b][own]]
            if len(chosen) and rest.any():  # nothing left behind scores above what was taken
                assert scores[0, b, g][rest].max() <= scores[0, b, g][chosen].min()


@pytest.mark.parametrize("name", ["snapkv", "pyramidkv", "kvzip", "keydiff", "expected_attention"])
def test_per_head_plans_hold_the_kits_invariants(name):
    check_policy(lambda: with_per_head(get_policy(name)), examples=25, equivariant=False)


@pytest.mark.parametrize("name, why", [("h2o", "evicts while decoding"),
                                       ("spankv", "its own rule"), ("uniform", "its own rule"),
                                       ("tova", "evicts while decoding")])
def test_refused_by_name(smollm2, name, why):
    model, _ = smollm2
    with pytest.raises(ValueError, match=f"per_head=True: {name} .*{why}"):
        kvpolicy.apply(model, name, 0.5, per_head=True)
    with pytest.raises(TypeError, match="per_head must be a bool"):
        kvpolicy.apply(model, "snapkv", 0.5, per_head=1)
    assert getattr(model, "_kvpolicy_handle", None) is None


def test_vllm_refuses_per_head_by_name():
    with pytest.raises(ValueError, match="kvpolicy.per_head: vLLM's paged blocks"):
        make_settings({"policy": "snapkv", "budget": 0.1, "per_head": True}, lambda k: f"kvpolicy.{k}")
    with pytest.raises(ValueError, match=r"per-head budgets \(per_head\)"):
        make_settings({"policy": with_per_head(get_policy("snapkv"))}, lambda k: f"kvpolicy.{k}")


@pytest.fixture(scope="module")
def prompt(long_prompt):
    """conftest's shared ~400-token prompt."""
    return long_prompt


def greedy(model, steps=12, **kwargs):
    with torch.no_grad():
        return model.generate(max_new_tokens=steps, do_sample=False, **kwargs)


@pytest.mark.parametrize("name", ["snapkv", "kvzip"])
def test_budget_one_equals_the_unpatched_model(smollm2, prompt, name):
    model, tok = smollm2
    ref = greedy(model, **prompt)
    extra = dict(tokenizer=tok) if name == "kvzip" else {}
    with kvpolicy.apply(model, name, 1.0, per_head=True, **extra):
        out = greedy(model, return_dict_in_generate=True, **prompt)
    assert torch.equal(out.sequences, ref)
    assert models.output_cache(out).layers[0].flat  # the per-head layout served it


def test_flat_decode_equals_the_unflattened_layout(smollm2, prompt):
    """The flat rows (head_attention) and the same rows unflattened per head (each head's
    slots, the rest empty, the dense decode path) give the same next-token logits."""
    model, _ = smollm2
    cache = kvpolicy.compress(model, prompt["input_ids"], "snapkv", 0.2, per_head=True)
    counts = torch.stack(cache.plan.counts)
    assert counts.float().std() > 0  # the heads do keep different counts
    dense = cache.copy()
    for layer in dense.layers:
        layer.expand()
        layer.grow(1)
    step = torch.tensor([[prompt["input_ids"][0, -1]]])
    with torch.no_grad():
        flat = model(step, **{models.CACHE_ARG: cache.copy()}).logits
        unflat = model(step, **{models.CACHE_ARG: dense}).logits
    torch.testing.assert_close(flat, unflat, rtol=1e-4, atol=1e-4)


def test_bytes_follow_the_kept_entries(smollm2, prompt):
    model, _ = smollm2
    cache = kvpolicy.compress(model, prompt["input_ids"], "snapkv", 0.2, per_head=True)
    entries = sum(int(c.sum()) for c in cache.plan.counts)
    layer = cache.layers[0]
    per_entry = layer.keys.shape[-1] * layer.keys.element_size() * 2
    kv = sum(l.keys.nbytes + l.values.nbytes for l in cache.layers)
    assert kv == entries * per_entry  # no decode region yet (max_new_tokens=0): the kept rows alone
    longest = sum(int(c.max()) * c.shape[1] for c in cache.plan.counts) * per_entry
    assert kv < longest  # a padded per-head layout would hold the longest head in every head


def test_chunked_compress_and_a_second_turn(smollm2, prompt):
    model, tok = smollm2
    ids = prompt["input_ids"]
    ask = tok.apply_chat_template([{"role": "user", "content": "And the main point?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    first = torch.cat([ids, ask["input_ids"]], -1)
    for budget in (1.0, 0.3):
        cache = kvpolicy.compress(model, ids, "snapkv", budget, per_head=True, chunk_size=96)
        out = greedy(model, input_ids=first, **{models.CACHE_ARG: cache})
        second = torch.cat([out, ask["input_ids"]], -1)
        again = greedy(model, steps=6, input_ids=second, **{models.CACHE_ARG: cache})
        assert cache.layers[0].flat and cache.plan.counts is not None
        if budget == 1.0:
            assert torch.equal(out, greedy(model, input_ids=first))
            assert torch.equal(again, greedy(model, steps=6, input_ids=second))


def test_padded_batch_rows_are_independent(smollm2):
    model, tok = smollm2
    texts = [chat_prompt(tok, w, "Summarize the text above in one sentence.") for w in (150, 220)]
    rows = [t["input_ids"][0] for t in texts]
    N = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(rows), N), pad)
    mask = torch.zeros(len(rows), N, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding
        ids[i, N - len(r):], mask[i, N - len(r):] = r, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    with kvpolicy.apply(model, "snapkv", 0.3, per_head=True):
        both = greedy(model, **batch)
        alone = [greedy(model, **t) for t in texts]
    for row, single in zip(both, alone):
        n = single.shape[1]
        assert torch.equal(row[-12:], single[0, n - 12:])


@pytest.mark.parametrize("bits", [16, 4])
def test_compiled_decode_is_one_graph(smollm2, prompt, bits):
    """Compiled decode over the flat rows (quantized at 4 bits): one graph, no graph break
    or recompile, eager's tokens."""
    model, _ = smollm2
    steps = dict(steps=24, min_new_tokens=24)
    with kvpolicy.apply(model, "snapkv", 0.3, per_head=True, bits=bits):
        eager = greedy(model, **steps, **prompt)
    torch._dynamo.reset()
    counters.clear()
    with kvpolicy.apply(model, "snapkv", 0.3, per_head=True, bits=bits, compile=True):
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = greedy(model, **steps, **prompt)
    assert (counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())) == (1, 0)
    assert torch.equal(out, eager)


def test_quantized_flat_rows_decode_as_their_dequantized_rows(smollm2, prompt):
    """bits=4 with per_head: the flat prompt rows are quantized (fewer bytes than 16 bits),
    and the next-token logits equal those of the same rows dequantized into the flat
    buffers."""
    model, _ = smollm2
    cache = kvpolicy.compress(model, prompt["input_ids"], "snapkv", 0.3, per_head=True, bits=4)
    wide = kvpolicy.compress(model, prompt["input_ids"], "snapkv", 0.3, per_head=True)
    assert all(layer.flat and layer.quantized is not None for layer in cache.layers)
    assert cache.nbytes() < 0.6 * wide.nbytes()
    plain = cache.copy()
    for layer in plain.layers:
        layer.unquantize()
        layer.grow(1)
    step = torch.tensor([[prompt["input_ids"][0, -1]]])
    with torch.no_grad():
        got = model(step, **{models.CACHE_ARG: cache.copy()}).logits
        want = model(step, **{models.CACHE_ARG: plain}).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_memory_budget_per_head_holds_its_bytes(smollm2, prompt):
    """Memory(0.1) with per_head: the rule counts each slot's KV head tag, and the prompt
    rows held stay within the fraction; generate continues over the quantized flat rows."""
    model, tok = smollm2
    ids = prompt["input_ids"]
    cache = kvpolicy.compress(model, ids, "snapkv", kvpolicy.Memory(0.1), per_head=True)
    assert cache.budget.bits < 16 and cache.layers[0].flat
    assert held_fraction(cache, ids.shape[1]) <= 0.1
    ask = tok.apply_chat_template([{"role": "user", "content": "And the main point?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = greedy(model, steps=6, input_ids=torch.cat([ids, ask["input_ids"]], -1),
                 **{models.CACHE_ARG: cache})
    assert out.shape[1] == ids.shape[1] + ask["input_ids"].shape[1] + 6
    assert all(layer.flat and layer.quantized is not None for layer in cache.layers)

