"""Tiny random models of every decoder-only causal-LM family transformers ships, for the
family matrix (tests/test_families.py) and the supported-models table in the docs."""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=1000, max_position_embeddings=512,
            n_embd=64, n_layer=3, n_head=4, n_positions=512, d_model=64, ffn_dim=128,
            num_layers=3, num_heads=4, sliding_window=16, attention_window_size=16,
            moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
            n_routed_experts=4, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
            qk_nope_head_dim=8, v_head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False, use_sliding_window=True, max_window_layers=1,
            attn_logit_softcapping=5.0, final_logit_softcapping=None)


MAX_PARAMS = 12_000_000


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def build(model_type: str, seed: int = 0):
    """A tiny random float32 model of ``model_type`` in eval mode (raises if it cannot be
    built from a generic tiny config)."""
    config = AutoConfig.for_model(model_type)
    for key, value in TINY.items():
        if hasattr(config, key):
            setattr(config, key, value)
    text = config.get_text_config(decoder=True)
    for key, value in TINY.items():
        if hasattr(text, key):
            setattr(text, key, value)
    if getattr(text, "layer_types", None) is not None:
        n = text.num_hidden_layers
        text.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)] \
            if "sliding_attention" in text.layer_types else text.layer_types[:n] + \
            [text.layer_types[-1]] * (n - len(text.layer_types))
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMS:
        raise ValueError(f"the generic tiny config still gives {size / 1e6:.1f}M parameters")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def families_doc() -> str:
    """docs/models.md: the family matrix's classification (tests/test_families.py)."""
    from test_families import EXACT, REFUSED, UNBUILDABLE
    from tiny_vlms import EXACT_VLMS, REFUSED_VLMS

    import transformers

    def names(group):
        return ", ".join(f"`{n}`" for n in sorted(group))

    return (
        "# Supported model families\n\n"
        "Generated from the family matrix (`tests/test_families.py`; regenerate with\n"
        "`python tests/families.py > docs/models.md`) on transformers "
        f"{transformers.__version__}. Every decoder-only causal-LM family transformers ships is\n"
        "built as a tiny random model (hidden 64, 3 layers) and classified:\n\n"
        f"**Exact ({len(EXACT)})**: at budget 1.0 `generate` is token-identical to the unpatched\n"
        "model for an appending (SnapKV) and an evicting (H2O) policy, and at 0.1 the cache\n"
        "shrinks. Sliding-window layers keep their window as a ring (the budget counts the\n"
        "full-attention layers); softcapping (Gemma2) and attention sinks (GPT-OSS) enter the\n"
        f"attention and the scores.\n\n{names(EXACT)}\n\n"
        f"**Refused ({len(REFUSED)})**: `kvpolicy.apply` raises `UnsupportedModelError` naming the\n"
        "model and the reason before touching it: multi-head latent attention (DeepSeek-V2/V3,\n"
        "GLM-4-MoE-Lite), chunked, linear or recurrent layers, KV sharing between layers,\n"
        "attention computed outside transformers' AttentionInterface (Bloom, GPT-Neo, MPT, ...),\n"
        f"and the families listed in `kvpolicy.models.UNSUPPORTED_FAMILIES`.\n\n{names(REFUSED)}\n\n"
        f"**Not built here ({len(UNBUILDABLE)})**: the generic tiny config cannot build or run them\n"
        "(encoder-decoders, multimodal wrappers, configs needing family-specific fields); they\n"
        "are not claimed as supported. Encoder-decoders and state-space models are refused by\n"
        f"`apply` in any case.\n\n{names(UNBUILDABLE)}\n\n"
        "## Vision-language models\n\n"
        "Built as tiny random VLMs with an image in the prompt (`tests/tiny_vlms.py`,\n"
        "`tests/test_vlm.py`); only the language model is patched.\n\n"
        f"**Exact ({len(EXACT_VLMS)})**: {names(EXACT_VLMS)}\n\n"
        f"**Refused ({len(REFUSED_VLMS)})**: {names(REFUSED_VLMS)}: their image (PaliGemma: whole\n"
        "prefix) tokens attend to each other in both directions at prefill, which kvpolicy's\n"
        "causal prefill attention and scores cannot reproduce. Their causal-LM text classes\n"
        "(e.g. `Gemma3ForCausalLM`, family `gemma3_text` above) are exact.\n")


if __name__ == "__main__":
    import os
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    print(families_doc(), end="")
