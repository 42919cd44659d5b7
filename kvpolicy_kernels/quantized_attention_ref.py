"""PyTorch reference for decode attention over quantized prompt rows (the kernel's oracle):
the rows dequantized, then the layer's full-precision rows after them, then attention with
the model's softmax, as kvpolicy's decode does (kvpolicy.quantized, kvpolicy.attention).

Storage (kvpolicy.quantized.QuantizedRows, restated here: kvpolicy_kernels does not import
kvpolicy): N rows of codes in [0, 2**bits) packed along the token axis into uint8, the N rows
split into 8 // bits consecutive blocks of M = N * bits / 8 rows, packed row m holding row m
of block j in bits [j*bits, (j+1)*bits). Keys: one scale and zero per (group of TOKEN_GROUP
tokens, channel), the last group holding the rest (N need not be a multiple of
TOKEN_GROUP); values: one per (token, group of Dv / value groups channels). A row
is code * scale + zero computed in fp32 and rounded once to the scales' dtype, as the kernel
computes it (kvpolicy's CPU decode rounds value rows twice, after the product and after the
sum: up to one rounding apart in bf16/fp16)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention_ref import attention

TOKEN_GROUP = 32  # keys: tokens per (group, channel) scale; the last group may be partial


def unpack(codes: Tensor, bits: int) -> Tensor:
    """packed uint8 [..., M, D] -> codes uint8 [..., M * 8 // bits, D]: block j is
    ``codes >> j * bits`` masked to ``bits``."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)[:, None, None]
    return ((codes[..., None, :, :] >> shifts) & (2**bits - 1)).flatten(-3, -2)


def dequantize(key_codes: Tensor, key_scale: Tensor, key_zero: Tensor, value_codes: Tensor,
               value_scale: Tensor, value_zero: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """(keys [B, G, N, D], values [B, G, N, Dv]) in the scales' dtype (code * scale + zero in
    fp32, rounded once): key_codes uint8 [B, G, M, D], key_scale / key_zero [B, G, ceil(N /
    TOKEN_GROUP), D]; value_codes uint8 [B, G, M, Dv], value_scale / value_zero [B, G, N, Dv / c]."""
    math = torch.promote_types(key_scale.dtype, torch.float32)
    codes = unpack(key_codes, bits)  # [B, G, N, D]
    N, groups = codes.shape[2], key_scale.shape[2]
    k = F.pad(codes, (0, 0, 0, groups * TOKEN_GROUP - N)).unflatten(2, (groups, TOKEN_GROUP))
    keys = torch.addcmul(key_zero[:, :, :, None].to(math), k.to(math), key_scale[:, :, :, None].to(math))
    v = unpack(value_codes, bits).unflatten(3, (value_scale.shape[3], -1))  # [B, G, N, Dv / c, c]
    values = torch.addcmul(value_zero[..., None].to(math), v.to(math), value_scale[..., None].to(math))
    return keys.flatten(2, 3)[:, :, :N].to(key_scale.dtype), values.flatten(3, 4).to(value_scale.dtype)


def quantized_attention_ref(query: Tensor, key_codes: Tensor, key_scale: Tensor, key_zero: Tensor,
                            value_codes: Tensor, value_scale: Tensor, value_zero: Tensor,
                            keys: Tensor, values: Tensor, visible: Tensor, *, bits: int,
                            scaling: float, softcap: float = 0.0,
                            sinks: Tensor | None = None) -> Tensor:
    """One query token per row over N quantized rows then n full-precision rows.

    query [B, H, 1, D]; the quantized rows as in ``dequantize`` (scales and zeros in the
    query's dtype); keys [B, G, n, D], values [B, G, n, Dv] in the query's dtype; visible
    bool [B, G, N + n] (quantized rows first). Query head h reads KV head h // (H // G).
    softcap > 0 caps the logits with tanh (before the mask), sinks float [H] join each
    head's denominator; a head that sees nothing gets 0. Returns out [B, 1, H, Dv] in the
    query's dtype.
    """
    B, H, _, D = query.shape
    G = keys.shape[1]
    k, v = dequantize(key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, bits)
    k, v = torch.cat([k, keys], 2), torch.cat([v, values], 2)
    if not softcap and sinks is None:  # kvpolicy.attention.grouped_attention's SDPA
        out = F.scaled_dot_product_attention(query.reshape(B, G, H // G, D), k, v,
                                             attn_mask=visible[:, :, None, :], scale=scaling)
        return out.reshape(B, 1, H, -1)
    mask = visible.repeat_interleave(H // G, 1)[:, :, None, :]  # [B, H, 1, N + n]
    out = attention(query, k, v, scaling=scaling, mask=mask, softcap=softcap, sinks=sinks)
    return out.transpose(1, 2)
