"""Quantized prompt rows (``bits`` 8/4/2): packing and the error bound against a float64
reference, the cache's decode region and bytes on random tensors, and generate on the
embedded SmolLM2 (same first tokens at 8 bits, exact at 16, refusals by name)."""
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import Budget, PolicyCache, get_policy
from kvpolicy.layer import EMPTY, KVLayer
from kvpolicy.quantized import TOKEN_GROUP, QuantizedRows, Scratch, channel_group, pack, unpack, unpack_into
from kvpolicy.tools.embedded import chat_prompt
from kvpolicy.vllm.config import make_settings
from kvpolicy_kernels import quantized_attention
from test_cache import prefill  # tests/ is on sys.path (conftest)

QUANTIZED = (8, 4, 2)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(QUANTIZED), st.integers(1, 3), st.integers(1, 6), st.integers(1, 9),
       st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits, B, groups, D, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (B, 2, groups * 8 // bits, D), generator=gen, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[2] == codes.shape[2] * bits // 8
    assert torch.equal(unpack(packed, bits), codes)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from((4, 2)), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 9),
       st.integers(0, 2**31 - 1))
def test_unpack_into_equals_unpack(bits, B, G, groups, D, seed):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, (B, G, groups * TOKEN_GROUP * bits // 8, D), generator=gen,
                           dtype=torch.uint8)
    out = torch.full((B, G, groups * TOKEN_GROUP, D), 255, dtype=torch.uint8)
    assert torch.equal(unpack_into(packed, bits, out), unpack(packed, bits))
    assert torch.equal(out, unpack(packed, bits))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(QUANTIZED), st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1,
                                            max_size=3), st.sampled_from([8, 24, 64]),
       st.sampled_from(["auto", "torch"]), st.integers(0, 2**31 - 1))
