"""GPU checks (marker ``gpu``; run by ``.ci/gpu``): the Triton kernels against their
references at real sizes, per-layer compaction inside the cache, budget 1.0 exact on the
main families in bf16 and fp32, decode over quantized rows through the fused kernel, and
compiled decode (CUDA graphs) equal to eager with one graph.

On CUDA: real sizes, head dim 64 models. ``KVPOLICY_GPU_DRY_RUN=1``: the same tests on CPU at
tiny sizes in fp32 with the kernels numpy-interpreted (``TRITON_INTERPRET=1`` set before
triton is imported; ``.ci/gpu --dry-run`` does), so CI runs this code without a GPU.
Neither: skipped.
"""
import os
import warnings
from unittest import mock

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import DynamicCache

import kvpolicy
from families import TINY, build
from kvpolicy import models
from kvpolicy_kernels import accumulate_scores_sparsity, compact_layers
from kvpolicy_kernels.backend import use_triton
from kvpolicy_kernels.score_triton import _column_sums_kernel
from test_kernel_scores import EDGE_ALL_PADDING, EDGE_CAP_AND_SINKS, check_against_dense

DRY = os.environ.get("KVPOLICY_GPU_DRY_RUN") == "1"
GPU = torch.cuda.is_available() and not DRY
DEVICE = "cuda" if GPU else "cpu"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (GPU or DRY), reason="needs CUDA (or KVPOLICY_GPU_DRY_RUN=1)")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MODEL_DTYPES = [torch.bfloat16, torch.float32] if GPU else [torch.float32]
LOGIT_TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-4}  # two runs' logits, x the largest
# over families.TINY: every expert active (MoE routing is a discrete choice that bf16
# rounding can flip); on CUDA head dim 64 and a window shorter than the prompt
MODEL = dict(num_experts_per_tok=4, **(dict(hidden_size=256, intermediate_size=512, head_dim=64,
                                             sliding_window=64, attention_window_size=64) if GPU else {}))
PROMPT, NEW = (160, 16) if GPU else (40, 4)
COMPILED_PROMPT, COMPILED_STEPS = (512, 256) if GPU else (40, 8)
# score cases: (B, H, G, N, Q, left pads per row, counted-query fraction, softcap, sinks, tau)
SCORE_CASES = {
    "prefill": (1, 32, 8, 8192, 8192, None, 1.0, 0.0, False, 0.0),
    "window": (2, 32, 8, 32768, 32, [0, 5000], 0.7, 0.0, False, 0.05),
    "softcap_sinks": (2, 16, 4, 2048, 512, [0, 300], 0.7, 30.0, True, 0.05),
} if GPU else {
    "prefill": (1, 4, 2, 64, 64, None, 1.0, 0.0, False, 0.0),
    "window": (2, 4, 2, 96, 8, [0, 30], 0.7, 0.0, False, 0.05),
    "softcap_sinks": (2, 4, 2, 80, 24, [0, 10], 0.7, 30.0, True, 0.05),
}
# compaction: per layer (N_l, kept n_l); n_l = 1 and n_l = N_l included
COMPACT_LAYERS = ([(32768, 3277), (32768, 1), (8192, 8192), (1, 1), (4097, 700), (300, 299)] * 2
                  if GPU else [(96, 10), (96, 1), (40, 40), (1, 1), (33, 7)])


@pytest.fixture(autouse=True)
def kernels():
    """The ops take the Triton kernels on DEVICE (dry run: interpreted, on CPU tensors)."""
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "triton" if DRY else "auto"}):
        assert use_triton(torch.device(DEVICE), _column_sums_kernel)
        yield


def reference():
    """Within it, the ops take their PyTorch reference on any device."""
    return mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "torch"})


