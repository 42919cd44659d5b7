"""The prompt pass of a policy that counts every query (H2O, PrefixKV) below budget 1:
kvpolicy computes the attention itself, its output and the keys' scores from the same
probabilities (kvpolicy_kernels.attention_and_scores). Checked: the plan equals one built
from the model's own eager attention, the path is taken only there (budget 1 runs the
model's SDPA and stays token-exact), and a padded batch plans as the SDPA path does."""
import pytest
import torch

import kvpolicy
import kvpolicy.prefill
from kvpolicy.prefill import PromptObserver
from kvpolicy import Budget, Stats, get_policy
from test_defer import eager_attention
from tiny_lm import ids, llama  # tests/ is on sys.path (conftest)


@pytest.fixture(scope="module")
def tiny():
    return llama()


@pytest.fixture
def one_pass_calls(monkeypatch):
    """The number of layer calls that went through attention_and_scores."""
    calls = []
    fused = kvpolicy.prefill.attention_and_scores

    def counted(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)
    monkeypatch.setattr(kvpolicy.prefill, "attention_and_scores", counted)
    return calls


@pytest.mark.parametrize("policy", ["h2o", "prefixkv"])
def test_one_pass_plan_equals_the_plan_from_eager_attention(tiny, one_pass_calls, policy):
    N, new, budget = 70, 6, Budget(0.3)
    prompt = ids(N, 5)
    with kvpolicy.apply(tiny, policy, budget.value) as handle, torch.no_grad():
        cache = handle.new_cache(new)
        tiny(prompt, past_key_values=cache, use_cache=True)
    assert len(one_pass_calls) == tiny.config.num_hidden_layers
    heads = tiny.config.num_attention_heads // tiny.config.num_key_value_heads
    attn = torch.stack([a.sum(1).view(-1, heads, N).sum(1)
                        for a in eager_attention(tiny, prompt)])[:, None]  # [L, 1, G, N]
    ones = torch.ones(1, N, dtype=torch.bool)
    expected = get_policy(policy).plan(Stats(attn, ones, ones, heads, max_new_tokens=new), budget)
    assert cache.plan.kept == expected.kept
    for l, (got, want) in enumerate(zip(cache.plan.keep, expected.keep)):
        assert torch.equal(got, want)
        scores = cache.layers[l].scores  # an evicting layer carries the kept slots' scores
        if scores is not None:
            torch.testing.assert_close(scores[..., :got.shape[-1]], attn[l].gather(-1, got),
                                       rtol=1e-5, atol=1e-5)


def test_budget_one_runs_the_models_sdpa_and_stays_exact(tiny, one_pass_calls):
    prompt = ids(50, 6)
    with torch.no_grad():
        ref = tiny.generate(prompt, max_new_tokens=8, do_sample=False)
        with kvpolicy.apply(tiny, "h2o", 1.0):
            out = tiny.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref) and not one_pass_calls


def test_padded_batch_plans_as_the_sdpa_path(tiny, one_pass_calls, monkeypatch):
    """A left-padded batch: the one pass keeps the same slots as SDPA followed by the score op."""
    short, long = ids(40, 7), ids(55, 8)
    batch = torch.cat([torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1), long])
    mask = (batch != 0).long()

    def plan():
        with kvpolicy.apply(tiny, "h2o", 0.3) as handle, torch.no_grad():
            cache = handle.new_cache(4)
            tiny(batch, attention_mask=mask, past_key_values=cache, use_cache=True)
        return cache.plan, [layer.scores for layer in cache.layers]
    one_pass, one_pass_scores = plan()
    assert len(one_pass_calls) == tiny.config.num_hidden_layers
    opened = PromptObserver.__init__

    def sdpa_path(observer, *args):
        opened(observer, *args)
        observer.one_pass = False
    monkeypatch.setattr(PromptObserver, "__init__", sdpa_path)
    two_passes, two_passes_scores = plan()
    assert len(one_pass_calls) == tiny.config.num_hidden_layers
    assert one_pass.kept == two_passes.kept
    for got, want in zip(one_pass.keep, two_passes.keep):
        assert torch.equal(got, want)
    for got, want in zip(one_pass_scores, two_passes_scores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
