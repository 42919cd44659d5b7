"""head_attention (decode attention over flat per-head slots, #27): the reference against a
naive float64 loop per (batch row, query head), the Triton kernel (interpreted without a GPU)
against the reference and the same loop, on random ragged layouts; compile without breaks."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from kvpolicy_kernels import head_attention

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@st.composite
def head_cases(draw, max_t: int = 300):
    """Ragged per-head layouts: slots of random heads (-1 included), per-head contiguous
    segments (whole tiles of other heads, skipped), or interleaved one slot per head."""
    G = draw(st.integers(1, 4))
    D = draw(st.sampled_from([16, 32, 64, 80, 256]))
    return dict(B=draw(st.integers(1, 3)), G=G, g=draw(st.integers(1, 4)),
                T=draw(st.integers(G, max_t)), D=D, Dv=draw(st.sampled_from([D, 8, 48])),
                layout=draw(st.sampled_from(["random", "segments", "interleaved"])),
                hidden=draw(st.sampled_from([0.0, 0.3, 0.9])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                logit_scale=draw(st.sampled_from([1.0, 4.0])),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])), sinks=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(B, G, g, T, D, Dv, layout, hidden, dtype, logit_scale, softcap, sinks, seed,
                device="cpu"):
    """(query, keys, values, heads, visible, kwargs): query with HF's [B, 1, H, D] strides,
    keys and values the first T slots of a longer buffer (spare decode slots), a fraction
    ``hidden`` of the slots not visible, but every KV head keeps at least one visible slot."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, 1, G * g, D, generator=gen).to(dtype).transpose(1, 2)
    keys = torch.randn(B, T + 3, D, generator=gen).to(dtype)[:, :T]
    values = torch.randn(B, T + 3, Dv, generator=gen).to(dtype)[:, :T]
    if layout == "random":
        heads = torch.randint(-1, G, (B, T), generator=gen)
    elif layout == "interleaved":
        heads = (torch.arange(T) % G).expand(B, T).clone()
    else:  # contiguous segments of random lengths in head order, unused slots (-1) at the end
        cuts = torch.sort(torch.randint(0, T + 1, (B, G + 1), generator=gen), 1).values
        heads = (torch.arange(T)[None, None, :] >= cuts[:, :, None]).sum(1) - 1
        heads[heads >= G] = -1
    visible = torch.rand(B, T, generator=gen) >= hidden
    for b in range(B):  # one visible slot per KV head, at distinct random places
        owned = torch.randperm(T, generator=gen)[:G]
        heads[b, owned], visible[b, owned] = torch.arange(G), True
    sink = (3 * torch.randn(G * g, generator=gen)).to(dtype) if sinks else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (move(query), move(keys), move(values), move(heads), move(visible),
            dict(kv_heads=G, scaling=logit_scale / math.sqrt(D), softcap=softcap, sinks=move(sink)))