# ---- kernels ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("case", list(SCORE_CASES))
def test_scores_match_reference(case, head_dim, dtype):
    """The Triton score op against the reference on the same inputs (GQA, left padding,
    counted rows, softcap, sinks, the below count): scores fp32 [B, G, N] within fp32
    summation tolerances scaled by sqrt(rows summed), and (no sinks) mass H per counted row."""
    B, H, G, N, Q, pads, counted, softcap, sinks, tau = SCORE_CASES[case]
    gen = torch.Generator(DEVICE).manual_seed(0)
    query = torch.randn(B, H, Q, head_dim, generator=gen, device=DEVICE).to(dtype)
    key = torch.randn(B, N, G, head_dim, generator=gen, device=DEVICE).to(dtype).transpose(1, 2)
    key_mask = None if pads is None else (
        torch.arange(N, device=DEVICE)[None] >= torch.tensor(pads, device=DEVICE)[:, None])
    query_mask = torch.rand(B, Q, generator=gen, device=DEVICE) < counted
    sink = (3 * torch.randn(H, generator=gen, device=DEVICE) + 2).to(dtype) if sinks else None
    args = dict(scaling=head_dim**-0.5, tau=tau, key_mask=key_mask, query_mask=query_mask,
                softcap=softcap, sinks=sink)
    scores, below = accumulate_scores_sparsity(query, key, **args)
    with reference():
        expected, expected_below = accumulate_scores_sparsity(query, key, **args)
    terms = (H // G * Q) ** 0.5
    torch.testing.assert_close(scores, expected, rtol=1.3e-6 * terms, atol=1e-5 * terms)
    probabilities = H // G * Q * N  # borderline probabilities may fall either side of tau
    assert (below - expected_below).abs().max().item() <= 1e-4 * probabilities + 1
    if sink is None:
        assert scores.sum().item() == pytest.approx(H * query_mask.sum().item(), rel=1e-5)


@pytest.mark.parametrize("case", [EDGE_ALL_PADDING, EDGE_CAP_AND_SINKS,
                                  dict(EDGE_CAP_AND_SINKS, D=128, dtype=torch.bfloat16)],
                         ids=["all_padding", "cap_and_sinks", "cap_and_sinks_d128"])
def test_scores_match_float64_oracle(case):
    """Small cases against the float64 dense oracle of tests/test_kernel_scores.py (its
    Triton device is CUDA when there is one)."""
    check_against_dense("triton", case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_compaction_matches_reference(head_dim, dtype):
    """One launch over ragged layers (strided sources as HF's transposed projections, every
    other layer contiguous) equals the reference gather bit for bit; NaN-poisoned
    destinations [B, G, n_l + 64, D] stay untouched beyond n_l."""
    B, G = 2, 8 if GPU else 2
    gen = torch.Generator(DEVICE).manual_seed(0)
    keys, values, keep, dst = [], [], [], []
    for l, (N, n) in enumerate(COMPACT_LAYERS):
        for sources in (keys, values):
            x = torch.randn(B, N, G, head_dim, generator=gen, device=DEVICE).to(dtype)
            sources.append(x.transpose(1, 2) if l % 2 == 0 else x.transpose(1, 2).contiguous())
        order = torch.rand(B, G, N, generator=gen, device=DEVICE).argsort(-1)[..., :n]
        keep.append(order.sort(-1).values)
        dst.append(torch.full((B, G, n + 64, head_dim), float("nan"), dtype=dtype, device=DEVICE))
    dst_keys, dst_values = dst, [d.clone() for d in dst]
    ref_keys, ref_values = [d.clone() for d in dst], [d.clone() for d in dst]
    compact_layers(keys, values, keep, dst_keys, dst_values)
    with reference():
        compact_layers(keys, values, keep, ref_keys, ref_values)
    for l, (_, n) in enumerate(COMPACT_LAYERS):
        for got, want in ((dst_keys[l], ref_keys[l]), (dst_values[l], ref_values[l])):
            assert torch.equal(got[:, :, :n], want[:, :, :n]), f"layer {l}"
            assert got[:, :, n:].isnan().all(), f"layer {l} written beyond its kept rows"


# ---- models ----------------------------------------------------------------------------
def model_of(family: str, dtype: torch.dtype):
    """A random-weight model of ``family`` (families.build with MODEL) on DEVICE."""
    with mock.patch.dict(TINY, MODEL):
        return build(family).to(DEVICE, dtype)


def prompt(n: int, batch: int = 1, pad: int = 0) -> dict:
    """input_ids int64 [batch, n] of ordinary tokens and attention_mask, the last row
    left-padded by ``pad`` tokens."""
    ids = torch.randint(3, 900, (batch, n), generator=torch.Generator().manual_seed(n))
    mask = torch.ones_like(ids)
    mask[-1, :pad], ids[-1, :pad] = 0, 0
    return dict(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE))


def generate(model, inputs: dict, steps: int):
    """Greedy: sequences int64 [B, n + steps] and logits (per step fp32 [B, V])."""
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)


def assert_same_greedy(ref, got, what: str, tol: float) -> None:
    """Same tokens as ``ref`` (generate outputs of one prompt). The logits must agree at
    every step within ``tol`` x the largest logit; the tokens may part only at a near-tie,
    where the reference ranks the two tokens closer than the runs' logits differ (a
    warning; the later steps are not comparable)."""
    start = ref.sequences.shape[1] - len(ref.logits)
    assert got.sequences.shape == ref.sequences.shape, what
    for t, (a, b) in enumerate(zip(ref.logits, got.logits)):
        diff = (a.float() - b.float()).abs().max().item()
        assert diff <= tol * a.float().abs().max().item(), f"{what}: step {t} logits differ by {diff}"
        mine, theirs = ref.sequences[:, start + t], got.sequences[:, start + t]
        if not torch.equal(mine, theirs):
            margin = (a.gather(1, mine[:, None]) - a.gather(1, theirs[:, None])).max().item()
            assert margin <= 2 * diff, f"{what}: step {t} token differs, margin {margin} > {diff}"
            warnings.warn(f"{what}: a near-tie at step {t} (margin {margin:.3g}, logits differ "
                          f"by {diff:.3g}); tokens compared up to there")
            return


