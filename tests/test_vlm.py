"""Tiny random-weight VLMs: vlcache and prefixkv generate, only the language model is
patched, and the vision mask is exactly the image-token positions."""
import pytest
import torch
import tiny_vlms

import kvpolicy
from kvpolicy import models


@pytest.mark.parametrize("build", [tiny_vlms.llava, tiny_vlms.qwen2_vl, tiny_vlms.idefics3])
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
