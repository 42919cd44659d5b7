"""The model-family matrix: every decoder-only causal-LM family transformers ships, as a
tiny random model, is exact under kvpolicy at budget 1.0 (an append and an evicting policy)
and shrinks its cache at 0.1 — or ``apply`` refuses it with a clear error. A family added by
a future transformers fails ``test_every_family_is_classified`` until it is listed here."""
import pytest
import torch

import kvpolicy
from families import build, causal_lm_types
from kvpolicy.models import UnsupportedModelError

# Families the generic tiny config cannot build (or generate with) in this transformers;
# they are not claimed as supported. The reason is what building or generating raised.
UNBUILDABLE = {
    "axk1", "axk2", "bailing_hybrid", "bamba", "bart", "big_bird", "bigbird_pegasus",
    "blenderbot", "blenderbot-small", "bloom", "blt", "codegen", "cohere_compass_text", "cpmant",
    "ctrl", "dbrx", "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1",
    "dots3_note", "dots3_note_text", "falcon", "falcon_h1", "falcon_mamba", "flint", "gemma3",
    "gemma3n", "gemma3n_text", "gemma4", "gemma4_assistant", "gemma4_text", "gemma4_unified",
    "gemma4_unified_assistant", "gemma4_unified_text", "git", "glm_moe_dsa", "got_ocr2",
    "gpt_neo", "gpt_neox_japanese", "gptj", "granite_swa", "granitemoe_swa", "granitemoehybrid",
    "hrm_text", "hy_v4", "inkling2_text", "inkling_text", "jamba", "kimi_linear", "lfm2_moe",
    "longcat_flash", "mamba", "mamba2", "marian", "mbart", "megatron-bert", "mimo_v2_flash",
    "minicpm3", "moss_transcribe_diarize", "mpt", "musicgen", "musicgen_melody", "mvp",
    "olmo_hybrid", "openai-gpt", "pegasus", "phi4_multimodal", "plbart", "prophetnet",
    "qwen2_moe", "qwen3_5", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next",
    "qwen4_exp", "qwen4_exp_text", "recurrent_gemma", "reformer", "rembert", "roc_bert",
    "roformer", "rwkv", "trocr", "vaultgemma", "whisper", "xglm", "xlm", "xlnet", "xlstm", "xmod",
    "youtu", "zamba", "zamba2",
}
# Families apply refuses (models.check_supported says why).
REFUSED = {"diffllama", "doge", "glm4_moe_lite", "jetmoe", "llama4", "llama4_text", "minimax",
           "nemotron", "nemotron_h", "phimoe", "stablelm", "zaya"}
# The families run in the quick CI sample; the rest is marked slow.
QUICK = {"llama", "mistral", "gemma2", "gemma3_text", "gpt_oss", "cohere2", "qwen2", "gpt2",
         "gpt_neox", "phi3", "olmo", "diffllama", "glm4_moe_lite", "llama4_text"}
PROMPT, NEW = 40, 6


def test_every_family_is_classified():
    unknown = sorted(set(causal_lm_types()) - UNBUILDABLE - REFUSED - set(supported()))
    assert not unknown, f"new families to classify: {unknown}"


def supported() -> list[str]:
    return sorted(set(causal_lm_types()) - UNBUILDABLE - REFUSED)


def families() -> list:
    params = []
    for family in sorted(set(causal_lm_types()) - UNBUILDABLE):
        marks = () if family in QUICK else (pytest.mark.slow,)
        params.append(pytest.param(family, marks=marks, id=family))
    return params


@pytest.mark.parametrize("family", families())
def test_family_is_exact_or_refused(family):
    model = build(family)
    ids = torch.randint(3, 900, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    if family in REFUSED:
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            kvpolicy.apply(model, "snapkv", budget=1.0)
        assert model.config._attn_implementation != "kvpolicy"  # untouched
        return
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        for name, params in (("snapkv", {"window": 4}), ("h2o", {})):
            with kvpolicy.apply(model, name, budget=1.0, **params):
                assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False),
                                   reference), name
            with kvpolicy.apply(model, name, budget=0.1, **params):
                out = model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                     return_dict_in_generate=True)
            cache = out.past_key_values
            scored = [layer for layer in cache.layers if layer.kind != "sliding"]
            assert all(layer.keys.shape[2] < PROMPT for layer in scored), name
            assert not torch.isnan(out.sequences.float()).any()
