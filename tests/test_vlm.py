"""Tiny random-weight VLMs: the VLM part of the family matrix (exact at budget 1.0 or
refused), vlcache and prefixkv generate, only the language model is patched, and the vision
mask is exactly the image-token positions."""
import pytest
import torch
import tiny_vlms

import kvpolicy
from kvpolicy import models
from kvpolicy.models import UnsupportedModelError


def test_every_vlm_is_classified():
    assert set(tiny_vlms.ALL) == tiny_vlms.EXACT_VLMS | tiny_vlms.REFUSED_VLMS
    assert not tiny_vlms.EXACT_VLMS & tiny_vlms.REFUSED_VLMS


@pytest.mark.parametrize("family", sorted(tiny_vlms.ALL))
def test_vlm_is_exact_or_refused(family):
    """Budget 1.0 token-identical to the unpatched VLM for an appending and an evicting
    policy and the cache shrinks at 0.1; or apply refuses it, naming the model."""
    model, inputs = tiny_vlms.ALL[family]()
    if family in tiny_vlms.REFUSED_VLMS:
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            kvpolicy.apply(model, "snapkv", budget=1.0)
        assert models.attn_implementation(model) != "kvpolicy"
        return
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        for name, params in (("snapkv", {"window": 4}), ("h2o", {})):
            with kvpolicy.apply(model, name, budget=1.0, **params):
                got = model.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert torch.equal(got, reference), name
            with kvpolicy.apply(model, name, budget=0.1, **params):
                out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                     return_dict_in_generate=True)
            assert all(k < n for k in out.past_key_values.kept), name


@pytest.mark.parametrize("build", [tiny_vlms.ALL[f] for f in sorted(tiny_vlms.EXACT_VLMS)])
@pytest.mark.parametrize("policy", ["vlcache", "prefixkv"])
def test_tiny_vlm_generates_with_vision_mask(build, policy):
    model, inputs = build()
    vision_attn = model.config.vision_config._attn_implementation
    ids = set(models.vision_token_ids(model))
    with kvpolicy.apply(model, policy, 0.5):
        assert models.attn_implementation(model) == "kvpolicy"
        assert model.config.vision_config._attn_implementation == vision_attn
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    expected = torch.isin(inputs["input_ids"], torch.tensor(sorted(ids)))
    assert expected.any()
    assert torch.equal(models.vision_mask(model, inputs["input_ids"]), expected)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    assert all(0 < k <= inputs["input_ids"].shape[1] for k in out.past_key_values.kept)
