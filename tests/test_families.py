"""The model-family matrix: every decoder-only causal-LM family transformers ships, as a
tiny random model, is exact under kvpolicy at budget 1.0 (an append and an evicting policy,
and the append one with per-head budgets)
and shrinks its cache at 0.1 — or ``apply`` refuses it with a clear error. A family added by
a future transformers fails ``test_every_family_is_classified`` until it is listed here."""
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

import kvpolicy
from families import build, causal_lm_types, families_doc
from kvpolicy.models import UnsupportedModelError

# Families the generic tiny config cannot build (or generate with) in this transformers;
# they are not claimed as supported. The reason is what building or generating raised.
UNBUILDABLE = {
    "axk1", "axk2", "bailing_hybrid", "bamba", "bart", "bigbird_pegasus", "blenderbot",
    "blenderbot-small", "blt", "codegen", "cohere_compass_text", "dbrx", "deepseek_v2",
    "deepseek_v3", "deepseek_v32", "dory", "dots1", "dots3_note", "dots3_note_text",
    "falcon", "falcon_h1", "falcon_mamba", "gemma3", "gemma3n", "gemma3n_text", "gemma4",
    "gemma4_assistant", "gemma4_text", "gemma4_unified", "gemma4_unified_assistant",
    "gemma4_unified_text", "git", "glm_moe_dsa", "got_ocr2", "gptj", "granitemoehybrid",
    "hrm_text", "hy_v4", "inkling2_loop_text", "inkling2_text", "jamba", "kimi_linear",
    "kolibri1_1", "lfm2_moe", "longcat_flash", "mamba", "mamba2", "marian", "mbart",
    "minicpm3", "moss_transcribe_diarize", "musicgen", "musicgen_melody", "mvp",
    "olmo_hybrid", "pegasus", "phi4_multimodal", "plbart", "prophetnet", "qwen3_5",
    "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "qwen4_exp",
    "qwen4_exp_text", "recurrent_gemma", "reformer", "roc_bert", "rwkv", "sarvam_mla",
    "whisper", "xlnet", "xlstm", "xmod", "youtu", "zamba", "zamba2",
}
# Families exact under kvpolicy (tiny random configs, budget 1.0, an append and an evicting
# policy), listed in docs/models.md.
EXACT = {
    "afmoe", "apertus", "apertus1p5_text", "arcee", "aria_text", "beam", "bert",
    "bert-generation", "biogpt", "bitnet", "camembert", "cohere", "cohere2", "cohere2_moe",
    "ctrl", "cwm", "data2vec-text", "electra", "emu3", "ergo", "ernie", "ernie4_5",
    "ernie4_5_moe", "exaone", "exaone4", "exaone_moe", "flex_olmo", "flint", "fuyu",
    "gemma", "gemma2", "gemma3_text", "glm", "glm4", "glm4_moe", "gpt-sw3", "gpt2",
    "gpt_bigcode", "gpt_neox", "gpt_oss", "granite", "granite_swa", "granitemoe",
    "granitemoe_swa", "granitemoeshared", "helium", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "hy_v3", "hyperclovax", "internlm3", "iquestcoder", "jais2", "kolibri1", "laguna",
    "lara_mini", "lfm2", "lfm3", "llama", "mellum", "mimo_v2_flash", "minicpm5_moe",
    "minimax_m2", "minimax_m3_vl_text", "ministral", "ministral3", "mistral", "mixtral",
    "mllama", "modernbert-decoder", "moshi", "nanochat", "olmo", "olmo2", "olmo3", "olmoe",
    "opt", "param2moe", "persimmon", "phi", "phi3", "qwen2", "qwen2_moe", "qwen3",
    "qwen3_moe", "roberta", "roberta-prelayernorm", "sarvam_moe", "seed_oss", "smollm3",
    "solar_open", "starcoder2", "vaultgemma", "xlm-roberta", "xlm-roberta-xl",
}
# Families apply refuses (models.check_supported says why).
REFUSED = {
    "big_bird", "bloom", "cpmant", "deepseek_v4", "diffllama", "doge", "glm4_moe_lite",
    "gpt_neo", "gpt_neox_japanese", "inkling_text", "jetmoe", "llama4", "llama4_text",
    "megatron-bert", "minimax", "mpt", "nemotron", "nemotron_h", "openai-gpt", "phimoe",
    "rembert", "roformer", "stablelm", "trocr", "xglm", "xlm", "zaya",
}
# The families run in the quick CI sample; the rest is marked slow.
QUICK = {"llama", "mistral", "gemma2", "gemma3_text", "gpt_oss", "cohere2", "qwen2", "gpt2",
         "gpt_neox", "phi3", "olmo", "diffllama", "glm4_moe_lite", "llama4_text"}
