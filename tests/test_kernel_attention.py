"""attention / attention_with_lse vs a float64 dense oracle, transformers' eager attention of
Gemma2 (softcap) and GPT-OSS (sinks), and SDPA; scores from a reused lse vs recomputed; the
fused attention-and-scores pass vs the float64 oracle and vs SDPA followed by the score op."""
import math
import os
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_kernel_scores import EDGE_CAP_AND_SINKS, make_inputs, score_cases
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward as gemma2_eager
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward as gpt_oss_eager

from kvpolicy_kernels import (accumulate_scores, accumulate_scores_sparsity, attention, attention_and_scores,
                              attention_with_lse)
from memory_probe import largest_intermediate

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}
# lse tolerance: flash's bf16/fp16 CPU kernels are off by up to ~1e-5 relative (measured 1.4e-5)
LSE_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}


@st.composite
def attention_cases(draw):
    """GQA shapes, Q <= or > S, masks None / key padding / random with fully hidden rows."""
    return dict(B=draw(st.integers(1, 2)), G=draw(st.integers(1, 3)), g=draw(st.integers(1, 3)),
                Q=draw(st.integers(1, 150)), S=draw(st.integers(1, 150)),
                D=draw(st.sampled_from([16, 32])), same_dv=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                mask=draw(st.sampled_from([None, "padding", "random"])), is_causal=draw(st.booleans()),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])), sinks=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_attention_inputs(B, G, g, Q, S, D, same_dv, dtype, mask, is_causal, softcap, sinks, seed):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, Q, G * g, D, generator=gen).to(dtype).transpose(1, 2)  # HF strides
    key = torch.randn(B, G, S, D, generator=gen).to(dtype)
    value = torch.randn(B, G, S, D if same_dv else 8, generator=gen).to(dtype)
    if mask == "padding":
        mask = (torch.arange(S) >= torch.randint(0, S + 1, (B, 1), generator=gen))[:, None, None, :]
    elif mask == "random":
        mask = torch.rand(B, G * g, Q, S, generator=gen) > 0.5
        mask[:, :, torch.randint(0, Q, (1,), generator=gen)] = False
    sink = (3 * torch.randn(G * g, generator=gen)).to(dtype) if sinks else None
    return query, key, value, dict(scaling=4 / math.sqrt(D), mask=mask, is_causal=is_causal,
                                   softcap=softcap, sinks=sink)


