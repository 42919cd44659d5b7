"""quantized_attention (decode attention over quantized prompt rows, #28): the reference
and the CPU C kernels (float32, kvpolicy_kernels.quantized_cpu) against a float64
dequantize-then-attend loop per (batch row, query head), the Triton kernel (interpreted
without a GPU) against the reference and the same loop, on random ragged shapes quantized by
kvpolicy.quantized; misshapen inputs refused; compile without breaks."""
import math
import os
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from kvpolicy.quantized import TOKEN_GROUP, QuantizedRows, channel_group, unpack
from kvpolicy_kernels import quantized_attention, quantized_cpu
from kvpolicy_kernels.quantized_attention_ref import dequantize

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


@st.composite
def quantized_cases(draw):
    """N quantized rows (a multiple of 4, so of 8 // bits; the last key group often partial)
    then n full-precision ones; a fraction ``hidden`` of the slots not visible, and with
    ``empty`` KV head 0 of row 0 sees none.
    D = Dv; 48: three value channel groups of 16 (channel_group), in a padded tile."""
    return dict(B=draw(st.integers(1, 2)), G=draw(st.sampled_from([1, 2, 3])), g=draw(st.sampled_from([1, 3, 8])),
                bits=draw(st.sampled_from([8, 4, 2])), N=4 * draw(st.integers(1, 40)),
                n=draw(st.integers(1, 40)), D=draw(st.sampled_from([16, 32, 48, 64])),
                hidden=draw(st.sampled_from([0.0, 0.3, 0.9])), empty=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                logit_scale=draw(st.sampled_from([1.0, 4.0])),
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])), sinks=draw(st.booleans()),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_inputs(B, G, g, bits, N, n, D, hidden, empty, dtype, logit_scale, softcap, sinks, seed,
                device="cpu"):
    """(query, rows, keys, values, visible, kwargs): query with HF's [B, 1, H, D] strides, rows
    QuantizedRows.quantize's six tensors, keys and values [B, G, n, D] the first n slots of a
    longer buffer (spare decode slots)."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, 1, G * g, D, generator=gen).to(dtype).transpose(1, 2)
    prompt = torch.randn(B, G, N, D, generator=gen).to(dtype), torch.randn(B, G, N, D, generator=gen).to(dtype)
    rows = QuantizedRows.quantize(*prompt, bits).tensors()
    keys = torch.randn(B, G, n + 3, D, generator=gen).to(dtype)[:, :, :n]
    values = torch.randn(B, G, n + 3, D, generator=gen).to(dtype)[:, :, :n]
    visible = torch.rand(B, G, N + n, generator=gen) >= hidden
    if empty:
        visible[0, 0] = False
    sink = (3 * torch.randn(G * g, generator=gen)).to(dtype) if sinks else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (move(query), [move(t) for t in rows], move(keys), move(values), move(visible),
            dict(bits=bits, scaling=logit_scale / math.sqrt(D), softcap=softcap, sinks=move(sink)))


def naive_f64(query, rows, keys, values, visible, *, bits, scaling, softcap, sinks):
    """float64 out [B, 1, H, Dv]: the rows dequantized in float64 (kvpolicy.quantized.unpack)
    and rounded once to the rows' dtype (the op's rows, as the other kernel tests take the
    float64 result of the same rounded inputs), then one (batch row, query head) at a time a
    softmax over the visible slots of its KV head and the sink (GPT-OSS), 0 when it sees
    nothing."""
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = (t.cpu().double() if t.is_floating_point()
                                                                            else t.cpu() for t in rows)
    c = channel_group(values.shape[-1])
    N = key_codes.shape[2] * 8 // bits
    k = (unpack(key_codes, bits).double() * key_scale.repeat_interleave(TOKEN_GROUP, 2)[:, :, :N]
         + key_zero.repeat_interleave(TOKEN_GROUP, 2)[:, :, :N])
    v = (unpack(value_codes, bits).double() * value_scale.repeat_interleave(c, 3)
         + value_zero.repeat_interleave(c, 3))
    k, v = (torch.cat([x.to(keys.dtype).double(), y.cpu().double()], 2) for x, y in ((k, keys), (v, values)))
    B, H = query.shape[:2]
    G = keys.shape[1]
    out = torch.zeros(B, 1, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kv = h // (H // G)
            sel = visible[b, kv].cpu()
            logits = k[b, kv][sel] @ query[b, h, 0].cpu().double() * scaling
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            sink = torch.full((1,), -math.inf, dtype=torch.float64) if sinks is None else sinks[h:h + 1].cpu().double()
            probs = torch.softmax(torch.cat([logits, sink]), 0)[:-1].nan_to_num(0.0)
            out[b, 0, h] = probs @ v[b, kv][sel]
    return out


def run(backend, query, rows, keys, values, visible, kwargs):
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        return quantized_attention(query, rows, keys, values, visible, **kwargs)


def check(backend, case):
    """The backend's output against the float64 loop; the kernel's also against the reference,
    with NaN where no program may read: hidden full-precision rows, and the value scales and
    zeros of hidden quantized rows (the kernel's loads are predicated on ``visible``)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    query, rows, keys, values, visible, kwargs = make_inputs(**case, device=device)
    clean = (query, [t.clone() for t in rows], keys.clone(), values.clone(), visible)
    if backend == "triton":
        N = case["N"]
        keys[~visible[:, :, N:]], values[~visible[:, :, N:]] = math.nan, math.nan  # in the strided buffers
        rows[4][~visible[:, :, :N]], rows[5][~visible[:, :, :N]] = math.nan, math.nan
    out = run(backend, query, rows, keys, values, visible, kwargs)
    assert out.dtype == case["dtype"] and out.shape == (case["B"], 1, case["G"] * case["g"], case["D"])
    torch.testing.assert_close(out.cpu().double(), naive_f64(*clean, **kwargs), **TOL[case["dtype"]])
    if case["empty"]:
        assert (out[0, 0, :case["g"]] == 0).all()
    if backend == "triton":
        query, rows, keys, values, visible = clean
        reference = run("torch", query.cpu(), [t.cpu() for t in rows], keys.cpu(), values.cpu(), visible.cpu(),
                        dict(kwargs, sinks=None if kwargs["sinks"] is None else kwargs["sinks"].cpu()))
        torch.testing.assert_close(out.cpu(), reference, **TOL[case["dtype"]])


ONE_GROUP = dict(B=1, G=1, g=1, bits=2, N=32, n=1, D=16, hidden=0.0, empty=False, dtype=torch.float32,
                 logit_scale=1.0, softcap=0.0, sinks=False, seed=0)
CAP_AND_SINKS = dict(B=2, G=3, g=3, bits=4, N=100, n=37, D=32, hidden=0.3, empty=True, dtype=torch.bfloat16,
                     logit_scale=4.0, softcap=2.0, sinks=True, seed=1)
MOSTLY_HIDDEN = dict(B=2, G=2, g=8, bits=8, N=128, n=20, D=64, hidden=0.9, empty=False, dtype=torch.float32,
                     logit_scale=4.0, softcap=30.0, sinks=False, seed=2)


def test_dequantize_is_the_storages_own():
    """The reference's copy of the unpacking rule gives QuantizedRows.dequantize: keys bit for
    bit (both one fp32 multiply-add, rounded once), values within one rounding of the dtype
    (the storage rounds after the product and after the sum)."""
    for bits in (8, 4, 2):
        for dtype in (torch.float32, torch.bfloat16):
            _, rows, *_ = make_inputs(**dict(CAP_AND_SINKS, bits=bits, dtype=dtype, D=64))
            want = QuantizedRows(bits, *rows).dequantize()
            got = dequantize(*rows, bits)
            assert got[0].dtype == got[1].dtype == dtype and torch.equal(got[0], want[0])
            step = torch.finfo(dtype).eps * want[1].abs().amax().item()
            torch.testing.assert_close(got[1], want[1], rtol=0, atol=step)


@settings(max_examples=40, deadline=None)
@given(quantized_cases())
@example(ONE_GROUP)
@example(CAP_AND_SINKS)
@example(MOSTLY_HIDDEN)
def test_reference_matches_float64_loop(case):
    check("torch", case)


@settings(max_examples=40, deadline=None)
@given(quantized_cases())
@example(ONE_GROUP)
@example(dict(CAP_AND_SINKS, dtype=torch.float32))
@example(MOSTLY_HIDDEN)
@example(dict(CAP_AND_SINKS, dtype=torch.float32, D=80, bits=2))  # five value channel groups of 16
@example(dict(ONE_GROUP, G=1, g=20, N=64, n=40, sinks=True))  # MQA
def test_cpu_kernels_match_float64_loop(case):
    """float32 on CPU (backend auto): the C kernels, whatever the shape, cap, sinks, hidden
    slots or a KV head that sees nothing."""
    case = dict(case, dtype=torch.float32)
    query, _, _, values, *_ = make_inputs(**case)
    assert quantized_cpu.serves(query, values)
    check("auto", case)


@settings(max_examples=20, deadline=None)
@given(quantized_cases())
@example(ONE_GROUP)
@example(CAP_AND_SINKS)
@example(dict(CAP_AND_SINKS, dtype=torch.float32, bits=2, softcap=0.0))
@example(MOSTLY_HIDDEN)
@example(dict(MOSTLY_HIDDEN, dtype=torch.bfloat16, sinks=True, softcap=0.0))
@example(dict(CAP_AND_SINKS, D=80))  # five value channel groups of 16
@example(dict(CAP_AND_SINKS, dtype=torch.float16, bits=8))
@example(dict(ONE_GROUP, G=1, g=20, N=64, n=40, sinks=True))  # MQA: two programs of 16 query heads
def test_triton_matches_reference_and_float64_loop(case):
    check("triton", case)


def test_rejects_misshapen_inputs():
    query, rows, keys, values, visible, kwargs = make_inputs(**CAP_AND_SINKS)
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = rows
    with pytest.raises(ValueError, match="bits"):
        quantized_attention(query, rows, keys, values, visible, **dict(kwargs, bits=3))
    with pytest.raises(ValueError, match="query"):
        quantized_attention(query[:, :8], rows, keys, values, visible, **kwargs)
    with pytest.raises(ValueError, match="values"):
        quantized_attention(query, rows, keys, values[:, :, 1:], visible, **kwargs)
    with pytest.raises(ValueError, match="uint8"):
        quantized_attention(query, [key_codes.float(), *rows[1:]], keys, values, visible, **kwargs)
    with pytest.raises(ValueError, match="key_scale"):
        quantized_attention(query, [key_codes, key_scale[:, :, 1:], *rows[2:]], keys, values, visible, **kwargs)
    with pytest.raises(ValueError, match="8 bits: N = 50"):  # 4-bit codes read as 8: half the rows
        quantized_attention(query, rows, keys, values, visible, **dict(kwargs, bits=8))
    with pytest.raises(ValueError, match="value_scale"):
        quantized_attention(query, [*rows[:4], value_scale[:, :, 1:], value_zero], keys, values, visible, **kwargs)
    with pytest.raises(ValueError, match="visible"):
        quantized_attention(query, rows, keys, values, visible[:, :, 1:], **kwargs)
    with pytest.raises(ValueError, match="sinks"):
        quantized_attention(query, rows, keys, values, visible, **dict(kwargs, sinks=torch.zeros(2)))


def test_compiles_without_graph_break():
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    query, rows, keys, values, visible, kwargs = make_inputs(**dict(CAP_AND_SINKS, dtype=torch.float32))

    @torch.compile(backend=backend, fullgraph=True)
    def decode(query, rows, keys, values, visible, sinks):
        plain = quantized_attention(query, rows, keys, values, visible, bits=4, scaling=0.25)
        capped = quantized_attention(query, rows, keys, values, visible, bits=4, scaling=0.25,
                                     softcap=3.0, sinks=sinks)
        return plain * 2, capped

    doubled, capped = decode(query, rows, keys, values, visible, kwargs["sinks"])
    assert backend.frame_count == 1 and not counters["graph_break"]
    torch.testing.assert_close(doubled, 2 * quantized_attention(query, rows, keys, values, visible, bits=4,
                                                                scaling=0.25))
    torch.testing.assert_close(capped, quantized_attention(query, rows, keys, values, visible, bits=4,
                                                           scaling=0.25, softcap=3.0, sinks=kwargs["sinks"]))
