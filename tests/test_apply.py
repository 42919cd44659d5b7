"""End-to-end: kvpolicy.apply on the embedded SmolLM2 (a real trained Llama-family model)."""
import pytest
import torch

import kvpolicy
from kvpolicy.tools.embedded import chat_prompt
from kvpolicy.registry import UnknownPolicyError

NEW_TOKENS = 30  # as conftest's reference_tokens (tests/vllm has a conftest too, so no import by name)

BUILT_IN = ["h2o", "prefixkv", "pyramidkv", "snapkv", "streamingllm", "uniform", "vlcache"]


def greedy(model, inputs, new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, **kwargs)


def full_prompt_kv_bytes(model, batch: int, tokens: int) -> int:
    """Bytes of a full cache holding ``tokens`` prompt tokens (K and V, every layer)."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * batch * c.num_key_value_heads * tokens * head_dim * model.dtype.itemsize


@pytest.mark.parametrize("policy", BUILT_IN)
def test_budget_one_is_token_identical(smollm2, long_prompt, reference_tokens, policy):
    model, _ = smollm2
    with kvpolicy.apply(model, policy, 1.0):
        out = greedy(model, long_prompt)
    assert torch.equal(out, reference_tokens)


@pytest.mark.parametrize("policy", ["vlcache", "h2o"])
def test_budget_tenth_owns_a_tenth_of_the_bytes(smollm2, long_prompt, policy):
    model, _ = smollm2
    B, N = long_prompt["input_ids"].shape
    with kvpolicy.apply(model, policy, 0.1):
        out = greedy(model, long_prompt, new_tokens=2, return_dict_in_generate=True)
    cache = out.past_key_values
    assert isinstance(cache, kvpolicy.PolicyCache)
    assert cache.nbytes() <= 0.11 * full_prompt_kv_bytes(model, B, N)
    assert [layer.keys.shape[-2] for layer in cache.layers] == cache.plan.capacity  # full K/V gone


def test_batch_with_left_padding(smollm2):
    model, tok = smollm2
    tok.padding_side = "left"
    short = chat_prompt(tok, 60, "What is this text about?")["input_ids"][0]
    long = chat_prompt(tok, 110, "What is this text about?")["input_ids"][0]
    pad = len(long) - len(short)
    ids = torch.stack([torch.cat([torch.full((pad,), tok.pad_token_id or 0), short]), long])
    inputs = {"input_ids": ids, "attention_mask": (torch.arange(len(long)) >= torch.tensor([[pad], [0]])).long()}
    reference = greedy(model, inputs, new_tokens=12)
    with kvpolicy.apply(model, "uniform", 1.0):
        assert torch.equal(greedy(model, inputs, new_tokens=12), reference)
    for policy in ("h2o", "prefixkv"):
        with kvpolicy.apply(model, policy, 0.1):
            out = greedy(model, inputs, new_tokens=12, return_dict_in_generate=True)
        cache = out.past_key_values
        for keep in cache.plan.keep:
            assert bool((keep[0] >= pad).all()), "a padding position was kept"
        valid = torch.stack([(layer.pos >= 0).sum(-1) for layer in cache.layers])  # [L, B, G]
        assert valid.min() > 0
        assert out.sequences.shape == (2, len(long) + 12)


def test_remove_restores_the_model_exactly(smollm2, long_prompt, reference_tokens):
    model, _ = smollm2
    kvpolicy.detach(model)  # from the unpatched model (an earlier test may have compressed with it)
    generate, attn = model.generate, model.config._attn_implementation
    hooks = dict(model._forward_pre_hooks)
    handle = kvpolicy.apply(model, "snapkv", 0.1)
    assert model.config._attn_implementation == "kvpolicy"
    assert model.generate.__wrapped__ == generate
    handle.remove()
    assert model.config._attn_implementation == attn
    assert model.generate == generate and "generate" not in vars(model)
    assert dict(model._forward_pre_hooks) == hooks and not hasattr(model, "_kvpolicy_handle")
    assert torch.equal(greedy(model, long_prompt), reference_tokens)


@pytest.mark.parametrize("args, kwargs, error", [
    (("nope",), {}, UnknownPolicyError),
    (("h2o",), {"heavy_ratio": 2.0}, ValueError),
    (("h2o",), {"nonsense": 1}, TypeError),
    (("snapkv", 1.5), {}, ValueError),
    (("snapkv", 8), {}, ValueError),  # fewer tokens per layer than its 32-token window
    (("snapkv", 0.1), {"compile": "yes"}, TypeError),
])
def test_bad_input_leaves_the_model_unpatched(smollm2, args, kwargs, error):
    model, _ = smollm2
    attn = model.config._attn_implementation
    with pytest.raises(error):
        kvpolicy.apply(model, *args, **kwargs)
    assert model.config._attn_implementation == attn and "generate" not in vars(model)


def test_applying_twice_is_an_error(smollm2):
    model, _ = smollm2
    with kvpolicy.apply(model, "uniform", 0.5):
        with pytest.raises(RuntimeError, match="already applied"):
            kvpolicy.apply(model, "h2o", 0.1)
        assert model.config._attn_implementation == "kvpolicy"
    assert "generate" not in vars(model)


def test_unsupported_models_are_rejected():
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=32, vocab_size=64))
    with pytest.raises(kvpolicy.models.UnsupportedModelError):
        kvpolicy.apply(bert, "h2o", 0.1)
    with pytest.raises(kvpolicy.models.UnsupportedModelError):
        kvpolicy.apply(torch.nn.Linear(2, 2), "h2o", 0.1)


def test_foreign_cache_is_rejected(smollm2, long_prompt):
    from transformers import DynamicCache

    model, _ = smollm2
    with kvpolicy.apply(model, "uniform", 0.5):
        with pytest.raises(TypeError, match="PolicyCache"):
            greedy(model, long_prompt, new_tokens=1, past_key_values=DynamicCache())


def test_attention_that_cannot_switch_is_rejected(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    monkeypatch.setattr(LlamaForCausalLM, "_can_set_attn_implementation", classmethod(lambda cls: False))
    with pytest.raises(kvpolicy.models.UnsupportedModelError, match="LlamaForCausalLM computes attention itself"):
        kvpolicy.apply(model, "h2o", 0.1)
    assert model.config._attn_implementation == "sdpa" and "generate" not in vars(model)
