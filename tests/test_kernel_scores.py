"""accumulate_scores(_sparsity): reference and Triton (interpreted without a GPU) vs float64 dense,
plain and under the model's softmax (Gemma2 softcap, GPT-OSS sinks, both), with key masks
[B, N] or per KV head [B, G, N]."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from kvpolicy_kernels import accumulate_scores, accumulate_scores_sparsity
from kvpolicy_kernels.backend import use_triton
from kvpolicy_kernels.score_ref import accumulate_scores_ref
from memory_probe import largest_intermediate

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TAU = 0.05


@st.composite
def score_cases(draw, max_n: int = 300, per_head: bool = False):
    """Random GQA shapes with left padding (possibly a whole sequence) and query masks; with
    per_head, the key mask may be per KV head [B, G, N] (head_keep: each head's share of the
    keys after the padding, so a row may see keys in some heads and none in others)."""
    B, G, g = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 4))
    N = draw(st.integers(1, max_n))
    case = dict(B=B, G=G, g=g, N=N, Q=draw(st.integers(1, N)), D=draw(st.sampled_from([16, 32, 64])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                pads=draw(st.lists(st.integers(0, N), min_size=B, max_size=B))
                if draw(st.booleans()) else None,
                query_mask=draw(st.booleans()), logit_scale=draw(st.sampled_from([1.0, 4.0])),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])), sinks=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))
    if per_head and draw(st.booleans()):
        case["head_keep"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
    return case


def make_inputs(B, G, g, N, Q, D, dtype, pads, query_mask, logit_scale, softcap, sinks, seed,
                head_keep=None, device="cpu"):
    """(query, key, key_mask, query_mask, scaling, softcap, sinks): sinks in the input dtype,
    as models hold them, spread so the sink's share ranges from negligible to most of a row;
    head_keep: key_mask [B, G, N], each head keeping that random share of the real keys."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, G * g, Q, D, generator=gen).to(dtype)
    key = torch.randn(B, N, G, D, generator=gen).to(dtype).transpose(1, 2)  # strided, like HF
    key_mask = None if pads is None else torch.arange(N)[None, :] >= torch.tensor(pads)[:, None]
    if head_keep is not None:
        real = torch.ones(B, N, dtype=torch.bool) if key_mask is None else key_mask
        key_mask = real[:, None, :] & (torch.rand(B, G, N, generator=gen) < head_keep)
    qmask = torch.rand(B, Q, generator=gen) > 0.3 if query_mask else None
    sink = (3 * torch.randn(G * g, generator=gen) + 2).to(dtype) if sinks else None
    move = lambda t: None if t is None else t.to(device)
    return (move(query), move(key), move(key_mask), move(qmask), logit_scale / math.sqrt(D),
            softcap, move(sink))


