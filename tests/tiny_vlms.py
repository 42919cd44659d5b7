"""Tiny random-weight vision-language models built from configs, with matching inputs.

No trained VLM can be downloaded here; these exercise the real code paths (vision tower,
projector, image-token merging, the language model's attention and cache).
"""
from __future__ import annotations

import torch
from transformers import (AutoModelForImageTextToText, Gemma3Config, Idefics3Config, LlavaConfig,
                          LlavaNextConfig, PaliGemmaConfig, Qwen2_5_VLConfig, Qwen2VLConfig,
                          SmolVLMConfig)

VOCAB = 256
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8,
            projection_dim=32)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)


def _text_ids(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(10, 200, (n,), generator=gen)


def llava():
    """(model, inputs): LLaVA with a 16-patch CLIP tower; image token 250."""
    cfg = LlavaConfig(
        vision_config=CLIP, text_config=dict(model_type="llama", **TEXT), image_token_index=250, image_seq_length=16)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.full((16,), 250), _text_ids(gen, 12)])[None]
    pixels = torch.randn(1, 3, 32, 32, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels)


def llava_next():
    """(model, inputs): LLaVA-NeXT, one 32-pixel image as base + one tile (36 tokens)."""
    cfg = LlavaNextConfig(vision_config=CLIP, text_config=dict(model_type="llama", **TEXT),
                          image_token_index=250, image_grid_pinpoints=[[32, 32]])
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.full((36,), 250), _text_ids(gen, 12)])[None]
    pixels = torch.randn(1, 2, 3, 32, 32, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels, image_sizes=torch.tensor([[32, 32]]))


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


def qwen2_5_vl():
    """(model, inputs): Qwen2.5-VL (windowed vision attention) with one 8x8-patch image."""
    cfg = Qwen2_5_VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                           out_hidden_size=64, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56),
        text_config=dict(model_type="qwen2_5_vl_text",
                         rope_scaling=dict(type="mrope", mrope_section=[2, 3, 3]), **TEXT),
        image_token_id=251, video_token_id=252, vision_start_token_id=253, vision_end_token_id=254)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.tensor([253]), torch.full((16,), 251),
                     torch.tensor([254]), _text_ids(gen, 12)])[None]
    pixels = torch.randn(64, 3 * 2 * 14 * 14, generator=gen)
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=pixels, image_grid_thw=torch.tensor([[1, 8, 8]]))


def gemma3():
    """(model, inputs): Gemma3 VLM (sliding layers; image tokens attend bidirectionally)."""
    text = dict(TEXT, head_dim=16, sliding_window=8,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg = Gemma3Config(vision_config=SIGLIP, text_config=dict(model_type="gemma3_text", **text),
                       image_token_index=250, mm_tokens_per_image=4, boi_token_index=248,
                       eoi_token_index=249)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.tensor([248]), torch.full((4,), 250),
                     torch.tensor([249]), _text_ids(gen, 12)])[None]
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(1, 3, 32, 32, generator=gen),
                             token_type_ids=(ids == 250).long())


def paligemma():
    """(model, inputs): PaliGemma (16 image tokens, then a prefix attended bidirectionally)."""
    cfg = PaliGemmaConfig(vision_config=dict(SIGLIP, projection_dim=64),
                          text_config=dict(model_type="gemma", head_dim=16, **TEXT),
                          image_token_index=250, projection_dim=64)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.full((16,), 250), _text_ids(gen, 12)])[None]
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(1, 3, 32, 32, generator=gen),
                             token_type_ids=torch.zeros_like(ids))


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


def smolvlm():
    """(model, inputs): SmolVLM (Idefics3 layout) with a 32-pixel image; token 250."""
    cfg = SmolVLMConfig(vision_config=dict(hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=2,
                                           image_size=32, patch_size=8),
                        text_config=dict(model_type="llama", **TEXT), image_token_id=250,
                        scale_factor=2)
    gen = torch.Generator().manual_seed(0)
    ids = torch.cat([_text_ids(gen, 5), torch.full((4,), 250), _text_ids(gen, 12)])[None]
    return _build(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                             pixel_values=torch.randn(1, 1, 3, 32, 32, generator=gen))


def _build(cfg):
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(cfg).eval()


ALL = {"llava": llava, "llava_next": llava_next, "qwen2_vl": qwen2_vl, "qwen2_5_vl": qwen2_5_vl,
       "idefics3": idefics3, "smolvlm": smolvlm, "gemma3": gemma3, "paligemma": paligemma}
# The VLM part of the family matrix (tests/test_vlm.py, docs/models.md).
EXACT_VLMS = {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"}
REFUSED_VLMS = {"gemma3", "paligemma"}  # bidirectional attention among image/prefix tokens