def dense_attention_f64(query, key, value, *, scaling, mask, is_causal, softcap, sinks):
    """(out float64 [B, H, Q, Dv], lse float64 [B, H, Q]) from the full matrix; softmax over
    [logits, sink] as GPT-OSS's eager attention; hidden rows give 0 and lse -inf (or sink)."""
    B, H, Q, _ = query.shape
    G, S = key.shape[1], key.shape[2]
    k = key.double().repeat_interleave(H // G, 1)
    v = value.double().repeat_interleave(H // G, 1)
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    visible = torch.ones(B, H, Q, S, dtype=torch.bool)
    if mask is not None:
        visible &= mask
    if is_causal:
        visible &= torch.ones(Q, S, dtype=torch.bool).tril(S - Q)
    logits = logits.masked_fill(~visible, -math.inf)
    sink = torch.full((H,), -math.inf) if sinks is None else sinks.double()
    combined = torch.cat([logits, sink[None, :, None, None].expand(B, H, Q, 1)], -1)
    probs = torch.softmax(combined, -1)[..., :S].nan_to_num(0.0)
    return probs @ v, torch.logsumexp(combined, -1)


@settings(max_examples=40, deadline=None)
@given(attention_cases())
@example(dict(B=2, G=3, g=3, Q=130, S=129, D=16, same_dv=True, dtype=torch.float32, mask="random",
              is_causal=True, softcap=2.0, sinks=True, seed=0))
def test_attention_matches_float64_dense(case):
    query, key, value, kwargs = make_attention_inputs(**case)
    expected, expected_lse = dense_attention_f64(query, key, value, **kwargs)
    out = attention(query, key, value, **kwargs)
    with_lse, lse = attention_with_lse(query, key, value, **kwargs)
    assert out.dtype == with_lse.dtype == query.dtype and lse.dtype == torch.float32
    tol = TOL[query.dtype]
    torch.testing.assert_close(out.double(), expected, **tol)
    torch.testing.assert_close(with_lse.double(), expected, **tol)
    lse_tol = LSE_TOL[query.dtype]
    torch.testing.assert_close(lse.double(), expected_lse, rtol=lse_tol, atol=lse_tol)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_matches_transformers_eager(family):
    """fp32, GQA, a causal mask with left padding, as the models call their eager attention."""
    gen = torch.Generator().manual_seed(0)
    B, G, g, S, D = 2, 2, 3, 40, 16
    query = torch.randn(B, G * g, S, D, generator=gen)
    key, value = torch.randn(B, G, S, D, generator=gen), torch.randn(B, G, S, D, generator=gen)
    padding = (torch.arange(S) >= torch.tensor([[0], [7]]))[:, None, None, :]  # [B, 1, 1, S]
    visible = torch.ones(S, S, dtype=torch.bool).tril() & padding
    additive = torch.zeros(B, 1, S, S).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = SimpleNamespace(num_key_value_groups=g, training=False, sinks=3 * torch.randn(G * g, generator=gen))
    if family == "gemma2":
        kwargs = dict(softcap=5.0)
        eager, _ = gemma2_eager(module, query, key, value, additive, scaling=0.5, softcap=5.0)
    else:
        kwargs = dict(sinks=module.sinks)
        eager, _ = gpt_oss_eager(module, query, key, value, additive, scaling=0.5)
    eager = eager.transpose(1, 2)[:, :, 7:]  # rows 0-6 of sequence 1 see only padding: differ by design
    for out in (attention(query, key, value, scaling=0.5, mask=visible, **kwargs),
                attention_with_lse(query, key, value, scaling=0.5, mask=visible, **kwargs)[0],
                attention(query, key, value, scaling=0.5, mask=padding, is_causal=True, **kwargs)):
        torch.testing.assert_close(out[:, :, 7:], eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_matches_sdpa(dtype):
    gen = torch.Generator().manual_seed(1)
    B, G, g, S, D = 2, 3, 3, 200, 32
    query = torch.randn(B, G * g, S, D, generator=gen).to(dtype)
    key, value = (torch.randn(B, G, S, D, generator=gen).to(dtype) for _ in range(2))
    mask = torch.rand(B, 1, S, S, generator=gen) > 0.3
    mask[1, :, 5] = False  # a row with no visible key: SDPA gives 0
    for kwargs in (dict(is_causal=True), dict(attn_mask=mask)):
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, scale=0.2, enable_gqa=True, **kwargs)
        mine = dict(mask=kwargs.get("attn_mask"), is_causal=kwargs.get("is_causal", False))
        for out in (attention(query, key, value, scaling=0.2, **mine),
                    attention_with_lse(query, key, value, scaling=0.2, **mine)[0]):
            torch.testing.assert_close(out, sdpa, **TOL[dtype])


def scores_with_and_without_lse(backend, case):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, key, key_mask, query_mask, scaling, softcap, sinks = make_inputs(**case, device=device)
    Q, N = query.shape[2], key.shape[2]
    visible = torch.ones(Q, N, dtype=torch.bool, device=device).tril(N - Q)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    value = key.new_zeros(*key.shape[:3], key.shape[3])
    _, lse = attention_with_lse(query.cpu(), key.cpu(), value.cpu(), scaling=scaling, mask=visible.cpu(),
                                softcap=softcap, sinks=None if sinks is None else sinks.cpu())
    args = dict(scaling=scaling, key_mask=key_mask, query_mask=query_mask, softcap=softcap, sinks=sinks)
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        recomputed = accumulate_scores_sparsity(query, key, tau=0.05, **args)
        reused = accumulate_scores_sparsity(query, key, tau=0.05, lse=lse.to(device), **args)
        reused_plain = accumulate_scores(query, key, lse=lse.to(device), **args)
    tol = LSE_TOL[case["dtype"]] * math.sqrt(case["g"] * case["Q"])  # an lse error scales a row
    for scores in (reused[0], reused_plain):
        torch.testing.assert_close(scores, recomputed[0], rtol=tol, atol=tol)
    assert (reused[1] - recomputed[1]).abs().max() <= 1  # a probability at the threshold may flip


@settings(max_examples=25, deadline=None)
@given(score_cases())
@example(EDGE_CAP_AND_SINKS)
def test_reference_scores_from_lse_equal_recomputed(case):
    scores_with_and_without_lse("torch", case)


@pytest.mark.parametrize("case", [EDGE_CAP_AND_SINKS, dict(EDGE_CAP_AND_SINKS, softcap=0.0, sinks=False,
                                                           dtype=torch.float32, query_mask=False)])
def test_triton_scores_from_lse_equal_recomputed(case):
    """Two fixed cases (the interpreter is slow): the lse input skips pass 1 (tau = 0) or runs
    it for the row maximum only (tau > 0)."""
    scores_with_and_without_lse("triton", case)


def test_attention_chunks_never_hold_q_by_s():
    """The largest intermediate of ``attention`` is [B, H, chunk, S], at S = 8k (meta tensors)."""
    B, G, g, S, D, chunk = 1, 3, 3, 8192, 64, 128
    query = torch.empty(B, G * g, S, D, device="meta")
    key, value = torch.empty(B, G, S, D, device="meta"), torch.empty(B, G, S, D, device="meta")
    largest = largest_intermediate(lambda: attention(
        query, key, value, scaling=0.125, is_causal=True, softcap=5.0,
        sinks=torch.zeros(G * g, device="meta"), chunk=chunk))
    assert largest == B * G * g * chunk * S < S * S


def test_score_op_rejects_misshapen_sinks_and_lse():
    query, key = torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="sinks must be"):
        accumulate_scores(query, key, scaling=0.25, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="lse must be"):
        accumulate_scores(query, key, scaling=0.25, lse=torch.zeros(1, 4, 5))


@settings(max_examples=40, deadline=None)
@given(attention_cases(), st.sampled_from([None, "random", "none counted"]), st.integers(1, 70))
@example(dict(B=2, G=3, g=3, Q=130, S=129, D=16, same_dv=True, dtype=torch.float32, mask="random",
              is_causal=True, softcap=2.0, sinks=True, seed=0), "random", 64)
def test_attention_and_scores_match_float64_dense(case, counted, chunk):
    """One pass gives attention's output and the scores of its probabilities: each key's
    mass summed over the counted rows and the group's heads (the float64 full matrix)."""
    query, key, value, kwargs = make_attention_inputs(**case)
    B, H, Q, _ = query.shape
    G, S = key.shape[1], key.shape[2]
    gen = torch.Generator().manual_seed(case["seed"])
    query_mask = {None: None, "random": torch.rand(B, Q, generator=gen) > 0.3,
                  "none counted": torch.zeros(B, Q, dtype=torch.bool)}[counted]
    expected, _ = dense_attention_f64(query, key, value, **kwargs)
    probs = dense_probabilities_f64(query, key, **kwargs)  # [B, H, Q, S]
    weight = torch.ones(B, Q, dtype=torch.float64) if query_mask is None else query_mask.double()
    expected_scores = (probs * weight[:, None, :, None]).sum(2).view(B, G, H // G, S).sum(2)
    out, scores = attention_and_scores(query, key, value, query_mask=query_mask, chunk=chunk, **kwargs)
    assert out.dtype == query.dtype and scores.dtype == torch.float32 and scores.shape == (B, G, S)
    torch.testing.assert_close(out.double(), expected, **TOL[query.dtype])
    tol = LSE_TOL[query.dtype] * 10
    torch.testing.assert_close(scores.double(), expected_scores, rtol=tol, atol=tol * H // G)


def dense_probabilities_f64(query, key, *, scaling, mask, is_causal, softcap, sinks):
    """float64 [B, H, Q, S]: each row's softmax over its visible keys and the sink (the sink's
    own share dropped); a row without a visible key is 0."""
    B, H, Q, _ = query.shape
    S = key.shape[2]
    value = torch.eye(S, dtype=torch.float64)[None, None].expand(B, key.shape[1], S, S)
    return dense_attention_f64(query, key, value, scaling=scaling, mask=mask, is_causal=is_causal,
                               softcap=softcap, sinks=sinks)[0]


def test_attention_and_scores_equal_attention_then_scores_on_a_real_prompt_shape():
    """At SmolLM2's shape (9 query heads, 3 KV heads, 64 dims), causal, left padding: the
    fused pass equals SDPA's output and ``accumulate_scores`` from SDPA's lse, to fp32 rounding."""
    gen = torch.Generator().manual_seed(3)
    B, G, g, S, D = 2, 3, 3, 300, 64
    query = torch.randn(B, G * g, S, D, generator=gen)
    key, value = torch.randn(B, G, S, D, generator=gen), torch.randn(B, G, S, D, generator=gen)
    real = torch.arange(S) >= torch.tensor([[0], [17]])  # [B, S]
    visible = (torch.ones(S, S, dtype=torch.bool).tril() & real[:, None, :])[:, None]
    out, lse = attention_with_lse(query, key, value, scaling=0.125, mask=visible)
    scores = accumulate_scores(query, key, scaling=0.125, key_mask=real, query_mask=real, lse=lse)
    fused_out, fused_scores = attention_and_scores(query, key, value, scaling=0.125, mask=visible,
                                                   query_mask=real)
    torch.testing.assert_close(fused_out[1, :, 17:], out[1, :, 17:], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_out[0], out[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_scores, scores, rtol=1e-5, atol=1e-4)
