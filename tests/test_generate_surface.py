"""generate's whole surface under kvpolicy, on a tiny random Llama: length arguments,
refused options, padded batches whose rows are independent, parameter validation."""
import numpy as np
import pytest
import torch

import kvpolicy
from kvpolicy.models import UnsupportedModelError
from tiny_lm import ids, llama  # tests/ is on sys.path (conftest)

POLICIES = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv", "h2o", "streamingllm"]
SMALL = {"snapkv": dict(window=4), "pyramidkv": dict(window=4), "spankv": dict(window=4)}


@pytest.fixture(scope="module")
def tiny():
    return llama()


def test_length_arguments(tiny):
    prompt = ids(30)
    with kvpolicy.apply(tiny, "snapkv", 0.5, window=4), torch.no_grad():
        assert tiny.generate(prompt, max_length=36, do_sample=False).shape[1] == 36
        assert tiny.generate(inputs=prompt, max_new_tokens=3, do_sample=False).shape[1] == 33
        short = ids(8)
        out = tiny.generate(short, do_sample=False, return_dict_in_generate=True)  # 20 new tokens
        assert out.sequences.shape[1] == 28 and out.past_key_values.max_new_tokens == 20


@pytest.mark.parametrize("option, value", [
    ("use_cache", False), ("cache_implementation", "static"), ("num_beams", 2),
    ("num_return_sequences", 2), ("prompt_lookup_num_tokens", 3)])
def test_unsupported_generate_options_are_named(tiny, option, value):
    with kvpolicy.apply(tiny, "h2o", 0.5):
        with pytest.raises(ValueError, match=f"generate\\({option}="):
            tiny.generate(ids(20), max_new_tokens=2, **{option: value})


def test_chunked_prefill_with_compile_is_refused(tiny):
    with kvpolicy.apply(tiny, "h2o", 0.5, compile=True):
        with pytest.raises(ValueError, match="prefill_chunk_size"):
            tiny.generate(ids(20), max_new_tokens=2, prefill_chunk_size=8)


@pytest.mark.parametrize("name", POLICIES)
def test_batch_rows_are_independent(tiny, name):
    """Each row of a left-padded batch keeps budget of its own prompt: its kept positions
    and tokens equal the same prompt run alone."""
    lengths = [40, 25, 12]
    rows = [ids(n, seed=n) for n in lengths]
    width = max(lengths)
    batch = torch.cat([torch.cat([torch.zeros(1, width - r.shape[1], dtype=torch.long), r], 1) for r in rows])
    mask = torch.cat([(torch.arange(width) >= width - r.shape[1]).long()[None] for r in rows])
    with kvpolicy.apply(tiny, name, 0.3, **SMALL.get(name, {})), torch.no_grad():
        together = tiny.generate(batch, attention_mask=mask, max_new_tokens=5, do_sample=False,
                                 return_dict_in_generate=True)
        for b, r in enumerate(rows):
            alone = tiny.generate(r, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
            assert torch.equal(together.sequences[b, -5:], alone.sequences[0, -5:]), b
            for got, want in zip(together.past_key_values.layers, alone.past_key_values.layers):
                mine = got.pos[b][got.pos[b] >= 0]
                theirs = want.pos[0][want.pos[0] >= 0]
                assert torch.equal(mine.sort().values, theirs.sort().values), b


@pytest.mark.parametrize("name, params, error", [
    ("snapkv", dict(window=0), ValueError), ("snapkv", dict(window=-3), ValueError),
    ("snapkv", dict(window=2.5), TypeError), ("streamingllm", dict(sinks=-1), ValueError),
    ("uniform", dict(window=True), TypeError)])
def test_policy_parameters_are_validated_before_the_model_is_touched(tiny, name, params, error):
    with pytest.raises(error):
        kvpolicy.apply(tiny, name, 0.5, **params)
    assert tiny.config._attn_implementation != "kvpolicy"


@pytest.mark.parametrize("policy", [None, kvpolicy.Policy, 3])
def test_policy_must_be_a_name_or_instance(tiny, policy):
    with pytest.raises(TypeError, match="policy"):
        kvpolicy.apply(tiny, policy, 0.5)


@pytest.mark.parametrize("budget", [np.float32(0.25), torch.tensor(0.25), np.int64(16), torch.tensor(16)])
def test_numpy_and_torch_scalar_budgets_are_numbers(tiny, budget):
    with kvpolicy.apply(tiny, "h2o", budget) as handle:
        assert handle.budget.value in (0.25, 16) and type(handle.budget.value) in (float, int)


def test_removed_handle_cannot_be_reentered(tiny):
    handle = kvpolicy.apply(tiny, "h2o", 0.5)
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        with handle:
            pass


def test_kept_before_prefill_is_a_clear_error(tiny):
    with kvpolicy.apply(tiny, "h2o", 0.5) as handle:
        with pytest.raises(RuntimeError, match="no prompt"):
            handle.new_cache(4).kept


def test_mla_is_refused_before_the_model_is_touched():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM(DeepseekV3Config(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
        kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        vocab_size=100, first_k_dense_replace=1))
    with pytest.raises(UnsupportedModelError, match="DeepseekV3ForCausalLM caches multi-head latent"):
        kvpolicy.apply(model, "snapkv", 0.5)
    assert model.config._attn_implementation != "kvpolicy"


@pytest.mark.parametrize("name", kvpolicy.models.CACHE_ARGS)
def test_either_cache_keyword_reaches_the_policy(tiny, name):
    """transformers 5.25 renamed past_key_values to cache; a PolicyCache passed under either
    name (to generate, or to a hand-written forward) is compressed and continues exactly as
    under the installed release's own name."""
    prompt, turn = ids(24), ids(5, seed=1)
    with kvpolicy.apply(tiny, "snapkv", 0.5, window=4) as handle, torch.no_grad():
        first = tiny.generate(prompt, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        cache = kvpolicy.models.output_cache(first)
        assert max(cache.kept) < 24
        follow = torch.cat([first.sequences, turn], -1)
        expected = tiny.generate(follow, max_new_tokens=3, do_sample=False,
                                 **{kvpolicy.models.CACHE_ARG: cache.copy()})
        got = tiny.generate(follow, max_new_tokens=3, do_sample=False, **{name: cache.copy()})
        assert torch.equal(got, expected)
        manual = handle.new_cache(2)
        tiny(input_ids=prompt, use_cache=True, **{name: manual})
        assert manual.kept == cache.kept  # the hooks ran: same plan as generate's prefill


def test_the_cache_passed_under_both_names_is_an_error(tiny):
    with kvpolicy.apply(tiny, "snapkv", 0.5, window=4) as handle, torch.no_grad():
        cache = handle.new_cache(2)
        with pytest.raises(TypeError, match="not both"):
            tiny.generate(ids(24), max_new_tokens=2, cache=cache, past_key_values=cache)
