"""Export the embedded SmolLM2 (loaded from its GGUF) to a plain Hugging Face folder, the
format vLLM loads."""
from __future__ import annotations


def export_smollm2(model, tokenizer, out: str) -> str:
    """Save ``model``'s dequantised float32 weights as a LlamaForCausalLM, with its tokenizer
    and generation config, into ``out``."""
    from transformers import LlamaForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
