"""Tiny random-weight vision-language models built from configs, with matching inputs.

No trained VLM can be downloaded here; these exercise the real code paths (vision tower,
projector, image-token merging, the language model's attention and cache).
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForImageTextToText, Idefics3Config, LlavaConfig,
                          Qwen2VLConfig)

VOCAB = 256
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _text_ids(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(10, 200, (n,), generator=gen)


def llava():
    """(model, inputs): LLaVA with a 16-patch CLIP tower; image token 250."""
    cfg = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=2, image_size=32,
                           patch_size=8, projection_dim=32),
        text_config=dict(model_type="llama", **TEXT), image_token_index=250, image_seq_length=16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.full((16,), 250), _text_ids(gen, 12)])[None]
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels)


def qwen2_vl():
    """(model, inputs): Qwen2-VL with one 8x8-patch image (16 merged tokens)."""
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(model_type="qwen2_vl_text", rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]),
                         **TEXT),
        image_token_id=251, video_token_id=252, vision_start_token_id=253, vision_end_token_id=254)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.tensor([253]), torch.full((16,), 251),
                     torch.tensor([254]), _text_ids(gen, 12)])[None]
    grid = torch.tensor([[1, 8, 8]])
    pixels = torch.randn(64, 3 * 2 * 14 * 14, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels, image_grid_thw=grid)


def idefics3():
    """(model, inputs): Idefics3 with a 32-pixel image (16 patches -> 4 tokens); token 250."""
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(model_type="llama", **TEXT), image_token_id=250, scale_factor=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.full((4,), 250), _text_ids(gen, 12)])[None]
    pixels = torch.randn(1, 1, 3, 32, 32, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels)


def _build(cfg):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg).eval()


ALL = {"llava": llava, "qwen2_vl": qwen2_vl, "idefics3": idefics3}
