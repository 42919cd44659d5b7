"""Fuzzing generate under kvpolicy: random family, prompt length, padded batch, policy,
budget and max_new_tokens (1-20: transformers refuses 0). Never a crash but a documented error, never NaN, budget 1.0
always token-identical to the unpatched model.

CI runs a small sample; the nightly-style run takes 1,000 cases per property:
``KVPOLICY_FUZZ_EXAMPLES=1000 pytest -m fuzz tests/test_fuzz.py``."""
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvpolicy
from families import build

EXAMPLES = int(os.environ.get("KVPOLICY_FUZZ_EXAMPLES", "12"))
FAMILIES = ["llama", "mistral", "gemma2", "gpt_oss", "qwen2", "gpt2"]
POLICIES = ["uniform", "snapkv", "pyramidkv", "prefixkv", "vlcache", "spankv", "h2o", "streamingllm"]
SMALL = {"snapkv": dict(window=4), "pyramidkv": dict(window=4), "spankv": dict(window=4)}
PER_HEAD = {"snapkv", "pyramidkv", "prefixkv", "vlcache"}  # drawn with per_head=True or not
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
pytestmark = pytest.mark.fuzz
_models: dict = {}


def model_of(family):
    if family not in _models:
        _models[family] = build(family)
    return _models[family]


@st.composite
def cases(draw):
    """(family, input_ids [B, N], attention_mask [B, N], policy, max_new_tokens, the policy's
    apply options: its small window, per_head for some)."""
    family = draw(st.sampled_from(FAMILIES))
    B, N = draw(st.integers(1, 3)), draw(st.integers(1, 300))
    lengths = [N] + [draw(st.integers(1, N)) for _ in range(B - 1)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    ids = torch.randint(3, 900, (B, N), generator=gen)
    mask = (torch.arange(N)[None] >= N - torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    policy = draw(st.sampled_from(POLICIES))
    options = dict(SMALL.get(policy, {}))
    if policy in PER_HEAD and draw(st.booleans()):
        options["per_head"] = True
    return family, ids, mask, policy, draw(st.integers(1, 20)), options


@FUZZ
@given(cases())
def test_full_budget_is_exact(case):
    family, ids, mask, policy, new, options = case
    model = model_of(family)
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
        with kvpolicy.apply(model, policy, 1.0, **options):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    assert torch.equal(got, reference)


@FUZZ
@given(cases(), st.floats(0.01, 1.0))
def test_any_budget_runs_without_nan(case, budget):
    family, ids, mask, policy, new, options = case
    model = model_of(family)
    with kvpolicy.apply(model, policy, budget, **options), torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    assert out.sequences.shape == (ids.shape[0], ids.shape[1] + len(out.scores))
    assert all(not torch.isnan(s).any() for s in out.scores)
