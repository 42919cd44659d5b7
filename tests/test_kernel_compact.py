"""compact_layers: reference and Triton (interpreted without a GPU) vs float64 gathers,
into NaN-poisoned destination buffers."""
import os
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from kvpolicy_kernels import compact_layers

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@st.composite
def compaction_cases(draw):
    """Ragged layers (length 1 possible), kept counts 1, N_l or in between, spare capacity;
    layers may differ in KV heads (MiMo-V2-Flash) and values in head size (Dv != D)."""
    B, D = draw(st.integers(1, 3)), draw(st.sampled_from([16, 32, 64]))
    Dv = draw(st.sampled_from([D, 8, 48]))
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        N = draw(st.sampled_from([1, draw(st.integers(1, 300))]))
        kept = draw(st.sampled_from([1, N, draw(st.integers(1, N))]))
        layers.append((N, kept, kept + draw(st.integers(0, 5)), draw(st.integers(1, 4))))
    return dict(B=B, D=D, Dv=Dv, layers=layers, strided=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                seed=draw(st.integers(0, 2**31 - 1)))


def check_compaction(backend, case):
    B, D, Dv, dtype = case["B"], case["D"], case["Dv"], case["dtype"]
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(case["seed"])
    keys, values, keep, dst_keys, dst_values = [], [], [], [], []
    for N, kept, capacity, G in case["layers"]:
        for sources, width in ((keys, D), (values, Dv)):
            x = torch.randn(B, N, G, width, generator=gen).to(dtype)
            sources.append((x.transpose(1, 2) if case["strided"] else x.reshape(B, G, N, width)).to(device))
        order = torch.rand(B, G, N, generator=gen).argsort(-1)[..., :kept]
        keep.append(order.sort(-1).values.to(device))
        dst_keys.append(torch.full((B, G, capacity, D), float("nan"), dtype=dtype, device=device))
        dst_values.append(torch.full((B, G, capacity, Dv), float("nan"), dtype=dtype, device=device))
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": backend}):
        compact_layers(keys, values, keep, dst_keys, dst_values)
    for layer, (_, kept, _, G) in enumerate(case["layers"]):
        b = torch.arange(B)[:, None, None]
        g = torch.arange(G)[None, :, None]
        idx = keep[layer].cpu()
        for src, dst in ((keys, dst_keys), (values, dst_values)):
            expected = src[layer].cpu().double()[b, g, idx]  # [B, G, kept, D]
            written = dst[layer].cpu().double()
            assert torch.equal(written[:, :, :kept], expected)
            assert written[:, :, kept:].isnan().all()


@settings(max_examples=40, deadline=None)
@given(compaction_cases())
def test_reference_compaction_matches_float64_gather(case):
    check_compaction("torch", case)


@settings(max_examples=25, deadline=None)
@given(compaction_cases())
def test_triton_compaction_matches_float64_gather(case):
    check_compaction("triton", case)


def test_compiles_without_graph_break():
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=backend, fullgraph=True)
    def compact_then_sum(keys, values, keep, dst_keys, dst_values):
        compact_layers(keys, values, keep, dst_keys, dst_values)
        return dst_keys[1].sum()

    keys = [torch.randn(1, 2, 6, 16) for _ in range(2)]
    values = [torch.randn(1, 2, 6, 16) for _ in range(2)]
    keep = [torch.tensor([[[0, 2], [1, 5]]]), torch.tensor([[[3], [4]]])]
    dst_keys = [torch.zeros(1, 2, 4, 16) for _ in range(2)]
    dst_values = [torch.zeros(1, 2, 4, 16) for _ in range(2)]
    total = compact_then_sum(keys, values, keep, dst_keys, dst_values)
    assert backend.frame_count == 1 and not counters["graph_break"]
    assert torch.equal(dst_keys[0][0, 1, :2], keys[0][0, 1, [1, 5]])
    assert torch.equal(dst_values[1][0, 0, 0], values[1][0, 0, 3])
    torch.testing.assert_close(total, keys[1][0, 0, 3].sum() + keys[1][0, 1, 4].sum())
