"""Budgets in bytes (kvpolicy.Memory): the rule's choice of bits, the bytes a cache keeps
against the fraction (random tensors), refusals by name, and apply/compress on the
embedded SmolLM2."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvpolicy
from kvpolicy import Budget, Memory, PolicyCache, get_policy
from kvpolicy.memory import FALLBACK_BITS, TOKEN_GROUP, WHOLE, held_fraction, resolve, slot_bytes
from kvpolicy.vllm.config import make_settings
from test_cache import prefill  # tests/ is on sys.path (conftest)

L, B, G, D, WINDOW = 2, 1, 2, 64, 8
SCALARS = ("next_pos", "used", "seen", "sizes")  # a few bytes per layer, not budgeted


def kept_bytes(cache: PolicyCache) -> int:
    """Bytes the layers hold for the prompt: K/V (quantized or not) and positions."""
    return sum(t.nbytes for layer in cache.layers for t in layer.owned()
               if not any(t is getattr(layer, n, None) for n in SCALARS))


def memory_cache(fraction: float, N: int, seed: int = 0) -> tuple[PolicyCache, int]:
    """A uniform(window=8) cache under Memory(fraction) after one random fp32 prompt of N
    tokens (L layers, no decode region) and the full cache's bytes."""
    budget = resolve(Memory(fraction), 4, D, D, WINDOW, evicts=False)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(L, B, 4, N, D, generator=gen)
    k, v = torch.randn(L, B, G, N, D, generator=gen), torch.randn(L, B, G, N, D, generator=gen)
    cache = PolicyCache(L, get_policy("uniform", window=WINDOW), budget, 0, bits=budget.bits)
    prefill(cache, q, k, v, torch.ones(B, N, dtype=torch.bool))
    return cache, k.nbytes + v.nbytes


@settings(max_examples=60, deadline=None)
@given(st.floats(0.01, 1.0), st.sampled_from([1, 2, 4]), st.sampled_from([16, 64, 128]))
def test_rule_keeps_every_token_at_the_widest_bits_else_four(fraction, itemsize, dim):
    b = resolve(Memory(fraction), itemsize, dim, dim, WINDOW, evicts=False)
    extra = slot_bytes(16, itemsize, dim, dim) - 2 * dim * itemsize  # the position
    tokens = {bits: fraction * 2 * dim * itemsize / slot_bytes(bits, itemsize, dim, dim)
              for bits in (16, 8, 4, 2)}
    whole = [bits for bits in WHOLE
             if fraction * 2 * dim * itemsize >= slot_bytes(bits, itemsize, dim, dim) - extra]
    assert b.bits == (whole[0] if whole else FALLBACK_BITS)
    assert b.bits != 2  # never chosen for the user
    assert b.value == pytest.approx(min(1.0, tokens[b.bits]))
    assert resolve(Memory(fraction), itemsize, dim, dim, WINDOW, evicts=True).bits == 16


@settings(max_examples=12, deadline=None)
@given(st.floats(0.1, 1.0), st.integers(32, 64).map(lambda g: g * TOKEN_GROUP), st.integers(0, 2**31 - 1))
def test_bytes_kept_within_the_fraction(fraction, N, seed):
    """The K/V and positions kept for the prompt fit in ``fraction`` of the full cache's
    K/V bytes (prompts long enough for the policy's protected tokens), fill it to within the
    rows the rule sets aside per layer, and are what the eval reports (held_fraction)."""
    cache, full = memory_cache(fraction, N, seed)
    b = cache.budget
    used = kept_bytes(cache)
    assert used <= fraction * full
    slack = B * G * L * (b.slot + b.reserve)
    assert used >= fraction * full - slack or sum(cache.kept) == N * L  # or every token kept
    assert held_fraction(cache, N) == pytest.approx(used / full)


@settings(max_examples=10, deadline=None)
@given(st.floats(0.1, 0.95), st.floats(0.01, 0.3), st.integers(32, 48).map(lambda g: g * TOKEN_GROUP))
def test_more_memory_keeps_more_tokens_and_bytes(fraction, more, N):
    """Monotone: within a bit width the tokens grow with the fraction; the bytes grow up to
    what the larger fraction's fill leaves unspent, a slot and a key group's scales per
    layer and KV head (test_bytes_kept_within_the_fraction): more rows can quantize one
    more row and so hold fewer bytes, but never by more than that."""
    low, _ = memory_cache(fraction, N)
    high, _ = memory_cache(min(1.0, fraction + more), N)
    if low.budget.bits == high.budget.bits:
        assert sum(low.kept) <= sum(high.kept)
    slack = B * G * L * (high.budget.slot + high.budget.reserve)
    assert kept_bytes(low) <= kept_bytes(high) + slack


@pytest.mark.parametrize("fraction", [0.0, 1.5, -0.1, True, "0.1", None])
def test_bad_fractions_are_refused_by_name(fraction):
    with pytest.raises(ValueError, match=r"Memory\("):
        Memory(fraction)


def test_memory_is_refused_where_only_token_budgets_are_served():
    with pytest.raises(ValueError, match=r"Memory\(0.1\).*token budget"):
        Budget(Memory(0.1))
    with pytest.raises(ValueError, match=r"Memory\(0.1\)"):
        make_settings({"policy": "snapkv", "budget": Memory(0.1)}, lambda k: k)


# ---- the embedded model -----------------------------------------------------------------
def test_apply_and_compress_take_memory_budgets(smollm2, long_prompt):
    """SmolLM2 runs in float32: Memory(0.1) stores 4-bit rows (the rule: neither 16 nor 8
    bits keeps every token) and keeps at most a tenth of the full cache's bytes; Memory(1.0)
    is the full cache at 16 bits; bits= with a Memory budget is refused by name and leaves
    the model unpatched."""
    model, _ = smollm2
    ids = long_prompt["input_ids"].repeat(1, 4)  # ~1.7k tokens: room beyond the recent rows
    with pytest.raises(ValueError, match=r"bits=4 with budget=Memory\(0.1\)"):
        kvpolicy.apply(model, "snapkv", kvpolicy.Memory(0.1), bits=4)
    assert "generate" not in vars(model)
    try:
        full = kvpolicy.compress(model, ids, "snapkv", 1.0)
        tenth = kvpolicy.compress(model, ids, "snapkv", kvpolicy.Memory(0.1))
    finally:
        kvpolicy.detach(model)
    assert tenth.budget.bits == 4 and all(layer.bits == 4 for layer in tenth.layers)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert 0.05 * full_bytes <= kept_bytes(tenth) <= 0.1 * full_bytes
    with kvpolicy.apply(model, "snapkv", kvpolicy.Memory(1.0)) as handle:
        assert handle.bits == 16 and "Memory(1)" in repr(handle)
        with torch.no_grad():
            out = model.generate(**long_prompt, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == long_prompt["input_ids"].shape[1] + 4