PROMPT, NEW = 40, 6
# Exact from transformers 5.23; on older releases their attention bypasses the registered
# function, which kvpolicy reports at the first forward (never silently wrong).
OLDER_RELEASE_REFUSED = {"moshi"}  # its layers get no cache before 5.23: refused by apply
EXACT_SINCE = Version("5.23")


LISTED_FOR = "5.25"  # the transformers release the lists classify (CI's main environment)
same_release = pytest.mark.skipif(
    not transformers.__version__.startswith(LISTED_FOR),
    reason=f"the family lists classify transformers {LISTED_FOR}; other releases run the "
           f"per-family test over the listed families they ship")


@same_release
def test_every_family_is_classified():
    listed = EXACT | UNBUILDABLE | REFUSED
    assert len(listed) == len(EXACT) + len(UNBUILDABLE) + len(REFUSED)  # disjoint
    unknown = sorted(set(causal_lm_types()) - listed)
    assert not unknown, f"new families to classify (run them through test_family_is_exact_or_refused): {unknown}"
    assert not listed - set(causal_lm_types()), "listed families transformers no longer ships"


@same_release
def test_supported_models_doc_matches_the_matrix():
    doc = (Path(__file__).parent.parent / "docs" / "models.md").read_text()
    assert doc == families_doc(), "regenerate: python tests/families.py > docs/models.md"


def families() -> list:
    params = []
    for family in sorted(EXACT | REFUSED):
        marks = () if family in QUICK else (pytest.mark.slow,)
        params.append(pytest.param(family, marks=marks, id=family))
    return params


@pytest.mark.parametrize("family", families())
def test_family_is_exact_or_refused(family):
    if family not in causal_lm_types():
        pytest.skip(f"transformers {transformers.__version__} does not ship {family}")
    if family in OLDER_RELEASE_REFUSED and Version(transformers.__version__) < EXACT_SINCE:
        model = build(family)
        attn = model.config._attn_implementation
        with pytest.raises(UnsupportedModelError, match=f"{type(model).__name__}: its layers do not pass"):
            kvpolicy.apply(model, "snapkv", budget=1.0, window=4)
        assert model.config._attn_implementation == attn and "generate" not in vars(model)
        assert not model._forward_pre_hooks and not hasattr(model, "_kvpolicy_hooks")
        return
    model = build(family)
    ids = torch.randint(3, 900, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    if family in REFUSED:
        with pytest.raises(UnsupportedModelError, match=type(model).__name__):
            kvpolicy.apply(model, "snapkv", budget=1.0)
        assert model.config._attn_implementation != "kvpolicy"  # untouched
        return
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        for name, params in (("snapkv", {"window": 4}), ("h2o", {}),
                             ("snapkv", {"window": 4, "per_head": True})):
            with kvpolicy.apply(model, name, budget=1.0, **params):
                assert torch.equal(model.generate(ids, max_new_tokens=NEW, do_sample=False),
                                   reference), name
            with kvpolicy.apply(model, name, budget=0.1, **params):
                out = model.generate(ids, max_new_tokens=NEW, do_sample=False,
                                     return_dict_in_generate=True)
            cache = out.past_key_values
            scored = [layer for layer in cache.layers if layer.kind != "sliding"]
            held = [layer.keys.shape[2] // (layer.kv_heads if layer.flat else 1) for layer in scored]
            assert all(n < PROMPT for n in held), (name, params)
            assert not torch.isnan(out.sequences.float()).any()


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss", "mistral"])
def test_padded_batch_is_exact(family):
    """A left-padded row decodes exactly too (softcapping before the mask of empty slots)."""
    model = build(family)
    ids = torch.tensor([[163, 793, 73, 532, 132, 40, 677, 9], [0, 0, 0, 0, 0, 0, 0, 38]])
    mask = (ids != 0).long()
    with torch.no_grad():
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        for name, params in (("uniform", {}), ("h2o", {}), ("snapkv", {"window": 4, "per_head": True})):
            with kvpolicy.apply(model, name, budget=1.0, **params):
                got = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(got, reference), (name, params)
