"""kvpolicy_kernels.quantized_cpu (the C kernel of eager CPU decode over quantized rows)
against its twin, QuantizedRows.dequantize (ATen): equal rows on random ragged shapes, the
buffer around them untouched; the backend switch; a build that fails warns once and leaves
the ATen path; inputs it cannot read are refused by name."""
import os
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvpolicy.quantized import TOKEN_GROUP, QuantizedRows, Scratch
from kvpolicy_kernels import quantized_cpu


def _into(rows: QuantizedRows, before: int, after: int):
    """The kernel's rows written into slices of a NaN-filled [B, G, before + N + after, D]
    buffer: (keys, values, the key and value buffers)."""
    B, G, _, D = rows.keys.shape
    N, Dv = rows.rows, rows.values.shape[-1]
    kbuf = torch.full((B, G, before + N + after, D), torch.nan)
    vbuf = torch.full((B, G, before + N + after, Dv), torch.nan)
    k, v = kbuf[:, :, before:before + N], vbuf[:, :, before:before + N]
    quantized_cpu.dequantize_rows(rows.keys, rows.key_scale, rows.key_zero, k, bits=rows.bits,
                                   per_token=False, group=TOKEN_GROUP)
    quantized_cpu.dequantize_rows(rows.values, rows.value_scale, rows.value_zero, v,
                                   bits=rows.bits, per_token=True,
                                   group=Dv // rows.value_scale.shape[-1])
    return k, v, kbuf, vbuf


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([8, 4, 2]), st.integers(1, 2), st.integers(1, 3), st.integers(1, 90),
       st.sampled_from([8, 24, 32, 64, 80]), st.integers(0, 5), st.integers(0, 5),
       st.integers(0, 2**31 - 1))
def test_kernel_equals_aten_on_ragged_shapes(bits, B, G, units, D, before, after, seed):
    """Rows of any count (whole key groups, a partial last one), dims whose value groups are
    1 to 32 channels, batch and heads: exactly the ATen rows, nothing written around them."""
    assert quantized_cpu.usable(torch.empty(0))
    gen = torch.Generator().manual_seed(seed)
    N = units * 8 // bits
    keys = torch.randn(B, G, N, D, generator=gen) * 4 + 1
    values = torch.randn(B, G, N, D, generator=gen) * 0.5
    rows = QuantizedRows.quantize(keys, values, bits)
    k, v, kbuf, vbuf = _into(rows, before, after)
    want_k, want_v = rows.dequantize()
    assert torch.equal(k, want_k) and torch.equal(v, want_v)
    assert kbuf[:, :, :before].isnan().all() and kbuf[:, :, before + N:].isnan().all()
    assert vbuf[:, :, :before].isnan().all() and vbuf[:, :, before + N:].isnan().all()


def test_backend_torch_and_other_dtypes_take_aten():
    """KVPOLICY_BACKEND=torch keeps the ATen path; so do rows not in float32."""
    with mock.patch.dict(os.environ, {"KVPOLICY_BACKEND": "torch"}):
        assert not quantized_cpu.usable(torch.empty(0))
    assert not quantized_cpu.usable(torch.empty(0, dtype=torch.bfloat16))
    assert quantized_cpu.usable(torch.empty(0))


def test_a_failed_build_warns_once_and_decodes_through_aten(tmp_path, monkeypatch):
    """No compiler: one RuntimeWarning naming why, then the ATen path, the same rows."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("KVPOLICY_CACHE_DIR", str(tmp_path))
    quantized_cpu._library.cache_clear()
    quantized_cpu._warn.cache_clear()
    try:
        rows = QuantizedRows.quantize(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), 4)
        tail = torch.randn(1, 2, 3, 16)
        with pytest.warns(RuntimeWarning, match="no-such-cc.*ATen path"):
            got = Scratch().rows(rows, tail, tail)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            Scratch().rows(rows, tail, tail)  # warned once
        want = rows.joined(tail, tail)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        with pytest.raises(RuntimeError, match="not available"):
            _into(rows, 0, 0)
    finally:
        quantized_cpu._library.cache_clear()
        quantized_cpu._warn.cache_clear()


def test_unreadable_inputs_are_refused():
    rows = QuantizedRows.quantize(torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16), 4)
    out = torch.empty(1, 2, 40, 16)
    with pytest.raises(ValueError, match="scale must be contiguous float32"):
        quantized_cpu.dequantize_rows(rows.keys, rows.key_scale.double(), rows.key_zero, out,
                                       bits=4, per_token=False, group=TOKEN_GROUP)
    with pytest.raises(ValueError, match="out must be float32"):
        quantized_cpu.dequantize_rows(rows.keys, rows.key_scale, rows.key_zero,
                                       torch.empty(1, 2, 16, 40).transpose(2, 3), bits=4,
                                       per_token=False, group=TOKEN_GROUP)
    with pytest.raises(ValueError, match="packed must be contiguous uint8"):
        quantized_cpu.dequantize_rows(rows.keys.transpose(2, 3), rows.key_scale, rows.key_zero,
                                       out, bits=4, per_token=False, group=TOKEN_GROUP)
