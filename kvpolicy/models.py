"""Model-family knowledge, in one place: the text config, the decoder layers, the
attention switch, and which prompt positions are vision tokens."""
from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.generation.utils import ALL_CACHE_NAMES

# The keyword that carries the cache into generate and forward and out of their outputs:
# transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name still works there,
# with a FutureWarning). kvpolicy reads either and passes the installed version's own.
CACHE_ARG = "cache" if "cache" in ALL_CACHE_NAMES else "past_key_values"
CACHE_ARGS = ("cache", "past_key_values")

# Config fields naming vision placeholder tokens: LLaVA / LLaVA-NeXT (image_token_id, older
# image_token_index), Qwen2-VL / Qwen2.5-VL (image, video, vision start / end), Idefics3 /
# SmolVLM (image_token_id).
VISION_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id",
                       "vision_start_token_id", "vision_end_token_id")


# Families that dispatch through AttentionInterface yet cannot be served exactly, and why
# (found by the family matrix, tests/test_families.py).
UNSUPPORTED_FAMILIES = {
    "diffllama": "its differential attention subtracts two softmax maps, so no attention "
                 "probability scores a token",
    "jetmoe": "its mixture-of-attention experts attend with more heads than its cache holds",
    "doge": "its attention mask applies a sliding window that neither its cache nor its "
            "attention call declares",
    "phimoe": "its attention mask applies a sliding window that its attention call does not "
              "declare",
    "nemotron": "its attention does not reach the attention function kvpolicy registers",
    "stablelm": "its attention does not reach the attention function kvpolicy registers",
}


# Families whose prefill mask is not causal: image (or prefix) tokens attend to each other in
# both directions (transformers builds a block mask from token_type_ids). kvpolicy's prefill
# attention and scores are causal, so these would be inexact.
BIDIRECTIONAL_PREFILL = {"gemma3", "gemma4", "gemma4_unified", "paligemma", "molmo2",
                         "deepseek_ocr2", "diffusion_gemma", "git", "hrm_text", "pi0",
                         "step3p7", "unlimited_ocr"}


class UnsupportedModelError(TypeError):
    """The model is not a decoder (causal LM or VLM) kvpolicy can patch."""