@pytest.mark.parametrize("dtype", MODEL_DTYPES, ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["one_row", "padded_batch"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "mistral", "gemma2", "gpt_oss"])
def test_budget_one_is_exact(family, padded, dtype):
    """Budget 1.0 gives the unpatched model's greedy tokens for an appending (SnapKV) and an
    evicting (H2O) policy; at 0.1 the scored layers shrink and nothing is NaN."""
    model = model_of(family, dtype)
    inputs = prompt(PROMPT, *((2, 7) if padded else (1, 0)))
    ref = generate(model, inputs, NEW)
    for name, params in (("snapkv", {"window": 4}), ("h2o", {})):
        with kvpolicy.apply(model, name, budget=1.0, **params):
            assert_same_greedy(ref, generate(model, inputs, NEW), f"{family} {name}", LOGIT_TOL[dtype])
        with kvpolicy.apply(model, name, budget=0.1, **params):
            out = generate(model, inputs, NEW)
        layers = [layer for layer in models.output_cache(out).layers if layer.scored]
        assert all(layer.keys.shape[2] < PROMPT for layer in layers), name
        assert all(step.isfinite().all() for step in out.logits), name


def test_per_layer_compaction():
    """PyramidKV keeps a different count per layer; each layer's kept slots hold exactly
    the prompt's K/V rows (a DynamicCache prefill's) at the plan's indices, their positions,
    and empty slots after them."""
    model = model_of("llama", MODEL_DTYPES[0])
    inputs = prompt(PROMPT, 2)
    with torch.no_grad():
        full = DynamicCache(config=model.config)
        model(**inputs, **{models.CACHE_ARG: full}, use_cache=True)
        with kvpolicy.apply(model, "pyramidkv", budget=0.3, window=4) as handle:
            cache = handle.new_cache(4)
            model(**inputs, **{models.CACHE_ARG: cache}, use_cache=True)
    counts = [keep.shape[-1] for keep in cache.plan.keep]
    assert len(set(counts)) > 1, counts
    for l, (layer, keep) in enumerate(zip(cache.layers, cache.plan.keep)):
        n, D = keep.shape[-1], layer.keys.shape[-1]
        index = keep[..., None].expand(*keep.shape, D)
        assert torch.equal(layer.keys[:, :, :n], full.layers[l].keys.gather(2, index)), l
        assert torch.equal(layer.values[:, :, :n], full.layers[l].values.gather(2, index)), l
        assert torch.equal(layer.pos[:, :, :n], keep) and (layer.pos[:, :, n:] == -1).all(), l


@pytest.mark.parametrize("bits", [4, 2])
def test_quantized_decode_takes_the_fused_kernel(bits):
    """generate with quantized rows (``bits``): on CUDA the decode steps attend them with
    the Triton kernel (kvpolicy_kernels.quantized_attention, the layer's ``_fused`` branch;
    the dry run forces that branch on CPU tensors, interpreted), which gives the reference
    op's tokens and logits (fp32, 1e-4 x the largest logit)."""
    from kvpolicy.layer import KVLayer

    model = model_of("llama", torch.float32)
    inputs = prompt(max(PROMPT, 160))  # 80 kept: 48 rows quantized past the window (key groups of 32 and 16)
    fused = mock.patch.object(KVLayer, "_fused", lambda self, query, observe: self.quantized is not None) \
        if DRY else mock.patch.object(KVLayer, "_fused", KVLayer._fused)
    with fused, kvpolicy.apply(model, "snapkv", budget=0.5, bits=bits):
        out = generate(model, inputs, NEW)
        with reference():
            ref = generate(model, inputs, NEW)
    assert any(layer.quantized is not None for layer in out.past_key_values.layers)
    assert_same_greedy(ref, out, f"bits={bits}", 1e-4)


@pytest.mark.parametrize("policy", ["snapkv", "h2o"])
def test_compiled_decode(policy):
    """apply(compile=True): CUDA graphs (mode "reduce-overhead") on CUDA, inductor on CPU.
    Over COMPILED_STEPS decode steps (H2O's ring rewritten in the graph every step): one
    graph, no graph break, no recompile, no CUDA-graph skip, and eager's tokens (fp32: the
    two runs are the same function, so their logits agree to 1e-4)."""
    model = model_of("llama", torch.float32)
    inputs = prompt(COMPILED_PROMPT)
    with kvpolicy.apply(model, policy, budget=0.1):
        eager = generate(model, inputs, COMPILED_STEPS + 1)  # the prefill gives the first token
    from torch._inductor import config as inductor

    torch._dynamo.reset()
    counters.clear()
    with (kvpolicy.apply(model, policy, budget=0.1, compile=True),
          torch._dynamo.config.patch(error_on_recompile=True),
          inductor.patch({"triton.cudagraph_or_error": True})):  # a skipped CUDA graph raises, saying why
        out = generate(model, inputs, COMPILED_STEPS + 1)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert counters["inductor"]["cudagraph_skips"] == 0
    assert_same_greedy(eager, out, f"compiled {policy}", 1e-4)