def naive_f64(query, keys, values, heads, visible, *, kv_heads, scaling, softcap, sinks):
    """float64 out [B, 1, H, Dv], one (batch row, query head) at a time: softmax over the
    visible slots of its KV head and the sink (GPT-OSS), 0 when it sees nothing."""
    B, H = query.shape[:2]
    out = torch.zeros(B, 1, H, values.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            sel = ((heads[b] == h // (H // kv_heads)) & visible[b]).cpu()
            logits = keys[b].cpu().double()[sel] @ query[b, h, 0].cpu().double() * scaling
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            sink = torch.full((1,), -math.inf, dtype=torch.float64) if sinks is None else sinks[h:h + 1].cpu().double()
            probs = torch.softmax(torch.cat([logits, sink]), 0)[:-1].nan_to_num(0.0)
            out[b, 0, h] = probs @ values[b].cpu().double()[sel]
    return out


def run(backend, query, keys, values, heads, visible, kwargs):
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        return head_attention(query, keys, values, heads, visible, **kwargs)


def check(backend, case):
    """The backend's output against the float64 loop; the kernel's also against the reference,
    with NaN in the slots that no program may read (no head, or hidden): its loads are
    predicated on the slot's head and visibility, so they never enter a dot (the reference's
    masked matmuls would turn them into NaN: 0 x NaN)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    *tensors, kwargs = make_inputs(**case, device=device)
    clean = [t.clone() for t in tensors]
    if backend == "triton":
        query, keys, values, heads, visible = tensors
        unread = ~((heads >= 0) & visible)
        keys[unread], values[unread] = math.nan, math.nan  # in place, in the strided buffers
    out = run(backend, *tensors, kwargs)
    assert out.dtype == case["dtype"] and out.shape == (case["B"], 1, case["G"] * case["g"], case["Dv"])
    torch.testing.assert_close(out.cpu().double(), naive_f64(*clean, **kwargs), **TOL[case["dtype"]])
    if backend == "triton":
        reference = run("torch", *(t.cpu() for t in clean),
                        dict(kwargs, sinks=None if kwargs["sinks"] is None else kwargs["sinks"].cpu()))
        torch.testing.assert_close(out.cpu(), reference, **TOL[case["dtype"]])


ONE_SLOT = dict(B=1, G=1, g=1, T=1, D=16, Dv=16, layout="random", hidden=0.0, dtype=torch.float32,
                logit_scale=1.0, softcap=0.0, sinks=False, seed=0)
SEGMENTS = dict(B=2, G=4, g=2, T=300, D=64, Dv=48, layout="segments", hidden=0.3, dtype=torch.bfloat16,
                logit_scale=4.0, softcap=0.0, sinks=False, seed=1)
CAP_AND_SINKS = dict(B=2, G=2, g=3, T=130, D=32, Dv=8, layout="random", hidden=0.9, dtype=torch.float16,
                     logit_scale=4.0, softcap=2.0, sinks=True, seed=2)
WIDE = dict(B=1, G=2, g=4, T=70, D=256, Dv=256, layout="interleaved", hidden=0.0, dtype=torch.float32,
            logit_scale=1.0, softcap=30.0, sinks=True, seed=3)


@settings(max_examples=60, deadline=None)
@given(head_cases())
@example(ONE_SLOT)
@example(SEGMENTS)
@example(CAP_AND_SINKS)
@example(WIDE)
def test_reference_matches_float64_loop(case):
    check("torch", case)


@settings(max_examples=25, deadline=None)
@given(head_cases(max_t=200))  # the interpreter's time grows with B * G * T
@example(ONE_SLOT)
@example(SEGMENTS)
@example(CAP_AND_SINKS)
@example(dict(CAP_AND_SINKS, dtype=torch.bfloat16, softcap=0.0))
@example(dict(CAP_AND_SINKS, dtype=torch.float32, sinks=False))
@example(WIDE)
@example(dict(WIDE, dtype=torch.bfloat16, softcap=0.0, sinks=False))
@example(dict(SEGMENTS, G=1, g=20, T=100, sinks=True))  # MQA: two programs of 16 query heads
def test_triton_matches_reference_and_float64_loop(case):
    check("triton", case)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("sinks", [False, True])
def test_head_without_visible_slot_gives_zero(backend, sinks):
    case = dict(CAP_AND_SINKS, dtype=torch.float32, sinks=sinks)
    query, keys, values, heads, visible, kwargs = make_inputs(
        **case, device=TRITON_DEVICE if backend == "triton" else "cpu")
    visible = visible & (heads != 1)  # KV head 1 of every row sees nothing
    out = run(backend, query, keys, values, heads, visible, kwargs).cpu()
    assert (out[:, :, 3:] == 0).all() and (out[:, :, :3] != 0).any()
    torch.testing.assert_close(out.double(), naive_f64(query, keys, values, heads, visible, **kwargs),
                               **TOL[torch.float32])


def test_rejects_misshapen_inputs():
    query, keys, values, heads, visible, kwargs = make_inputs(**CAP_AND_SINKS)
    with pytest.raises(ValueError, match="kv_heads"):
        head_attention(query, keys, values, heads, visible, **dict(kwargs, kv_heads=4))
    with pytest.raises(ValueError, match="disagree"):
        head_attention(query, keys, values, heads[:, 1:], visible, **kwargs)
    with pytest.raises(ValueError, match="sinks"):
        head_attention(query, keys, values, heads, visible, **dict(kwargs, sinks=torch.zeros(2)))


def test_compiles_without_graph_break():
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=backend, fullgraph=True)
    def decode(query, keys, values, heads, visible, sinks):
        plain = head_attention(query, keys, values, heads, visible, kv_heads=2, scaling=0.25)
        capped = head_attention(query, keys, values, heads, visible, kv_heads=2, scaling=0.25,
                                softcap=3.0, sinks=sinks)
        return plain * 2, capped

    query, keys, values, heads, visible, kwargs = make_inputs(**dict(CAP_AND_SINKS, dtype=torch.float32))
    doubled, capped = decode(query, keys, values, heads, visible, kwargs["sinks"])
    assert backend.frame_count == 1 and not counters["graph_break"]
    torch.testing.assert_close(doubled, 2 * head_attention(query, keys, values, heads, visible, kv_heads=2,
                                                           scaling=0.25))
    torch.testing.assert_close(capped, head_attention(query, keys, values, heads, visible, kv_heads=2,
                                                      scaling=0.25, softcap=3.0, sinks=kwargs["sinks"]))