def given_cache(kwargs: dict):
    """The cache a generate or forward call was given, under either name (None if none)."""
    given = [kwargs[name] for name in CACHE_ARGS if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError("pass the cache once, as cache= or past_key_values=, not both")
    return given[0] if given else None


def pass_cache(kwargs: dict, cache) -> None:
    """Put ``cache`` into a call's kwargs under the installed transformers' name."""
    for name in CACHE_ARGS:
        kwargs.pop(name, None)
    kwargs[CACHE_ARG] = cache


def output_cache(output):
    """The cache a forward or generate output returns."""
    return getattr(output, CACHE_ARG)


def text_config(model: nn.Module):
    """The decoder (language model) config; raises UnsupportedModelError otherwise."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "get_text_config"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a Hugging Face transformers model (no config)")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__} is an encoder-decoder model; kvpolicy patches decoder-only "
            f"causal LMs and VLMs")
    text = config.get_text_config(decoder=True)
    if getattr(text, "num_hidden_layers", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: its config has no decoder text config with num_hidden_layers")
    if not hasattr(model, "generate"):
        raise UnsupportedModelError(f"{type(model).__name__} cannot generate (no generate method); "
                                    f"pass the causal-LM class (e.g. AutoModelForCausalLM)")
    return text


def layer_windows(model: nn.Module) -> list[int | None]:
    """Per decoder layer the sliding window its cache keeps (None = full attention), as
    transformers' own DynamicCache decides: ``layer_types``, else each layer's
    ``sliding_window`` (Mistral: one for every layer)."""
    text = text_config(model)
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None) or [
        "sliding_attention" if window is not None else "full_attention"] * text.num_hidden_layers
    return [window if t == "sliding_attention" else None for t in types]


def check_supported(model: nn.Module) -> None:
    """Refuse, before anything is touched, a model whose cache kvpolicy cannot hold exactly."""
    text = text_config(model)
    name = type(model).__name__
    family = getattr(text, "model_type", None)
    if family in UNSUPPORTED_FAMILIES:
        raise UnsupportedModelError(f"{name} ({family}) is not supported: "
                                    f"{UNSUPPORTED_FAMILIES[family]}. Run it without kvpolicy.")
    top = getattr(model.config, "model_type", None)
    if top in BIDIRECTIONAL_PREFILL or getattr(text, "use_bidirectional_attention", False):
        raise UnsupportedModelError(
            f"{name} ({top}) lets some prompt tokens (images, a prefix) attend to later ones at "
            f"prefill; kvpolicy's prefill attention and scores are causal, so it would be "
            f"inexact. For text-only prompts load the family's causal-LM class (e.g. "
            f"Gemma3ForCausalLM); otherwise run it without kvpolicy.")
    if getattr(text, "kv_lora_rank", None) is not None:
        raise UnsupportedModelError(
            f"{name} caches multi-head latent attention (MLA: compressed latents, not per-head "
            f"keys and values); kvpolicy cannot select tokens in it. Run it without kvpolicy.")
    if getattr(text, "kv_sharing_modes", None) is not None:
        raise UnsupportedModelError(
            f"{name} shares key/value caches between layers; kvpolicy compresses each layer's own "
            f"cache. Run it without kvpolicy.")
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    other = sorted(kinds - {"full_attention", "sliding_attention"})
    if other or getattr(text, "attention_chunk_size", None):
        raise UnsupportedModelError(
            f"{name} has {', '.join(other) or 'chunked_attention'} layers; kvpolicy holds only "
            f"full and sliding-window attention caches. Run it without kvpolicy.")
    dynamic_ok = getattr(type(model), "_supports_default_dynamic_cache", None)
    if getattr(model, "_is_stateful", False) or (callable(dynamic_ok) and not dynamic_ok()):
        raise UnsupportedModelError(
            f"{name} keeps a cache of its own kind (recurrent/state-space or hybrid layers); "
            f"kvpolicy holds key/value caches only. Run it without kvpolicy.")
    if not can_switch_attention(model):
        raise UnsupportedModelError(
            f"{name} computes attention itself instead of through transformers' "
            f"AttentionInterface, so kvpolicy cannot see or change it; use a model class that "
            f"supports attn_implementation='sdpa', or run it without kvpolicy.")


def output_projections(model: nn.Module) -> dict[int, nn.Module]:
    """Decoder layer index -> its attention module, for every layer, where each has a linear
    ``o_proj`` over its heads' outputs (KVzip+'s W_O, ``Requirements.contribution``);
    refuses by name a model whose attention has none."""
    text = text_config(model)
    found = {m.layer_idx: m for m in model.modules()
             if isinstance(getattr(m, "layer_idx", None), int)
             and isinstance(getattr(m, "o_proj", None), nn.Linear)}
    heads = text.num_attention_heads
    if (sorted(found) != list(range(text.num_hidden_layers))
            or any(m.o_proj.in_features % heads for m in found.values())):
        raise ValueError(f"{type(model).__name__}: KVzip+ (kvzip(plus=True)) weighs each key by "
                         f"its attention's output projection, and this model's attention layers "
                         f"have no linear o_proj over their {heads} heads; use kvzip without plus")
    return found


def is_multimodal(model: nn.Module) -> bool:
    """True when the language model has its own sub-config (VLMs)."""
    return text_config(model) is not model.config


def attn_implementation(model: nn.Module) -> str:
    """The language model's current attention implementation."""
    return text_config(model)._attn_implementation


def set_attn_implementation(model: nn.Module, name: str) -> None:
    """Switch only the language model's attention (a VLM's vision tower keeps its own)."""
    if is_multimodal(model):
        model.set_attn_implementation({"text_config": name})
    else:
        model.set_attn_implementation(name)


def can_switch_attention(model: nn.Module) -> bool:
    """Whether the model dispatches attention through transformers' AttentionInterface."""
    if not hasattr(model, "set_attn_implementation"):
        return False
    owner = model.get_decoder() if hasattr(model, "get_decoder") else model
    return all(type(m)._can_set_attn_implementation() for m in (model, owner)
               if hasattr(type(m), "_can_set_attn_implementation"))


def vision_token_ids(model: nn.Module) -> list[int]:
    """The ids of the model's vision placeholder tokens (empty for text-only models)."""
    ids = {getattr(model.config, f, None) for f in VISION_TOKEN_FIELDS}
    return sorted(i for i in ids if isinstance(i, int))


def vision_mask(model: nn.Module, input_ids: Tensor) -> Tensor | None:
    """bool [B, N]: positions of vision tokens in ``input_ids`` [B, N]; None for text-only
    models."""
    ids = vision_token_ids(model)
    if not ids:
        return None
    return torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))