def test_scratch_rows_equal_the_joined_rows(bits, layers, D, backend, seed):
    """Eager decode's shared scratch gives the same slots as concatenating the dequantized
    rows and the full-precision ones, layer after layer of different sizes (4 to 160 rows:
    whole key groups, a partial last one, or only a partial one), through the C kernel
    (auto) and through ATen (torch)."""
    gen = torch.Generator().manual_seed(seed)
    scratch = Scratch()
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        for quads, tail in layers:
            k = torch.randn(1, 2, 4 * quads, D, generator=gen)
            v = torch.randn(1, 2, 4 * quads, D, generator=gen) * 3
            rows = QuantizedRows.quantize(k, v, bits)
            k_tail, v_tail = torch.randn(1, 2, tail, D, generator=gen), torch.randn(1, 2, tail, D, generator=gen)
            got = scratch.rows(rows, k_tail, v_tail)
            want = rows.joined(k_tail, v_tail)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_a_copied_cache_has_its_own_scratch():
    cache = random_cache(4)[0]
    cache.layers[0]._rows()
    copied = cache.copy()
    assert copied.layers[0].scratch is copied.layers[1].scratch is not cache.layers[0].scratch
    assert copied.layers[0].scratch.floats is None and cache.layers[0].scratch.floats is not None


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(QUANTIZED), st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.integers(1, 30), st.sampled_from([8, 24, 64]), st.floats(1e-3, 1e3), st.integers(0, 2**31 - 1))
def test_dequantization_error_within_half_a_step(bits, dtype, quads, D, spread, seed):
    """Per group, |x - deq(q(x))| <= scale / 2 (+ the dtype's rounding), in float64; N rows
    a multiple of 4, so the last key group is often partial (its scale from its own rows)."""
    gen = torch.Generator().manual_seed(seed)
    N = 4 * quads
    keys = (torch.randn(2, 2, N, D, generator=gen) * spread).to(dtype)
    values = (torch.randn(2, 2, N, D, generator=gen) * spread + 3).to(dtype)
    keys[0, 0, :TOKEN_GROUP, 0] = keys[0, 0, 0, 0]  # a constant group (or all N rows): scale 0, exact
    rows = QuantizedRows.quantize(keys, values, bits)
    got_k, got_v = rows.dequantize()
    assert got_k.dtype == dtype and got_k.shape == keys.shape and got_v.shape == values.shape
    assert rows.keys.dtype == torch.uint8 and rows.key_scale.dtype == dtype
    c = channel_group(D)
    assert rows.rows == N and rows.key_scale.shape[2] == -(-N // TOKEN_GROUP)
    k_step = rows.key_scale.double().repeat_interleave(TOKEN_GROUP, 2)[:, :, :N]  # [B, G, N, D]
    v_step = rows.value_scale.double().repeat_interleave(c, 3)
    for x, got, step in ((keys, got_k, k_step), (values, got_v, v_step)):
        x = x.double()
        eps = 4 * torch.finfo(dtype).eps * (x.abs().amax() + step.amax() * 2**bits) + 1e-3 * step
        assert bool(((x - got.double()).abs() <= step / 2 + eps).all())
    assert bool((got_k[0, 0, :TOKEN_GROUP, 0] == keys[0, 0, 0, 0]).all())


def random_cache(bits: int, N: int = 80):
    """A uniform(window=8) cache at budget 0.75 after one random prompt of N tokens (2 layers,
    batch 1, 2 KV heads, D 16, room for 3 decode steps) and the (q, k, v) it was filled with."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 1, 4, N, 16, generator=gen)
    k, v = torch.randn(2, 1, 2, N, 16, generator=gen), torch.randn(2, 1, 2, N, 16, generator=gen)
    cache = PolicyCache(2, get_policy("uniform", window=8), Budget(0.75), 3, bits=bits)
    prefill(cache, q, k, v, torch.ones(1, N, dtype=torch.bool))
    return cache, q, k, v


@pytest.mark.parametrize("bits", QUANTIZED)
def test_decode_region_and_recent_rows_stay_exact(bits):
    """The rows after the quantized ones (the policy's window, the rest of a packed byte)
    and the decode steps' tokens are the same as at 16 bits; the slots cover them all."""
    full, *_ = random_cache(16)
    quant, *_ = random_cache(bits)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        k, v = torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen)
        for cache in (full, quant):
            for layer in cache.layers:
                layer.update(k, v)
    for exact, layer in zip(full.layers, quant.layers):
        n = layer.quantized.rows
        assert n == 52  # 60 kept, the last 8 (window) unquantized; key groups of 32 and 20 rows
        assert layer.slots == exact.slots == layer.pos.shape[2] and torch.equal(layer.pos, exact.pos)
        assert torch.equal(layer.keys, exact.keys[:, :, n:])
        assert torch.equal(layer.values, exact.values[:, :, n:])
        keys, values = layer._rows()
        expected = QuantizedRows.quantize(exact.keys[:, :, :n], exact.values[:, :, :n], bits).dequantize()
        assert torch.equal(keys[:, :, :n], expected[0]) and torch.equal(values[:, :, :n], expected[1])


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
@pytest.mark.parametrize("bits", QUANTIZED)
def test_fused_decode_step_equals_the_dequantized_one(bits, backend, monkeypatch):
    """The decode step that reads the packed rows (KVLayer._fused: CUDA, forced here on CPU
    tensors with quantized_attention's reference or its kernel interpreted; eager float32 CPU
    by itself, through the C kernels) gives the output of dequantizing the rows and
    attending them (KVPOLICY_BACKEND=torch), with quantized slots hidden (empty, as padding),
    softcap and sinks."""
    cache, *_ = random_cache(bits)
    gen = torch.Generator().manual_seed(2)
    layer = cache.layers[0]
    layer.update(torch.randn(1, 2, 1, 16, generator=gen), torch.randn(1, 2, 1, 16, generator=gen))
    layer.pos[:, :, 3:9] = EMPTY
    query = torch.randn(1, 4, 1, 16, generator=gen)
    for softcap, sinks in ((None, None), (5.0, torch.randn(4, generator=gen))):
        with monkeypatch.context() as patch:
            patch.setenv("KVPOLICY_BACKEND", "torch")
            assert not layer._fused(query, False)
            want, _ = layer.attend(query, 0.5, None, softcap, sinks)
        with monkeypatch.context() as patch, mock.patch("kvpolicy.layer.quantized_attention",
                                                         wraps=quantized_attention) as op:
            if backend != "auto":
                patch.setattr(KVLayer, "_fused", lambda self, query, observe: True)
            patch.setenv("KVPOLICY_BACKEND", backend)
            got, probs = layer.attend(query, 0.5, None, softcap, sinks)
        assert op.call_count == 1 and probs is None
        torch.testing.assert_close(got, want)


def test_nbytes_counts_packed_rows_and_scales():
    """Each quantized row costs bits / 8 bytes per element instead of the dtype's, plus
    a key scale and zero per (32 tokens, the last group partial, channel) and a value scale
    and zero per (token, group of channels)."""
    full = random_cache(16)[0].nbytes()
    for bits in QUANTIZED:
        cache = random_cache(bits)[0]
        n, (B, G, _, D), item = 52, (1, 2, 0, 16), 4  # key groups of 32 and 20 rows
        elements = 2 * B * G * n * D  # K and V of the quantized rows, per layer
        scales = 2 * B * G * (-(-n // TOKEN_GROUP) * D + n * D // channel_group(D)) * item
        assert cache.nbytes() == full - 2 * (elements * item - elements * bits // 8 - scales)
        assert sum(t.nbytes for t in cache.layers[0].quantized.tensors()[::3]) == elements * bits // 8


def test_bits_are_checked_where_the_cache_is_built():
    with pytest.raises(ValueError, match="bits=3"):
        PolicyCache(2, get_policy("snapkv"), Budget(0.5), bits=3)
    with pytest.raises(ValueError, match="h2o evicts while decoding"):
        PolicyCache(2, get_policy("h2o"), Budget(0.5), bits=4)


def test_vllm_refuses_bits_by_name():
    with pytest.raises(ValueError, match="bits: .*bits=4"):
        make_settings({"policy": "snapkv", "bits": 4}, lambda k: k)
    assert make_settings({"policy": "snapkv", "bits": 16}, lambda k: k) is not None


# ---- the embedded model -----------------------------------------------------------------
def greedy(model, inputs, new_tokens, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                              return_dict_in_generate=True, **kwargs)


def test_bits_16_at_budget_one_is_the_unpatched_model(smollm2, long_prompt, reference_tokens):
    model, _ = smollm2
    new_tokens = reference_tokens.shape[1] - long_prompt["input_ids"].shape[1]
    with kvpolicy.apply(model, "snapkv", 1.0, bits=16):
        out = greedy(model, long_prompt, new_tokens)
    assert torch.equal(out.sequences, reference_tokens)


def test_eight_bits_keeps_the_first_tokens_and_fewer_bits_fewer_bytes(smollm2, long_prompt):
    model, _ = smollm2
    N = long_prompt["input_ids"].shape[1]
    out = {}
    for bits in (16, 8, 4, 2):
        with kvpolicy.apply(model, "snapkv", 0.5, bits=bits):
            out[bits] = greedy(model, long_prompt, 10)
    assert torch.equal(out[8].sequences[:, N:], out[16].sequences[:, N:])
    nbytes = [out[bits].past_key_values.nbytes() for bits in (16, 8, 4, 2)]
    assert nbytes == sorted(nbytes, reverse=True) and nbytes[2] < 0.6 * nbytes[0]
    assert all(layer.quantized is None for layer in out[16].past_key_values.layers)
    assert all(layer.quantized.rows > 0 for layer in out[4].past_key_values.layers)


def test_chunked_compress_and_a_new_turn_requantize(smollm2, long_prompt):
    """A continued cache puts its rows back in full precision, appends, compresses and
    quantizes again: chunked prefill and a second turn at 8 bits give 16 bits' first tokens."""
    model, tok = smollm2
    ids = long_prompt["input_ids"]
    try:
        first = {bits: kvpolicy.compress(model, ids, "snapkv", 0.5, chunk_size=128, bits=bits)
                 for bits in (16, 8)}
        question = tok(" Answer in one word: what is the topic?", return_tensors="pt")["input_ids"]
        turn = torch.cat([ids, question], -1)
        later = {bits: greedy(model, {"input_ids": turn}, 6, **{kvpolicy.models.CACHE_ARG: cache.copy()})
                 for bits, cache in first.items()}
    finally:
        kvpolicy.detach(model)
    assert first[8].nbytes() < first[16].nbytes()
    assert torch.equal(later[8].sequences, later[16].sequences)
    assert all(layer.quantized is not None for layer in later[8].past_key_values.layers)


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=3), "bits=3"), (dict(bits=True), "bits=True"), (dict(bits="4"), "bits='4'"),
])
def test_bad_bits_leave_the_model_unpatched(smollm2, long_prompt, kwargs, match):
    model, _ = smollm2
    attn = model.config._attn_implementation
    with pytest.raises(ValueError, match=match):
        kvpolicy.apply(model, "snapkv", 0.5, **kwargs)
    with pytest.raises(ValueError, match="h2o evicts while decoding"):
        kvpolicy.apply(model, "h2o", 0.5, bits=4)
    with pytest.raises(ValueError, match=match):
        kvpolicy.compress(model, long_prompt["input_ids"], "snapkv", 0.5, **kwargs)
    assert model.config._attn_implementation == attn and "generate" not in vars(model)


def test_compiled_decode_with_four_bits(smollm2):
    """Compiled decode over quantized rows: one graph, no graph break or recompile, the
    same tokens as eager decode at 4 bits."""
    from test_compile import compiled_run

    model, tok = smollm2
    prompt = chat_prompt(tok, 100, "Summarize the text above in one sentence.")
    with kvpolicy.apply(model, "snapkv", 0.5, bits=4):
        eager = greedy(model, prompt, 17, min_new_tokens=17)
    assert eager.past_key_values.layers[0].quantized is not None
    with kvpolicy.apply(model, "snapkv", 0.5, bits=4, compile=True):
        out, graphs, breaks = compiled_run(model, prompt, 16)
    assert (graphs, breaks) == (1, 0)
    assert torch.equal(out, eager.sequences)
