"""streamingllm(positions="cache"): StreamingLLM's positions inside the cache, against a
reference written here from the paper's rule (Xiao et al., 2024, section 3.2: "when
determining the relative distance and adding positional information to tokens,
StreamingLLM focuses on positions within the cache rather than those in the original
text"; the authors' code caches keys before the rotary and rotates the cache at
0 .. len - 1 each step), on a tiny Llama whose context window the generation exceeds."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvpolicy
from kvpolicy.models import UnsupportedModelError

MAX_POSITIONS, SIZE, SINKS, PROMPT, NEW = 32, 12, 4, 20, 100


def tiny_llama(**config):
    """A random 2-layer Llama with sharp attention (q and k scaled), so that positions
    change its outputs; float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=128, max_position_embeddings=MAX_POSITIONS)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **config})).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model


def reference_logits(model, tokens: list[int], prompt: int, size: int, sinks: int) -> torch.Tensor:
    """[T, V] logits predicting tokens[prompt:] by the paper's rule, teacher-forced (the first
    ``prompt`` of them in one forward): every layer caches un-rotated keys and values; the
    cache keeps the first ``sinks`` tokens and the most recent ones, ``size - 1`` in all
    before a new token joins; attention rotates the cached keys at 0 .. n - 1 and the query
    at its own index in the cache."""
    m = model.model
    cache = [([], []) for _ in m.layers]  # per layer: un-rotated keys, values [1, G, 1, D] each
    out = []
    steps = [tokens[:prompt]] + [[t] for t in tokens[prompt:-1]]
    with torch.no_grad():
        for step in steps:
            h = m.embed_tokens(torch.tensor([step]))
            for l, layer in enumerate(m.layers):
                attn, x = layer.self_attn, layer.input_layernorm(h)
                B, T, _ = x.shape
                D = attn.head_dim
                q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)
                k = attn.k_proj(x).view(B, T, -1, D).transpose(1, 2)
                v = attn.v_proj(x).view(B, T, -1, D).transpose(1, 2)
                keys, values = cache[l]
                keys += list(k.split(1, 2))
                values += list(v.split(1, 2))
                n = len(keys)
                K, V = torch.cat(keys, 2), torch.cat(values, 2)
                cos, sin = m.rotary_emb(x, torch.arange(n)[None])  # positions inside the cache
                K = apply_rotary_pos_emb(K, K, cos, sin)[0]
                q = apply_rotary_pos_emb(q, q, cos[:, n - T:], sin[:, n - T:])[0]
                groups = q.shape[1] // K.shape[1]
                K, V = K.repeat_interleave(groups, 1), V.repeat_interleave(groups, 1)
                logits = q @ K.transpose(-1, -2) * attn.scaling
                causal = torch.ones(T, n, dtype=torch.bool).tril(n - T)
                probs = logits.masked_fill(~causal, -torch.inf).softmax(-1)
                o = (probs @ V).transpose(1, 2).reshape(B, T, -1)
                h = h + attn.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
                if n > size - 1:  # evict for the next token: sinks + the most recent
                    cache[l] = (keys[:sinks] + keys[n - (size - 1 - sinks):],
                                values[:sinks] + values[n - (size - 1 - sinks):])
            out.append(model.lm_head(m.norm(h))[0, -1])
    return torch.stack(out)


def policy_logits(handle, model, tokens: list[int], prompt: int) -> torch.Tensor:
    """[T, V] logits of ``model`` under ``handle``'s policy, teacher-forced on ``tokens``."""
    cache = handle.new_cache(len(tokens) - prompt)
    out = []
    with torch.no_grad():
        out.append(model(input_ids=torch.tensor([tokens[:prompt]]), past_key_values=cache).logits[0, -1])
        for t in tokens[prompt:-1]:
            out.append(model(input_ids=torch.tensor([[t]]), past_key_values=cache).logits[0, -1])
    return torch.stack(out)


def test_streaming_past_the_context_window_matches_the_papers_rule():
    model = tiny_llama()
    tokens = torch.randint(3, 128, (PROMPT + NEW,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = reference_logits(model, tokens, PROMPT, SIZE, SINKS)
    positions = []  # every position id the model's rotary is asked for
    model.model.rotary_emb.register_forward_pre_hook(
        lambda mod, args, kwargs: positions.append(kwargs["position_ids"]), with_kwargs=True)
    with kvpolicy.apply(model, "streamingllm", SIZE, positions="cache") as handle:
        got = policy_logits(handle, model, tokens, PROMPT)
        assert PROMPT + NEW > 3 * MAX_POSITIONS
        assert max(int(p.max()) for p in positions) < MAX_POSITIONS
        decode_positions = torch.cat([p.flatten() for p in positions[-NEW + 1:]])
        assert decode_positions.tolist() == [SIZE - 1] * (NEW - 1)  # the cache is full
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    with kvpolicy.apply(model, "streamingllm", SIZE) as handle:  # original positions differ
        assert (policy_logits(handle, model, tokens, PROMPT) - expected).abs().max() > 1e-2


def test_generate_streams_past_the_context_window():
    model = tiny_llama()
    ids = torch.randint(3, 128, (2, PROMPT), generator=torch.Generator().manual_seed(2))
    with kvpolicy.apply(model, "streamingllm", SIZE, positions="cache"), torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             return_dict_in_generate=True, output_logits=True)
    assert out.sequences.shape == (2, PROMPT + NEW)
    tokens = out.sequences[0].tolist()
    expected = reference_logits(model, tokens, PROMPT, SIZE, SINKS)
    torch.testing.assert_close(torch.stack(out.logits)[:, 0], expected, atol=2e-5, rtol=1e-5)


def test_budget_one_with_cache_positions_is_the_unpatched_model_within_the_window():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
        with kvpolicy.apply(model, "streamingllm", 1.0, positions="cache"):
            assert torch.equal(model.generate(input_ids=ids, max_new_tokens=8, do_sample=False), plain)


@pytest.mark.parametrize("config, why", [
    (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)), "rotary type is 'linear'"),
    (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8), "sliding-window"),
])
def test_cache_positions_are_refused_where_they_cannot_be_exact(config, why):
    model = tiny_llama(**config)
    attn = model.config._attn_implementation
    with pytest.raises(UnsupportedModelError, match=why):
        kvpolicy.apply(model, "streamingllm", SIZE, positions="cache")
    assert model.config._attn_implementation == attn and not hasattr(model, "_kvpolicy_handle")


def test_cache_positions_are_refused_for_families_without_llamas_rotary():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).eval()
    with pytest.raises(UnsupportedModelError, match=r"GPT2LMHeadModel \(gpt2\).*positions='original'"):
        kvpolicy.apply(model, "streamingllm", SIZE, positions="cache")


def test_cache_positions_refuse_what_would_leave_the_window():
    model = tiny_llama()
    with kvpolicy.apply(model, "streamingllm", 0.5, positions="cache"):
        with pytest.raises(ValueError, match="exceed the model's 32"):  # 0.5 x (20 + 60) > 32
            model.generate(input_ids=torch.ones(1, PROMPT, dtype=torch.long), max_new_tokens=60)
    with pytest.raises(ValueError, match="compile=False"):
        kvpolicy.apply(model, "streamingllm", SIZE, positions="cache", compile=True)
    with pytest.raises(ValueError, match="positions must be"):
        kvpolicy.get_policy("streamingllm", positions="text")