def dense_logits_f64(query, key, scaling, key_mask, query_mask, softcap):
    """(logits float64 [B, H, Q, N] with -inf where hidden, visible bool [B, H, Q, N])."""
    query, key = query.cpu(), key.cpu()
    B, H, Q, _ = query.shape
    G, N = key.shape[1], key.shape[2]
    logits = query.double() @ key.double().repeat_interleave(H // G, dim=1).transpose(-1, -2) * scaling
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    allowed = torch.arange(N)[None, :] <= torch.arange(N - Q, N)[:, None]
    allowed = allowed[None, None].expand(B, H, Q, N).clone()
    if key_mask is not None:  # [B, N] or per KV head [B, G, N]
        heads = key_mask.cpu()[:, None] if key_mask.dim() == 2 else key_mask.cpu().repeat_interleave(H // G, 1)
        allowed &= heads[:, :, None, :]
    if query_mask is not None:
        allowed &= query_mask.cpu()[:, None, :, None]
    return logits.masked_fill(~allowed, -math.inf), allowed


def dense_f64(query, key, scaling, key_mask, query_mask, tau, softcap=0.0, sinks=None):
    """float64 oracle with the full [B, H, Q, N] matrix, softmax over [logits, sink] as
    GPT-OSS's eager attention: scores, below count, expected total mass (sum over counted
    rows with a visible key of 1 - the sink's share), and how many probabilities sit within
    1e-4 (relative) of the tau threshold."""
    logits, allowed = dense_logits_f64(query, key, scaling, key_mask, query_mask, softcap)
    B, H, Q, N = logits.shape
    G = key.shape[1]
    sink = torch.full((H,), -math.inf) if sinks is None else sinks.cpu().double()
    combined = torch.cat([logits, sink[None, :, None, None].expand(B, H, Q, 1)], -1)
    probs = torch.softmax(combined, -1)[..., :N].nan_to_num(0.0)
    scores = probs.reshape(B, G, H // G, Q, N).sum((2, 3))
    threshold = tau * probs.amax(-1, keepdim=True)
    below = ((probs < threshold) & allowed).reshape(B, G, -1).sum(-1).double()
    borderline = (((probs - threshold).abs() <= 1e-4 * threshold) & allowed).reshape(B, G, -1).sum(-1)
    key_share = torch.sigmoid(torch.logsumexp(logits, -1) - sink[None, :, None])  # 1 - sink's share
    mass = key_share[allowed.any(-1)].sum().item()
    return scores, below, borderline, mass


def check_against_dense(backend, case):
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, key, key_mask, query_mask, scaling, softcap, sinks = make_inputs(**case, device=device)
    args = dict(scaling=scaling, key_mask=key_mask, query_mask=query_mask, softcap=softcap, sinks=sinks)
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        scores, below = accumulate_scores_sparsity(query, key, tau=TAU, **args)
        plain = accumulate_scores(query, key, **args)
    exp_scores, exp_below, borderline, mass = dense_f64(
        query, key, scaling, key_mask, query_mask, TAU, softcap, sinks)
    assert scores.dtype == torch.float32 and scores.shape == (case["B"], case["G"], case["N"])
    # Each score sums up to g*Q probabilities: scale PyTorch's fp32 tolerances by sqrt(terms).
    terms = math.sqrt(case["g"] * case["Q"])
    torch.testing.assert_close(scores.cpu().double(), exp_scores, rtol=1.3e-6 * terms, atol=1e-5 * terms)
    torch.testing.assert_close(plain, scores, rtol=0, atol=0)
    assert ((below.cpu().double() - exp_below).abs() <= borderline).all()
    # Invariant 11: each counted row with a visible key adds mass 1 per head, less the share
    # of its sink (computed here as sigmoid(lse_keys - sink), not from the probabilities).
    assert scores.double().sum().item() == pytest.approx(mass, rel=1e-5, abs=1e-4)


EDGE_ONE_TOKEN = dict(B=1, G=1, g=1, N=1, Q=1, D=16, dtype=torch.float32, pads=None,
                      query_mask=False, logit_scale=1.0, softcap=0.0, sinks=False, seed=0)
EDGE_ALL_PADDING = dict(B=2, G=2, g=3, N=70, Q=70, D=32, dtype=torch.bfloat16, pads=[70, 5],
                        query_mask=True, logit_scale=4.0, softcap=0.0, sinks=False, seed=1)
EDGE_CAP_AND_SINKS = dict(B=2, G=2, g=2, N=70, Q=20, D=32, dtype=torch.float16, pads=[0, 30],
                          query_mask=True, logit_scale=4.0, softcap=2.0, sinks=True, seed=2)
# per KV head key masks: rows that see keys in one head and none in the other (tau, sinks)
EDGE_PER_HEAD = dict(B=1, G=2, g=1, N=2, Q=2, D=16, dtype=torch.float32, pads=None, query_mask=False,
                     logit_scale=1.0, softcap=0.0, sinks=False, seed=0, head_keep=0.1)
EDGE_PER_HEAD_PADDED = dict(EDGE_CAP_AND_SINKS, N=130, Q=70, pads=[5, 64], head_keep=0.5)


@settings(max_examples=60, deadline=None)
@given(score_cases(per_head=True))
@example(EDGE_ONE_TOKEN)
@example(EDGE_ALL_PADDING)
@example(EDGE_CAP_AND_SINKS)
@example(EDGE_PER_HEAD)
@example(EDGE_PER_HEAD_PADDED)
def test_reference_matches_float64_dense(case):
    check_against_dense("torch", case)


@settings(max_examples=12, deadline=None)
@given(score_cases(max_n=150, per_head=True))  # the interpreter's time grows with B * H * Q * N
@example(EDGE_ONE_TOKEN)
@example(EDGE_ALL_PADDING)
@example(dict(EDGE_ALL_PADDING, N=130, Q=33, pads=[0, 64], dtype=torch.float16))
@example(dict(EDGE_CAP_AND_SINKS, sinks=False, dtype=torch.float32))
@example(dict(EDGE_CAP_AND_SINKS, softcap=0.0, dtype=torch.bfloat16))
@example(EDGE_CAP_AND_SINKS)
@example(EDGE_PER_HEAD)
@example(EDGE_PER_HEAD_PADDED)
@example(dict(EDGE_PER_HEAD_PADDED, dtype=torch.bfloat16, softcap=0.0, sinks=False, head_keep=0.1))
def test_triton_matches_float64_dense(case):
    check_against_dense("triton", case)


def test_reference_chunks_never_hold_n_by_n():
    """The reference's largest intermediate is [B, H, chunk, N], at N = 8k (meta tensors)."""
    B, G, g, N, D, chunk = 1, 3, 3, 8192, 64, 128
    query = torch.empty(B, G * g, N, D, device="meta")
    key = torch.empty(B, G, N, D, device="meta")
    largest = largest_intermediate(lambda: accumulate_scores_ref(query, key, 0.125, tau=TAU, chunk=chunk))
    assert largest == B * G * g * chunk * N < N * N


def test_compiles_without_graph_break():
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=backend, fullgraph=True)
    def scores_twice(query, key, key_mask, sinks, lse):
        scores, below = accumulate_scores_sparsity(query, key, scaling=0.25, tau=TAU, key_mask=key_mask)
        capped = accumulate_scores(query, key, scaling=0.25, softcap=3.0, sinks=sinks, lse=lse)
        return scores * 2, below, accumulate_scores(query, key, scaling=0.25), capped

    query, key = torch.randn(2, 4, 8, 16), torch.randn(2, 2, 8, 16)
    key_mask = torch.arange(8)[None, :] >= torch.tensor([[0], [3]])
    sinks = torch.randn(4)
    lse = torch.logaddexp(torch.logsumexp(  # the capped causal rows' lse, sink included
        (3.0 * torch.tanh(query @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.25 / 3.0))
        .masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(), -math.inf), -1), sinks[:, None])
    doubled, below, plain, capped = scores_twice(query, key, key_mask, sinks, lse)
    expected = accumulate_scores_sparsity(query, key, scaling=0.25, tau=TAU, key_mask=key_mask)
    assert backend.frame_count == 1 and not counters["graph_break"]
    torch.testing.assert_close(doubled, 2 * expected[0])
    torch.testing.assert_close(below, expected[1])
    torch.testing.assert_close(plain, accumulate_scores(query, key, scaling=0.25))
    torch.testing.assert_close(capped, accumulate_scores(query, key, scaling=0.25, softcap=3.0, sinks=sinks))


def test_backend_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    plain_function = lambda: None  # not an interpreted kernel
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "auto"}):
        assert not use_triton(cpu, plain_function) and use_triton(cuda, plain_function)
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "torch"}):
        assert not use_triton(cuda, plain_function)
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "triton"}):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            use_triton(cpu, plain_function)
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "cuda"}):
        with pytest.raises(ValueError, match="KVPOLICY_BACKEND"):
            use_triton(cpu, plain_function)
