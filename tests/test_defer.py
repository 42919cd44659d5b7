"""Deferred compaction (a policy's ``defer = k``): generate runs its first k decode steps on
the whole prompt, then the policy plans with the prompt's counted queries and those k
decoded tokens as queries. Checked against a plan built from the model's own eager
attention, exact at budget 1.0, compacted whenever generate ends, refused where it cannot
run."""
import pytest
import torch
from torch._dynamo.utils import counters
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.configuration_utils import CompileConfig

import kvpolicy
from kvpolicy import Budget, Stats, get_policy
from kvpolicy.policies import SnapKV
from tiny_lm import ids, llama  # tests/ is on sys.path (conftest)


@pytest.fixture(scope="module")
def tiny():
    return llama()


@pytest.mark.parametrize("policy", ["snapkv", "spankv"])
def test_defer_at_full_budget_is_exact(tiny, policy):
    prompt = torch.cat([ids(40, 1), ids(40, 2)])
    mask = torch.ones_like(prompt)
    mask[1, :7] = 0  # a left-padded row
    with torch.no_grad():
        ref = tiny.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False)
        with kvpolicy.apply(tiny, policy, 1.0, window=4, defer=3):
            out = tiny.generate(prompt, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(out, ref)


def eager_attention(model, seq: torch.Tensor) -> list[torch.Tensor]:
    """Per layer float32 [H, T, T]: the unpatched model's attention probabilities."""
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(seq, output_attentions=True)
    finally:
        model.set_attn_implementation(attn)
    return [a[0].float() for a in out.attentions]


def test_deferred_plan_counts_the_prompt_window_and_the_decoded_queries(tiny):
    N, k, new, window, budget = 60, 3, 8, 4, Budget(0.3)
    prompt = ids(N, 3)
    with kvpolicy.apply(tiny, "snapkv", budget.value, window=window, defer=k), torch.no_grad():
        out = tiny.generate(prompt, max_new_tokens=new, do_sample=False, return_dict_in_generate=True)
    cache = out.past_key_values
    # at the resume the cache holds the prompt and the k decode steps' inputs
    seq = out.sequences[:, :N + k]
    counted = torch.zeros(N + k, dtype=torch.bool)
    counted[N - window:] = True  # the prompt's observation window, then the decoded tokens
    heads = tiny.config.num_attention_heads // tiny.config.num_key_value_heads
    attn = torch.stack([a[:, counted].sum(1).view(-1, heads, N + k).sum(1)
                        for a in eager_attention(tiny, seq)])[:, None]  # [L, 1, G, N + k]
    ones = torch.ones(1, N + k, dtype=torch.bool)
    stats = Stats(attn, counted[None], ones, heads, max_new_tokens=new - k, num_seen=N + k)
    expected = SnapKV(window=window, defer=k).plan(stats, budget)
    assert cache.pending is None and cache.plan.kept == expected.kept
    for got, want in zip(cache.plan.keep, expected.keep):
        assert torch.equal(got, want)
    for layer, cap in zip(cache.layers, expected.capacity):
        assert layer.keys.shape[2] == cap and layer.scores is None


class StopAfter(StoppingCriteria):
    def __init__(self, calls: int):
        self.calls = calls

    def __call__(self, input_ids, scores, **kwargs):
        self.calls -= 1
        return torch.tensor([self.calls <= 0])


def test_generate_ending_before_the_deferred_steps_still_compacts(tiny):
    prompt = ids(80, 4)
    with kvpolicy.apply(tiny, "snapkv", 0.25, window=4, defer=6), torch.no_grad():
        out = tiny.generate(prompt, max_new_tokens=20, do_sample=False, return_dict_in_generate=True,
                            stopping_criteria=StoppingCriteriaList([StopAfter(2)]))
        cache = out.past_key_values
        assert out.sequences.shape[1] == 82 and cache.pending is None
        assert max(cache.kept) < 40  # compacted to 0.25 of the 81 tokens it held
        # a new turn continues the compacted cache
        more = torch.cat([out.sequences, ids(10, 5)], -1)
        again = tiny.generate(more, past_key_values=cache, max_new_tokens=4, do_sample=False)
    assert again.shape[1] == 96 and cache.pending is None


def test_a_manual_loop_compacts_after_the_deferred_steps(tiny):
    prompt = ids(50, 6)
    with kvpolicy.apply(tiny, "snapkv", 0.2, window=4, defer=2) as handle, torch.no_grad():
        cache = handle.new_cache(5)
        logits = tiny(prompt, past_key_values=cache, use_cache=True).logits
        assert cache.pending is not None and cache.layers[0].keys.shape[2] == 50 + 5
        for _ in range(2):
            token = logits[:, -1:].argmax(-1)
            logits = tiny(token, past_key_values=cache, use_cache=True).logits
    assert cache.pending is None and max(cache.kept) < 20


def test_compiled_decode_runs_the_deferred_steps_eagerly_then_one_graph(tiny):
    prompt = ids(70, 7)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    with kvpolicy.apply(tiny, "snapkv", 0.2, window=4, defer=3), torch.no_grad():
        eager = tiny.generate(prompt, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    traced = CompileConfig(fullgraph=True, dynamic=False, backend="eager")  # graphs, no codegen
    traced._compile_all_devices = True
    with kvpolicy.apply(tiny, "snapkv", 0.2, window=4, defer=3, compile=True), torch.no_grad(), \
            torch._dynamo.config.patch(error_on_recompile=True):
        out = tiny.generate(prompt, compile_config=traced, **kwargs)
    assert torch.equal(out, eager)
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    assert "get_compiled_call" not in vars(tiny)  # removed with the handle


def test_defer_is_refused_where_it_cannot_run(tiny):
    attn = tiny.config._attn_implementation
    with pytest.raises(ValueError, match="defer must be >= 0"):
        get_policy("spankv", defer=-1)

    class EvictingDeferral(type(get_policy("h2o"))):
        defer = 2

    with pytest.raises(ValueError, match="defer needs an append-only policy"):
        kvpolicy.apply(tiny, EvictingDeferral(), 0.1)
    assert tiny.config._attn_implementation == attn and not hasattr(tiny, "_kvpolicy_handle")
