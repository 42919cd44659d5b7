"""Quantized prompt rows (``bits`` 8, 4 or 2), group-wise and asymmetric as in KIVI.

Keys are quantized per channel: groups of ``TOKEN_GROUP`` tokens (the last group holds the
rest of the N rows), one scale and zero per (group of tokens, channel). Values per token:
groups of up to ``CHANNEL_GROUP`` channels, one scale and zero per (token, group of
channels). A code is ``round((x - zero) / scale)`` in [0, 2**bits - 1]; codes are packed
along the token axis into uint8 (N a multiple of 8 // bits): the N rows are split into
8 // bits consecutive blocks of M = N * bits / 8 rows and packed row m holds row m of
block j in bits [j*bits, (j+1)*bits). Scales and zeros are in the rows' dtype.

Decoding: compiled (and ``unquantize``), ``dequantize`` is one batched op per tensor and
``joined`` concatenates the full-precision rows after it, which inductor fuses into one
fixed-shape graph. Eager, ``Scratch.rows`` writes both into one buffer shared by a cache's
layers, with no allocation per step: float32 rows on CPU in one pass of
kvpolicy_kernels.quantized_cpu (a C kernel built on first use), otherwise the codes
unpacked block by block with a shift and a mask, converted into the buffer, then scaled
there (code * scale + zero), the same rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kvpolicy_kernels import quantized_cpu
from kvpolicy_kernels.quantized_attention_ref import TOKEN_GROUP  # keys: tokens per (group, channel) scale

BITS = (16, 8, 4, 2)  # 16: the model's dtype, not quantized
CHANNEL_GROUP = 32  # values: at most this many channels per (token, group) scale


def check_bits(bits, policy) -> int:
    """``bits`` as an int in BITS for ``policy`` (a kvpolicy.Policy), else a ValueError
    naming it: quantized rows are for policies that append while decoding (an evicting
    policy overwrites prompt slots in place)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits={bits!r}: kept prompt rows are stored in 16 (the model's dtype), "
                         f"8, 4 or 2 bits")
    if bits < 16 and policy.requirements().decode != "append":
        raise ValueError(f"bits={bits}: {policy.name} evicts while decoding (it overwrites prompt "
                         f"slots in place), so its rows stay in the model's dtype; pass bits=16 "
                         f"or an append policy (e.g. snapkv)")
    return int(bits)


def quantizable_rows(kept: int, recent: int, bits: int) -> int:
    """Rows of ``kept`` prompt rows that are quantized at ``bits``: all but the last
    ``recent`` (kept in full precision), rounded down to whole packed bytes (a multiple of
    8 // bits)."""
    per = 8 // bits
    return max(0, kept - recent) // per * per


def _key_groups(rows: Tensor, mode: str = "constant") -> Tensor:
    """rows [B, G, N, D] -> [B, G, ceil(N / TOKEN_GROUP), TOKEN_GROUP, D]: the last group
    padded by F.pad's ``mode`` (constant: zeros; replicate: copies of the last row)."""
    return F.pad(rows, (0, 0, 0, -rows.shape[2] % TOKEN_GROUP), mode=mode).unflatten(2, (-1, TOKEN_GROUP))


def channel_group(dim: int) -> int:
    """Channels per value scale: the largest power of two dividing ``dim``, at most
    CHANNEL_GROUP."""
    return math.gcd(dim, CHANNEL_GROUP)


def _shifts(bits: int, device: torch.device) -> Tensor:
    """uint8 [8 // bits, 1, 1]: block j's shift."""
    return torch.arange(0, 8, bits, dtype=torch.uint8, device=device)[:, None, None]


def pack(codes: Tensor, bits: int) -> Tensor:
    """codes uint8 [..., N, D] in [0, 2**bits) with N a multiple of 8 // bits -> packed
    uint8 [..., M, D], M = N * bits // 8: row m holds row m of each block of M rows (block j
    in bits [j*bits, (j+1)*bits))."""
    blocks = codes.unflatten(-2, (8 // bits, -1))  # [..., per, M, D]
    return (blocks << _shifts(bits, codes.device)).sum(-3, dtype=torch.uint8)


def unpack(packed: Tensor, bits: int) -> Tensor:
    """packed uint8 [..., M, D] -> codes uint8 [..., M * 8 // bits, D] (inverse of pack)."""
    codes = (packed[..., None, :, :] >> _shifts(bits, packed.device)) & (2**bits - 1)
    return codes.flatten(-3, -2)  # [..., per, M, D] -> [..., N, D]


def unpack_into(packed: Tensor, bits: int, out: Tensor) -> Tensor:
    """unpack(packed, bits) written into out uint8 [B, G, N, D] (contiguous), one block at a
    time: block j is ``packed >> j * bits`` masked to ``bits`` (the first needs no shift,
    the last no mask)."""
    B, G, M, D = packed.shape
    per, mask = 8 // bits, 2**bits - 1
    blocks = out.view(B, G, per, M, D)
    for j in range(per):
        block = blocks[:, :, j]
        if j == 0:
            torch.bitwise_and(packed, mask, out=block)
        else:
            torch.bitwise_right_shift(packed, j * bits, out=block)
            if j < per - 1:
                block.bitwise_and_(mask)
    return out


def _rounded(x: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """x float32 in ``dtype``, rounded up (or down) where the nearest value is not."""
    y = x.to(dtype)
    off = y.float() < x if up else y.float() > x
    return torch.where(off, torch.nextafter(y, torch.full_like(y, torch.inf if up else -torch.inf)), y)


def _quantize(x: Tensor, bits: int, dim: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Groups along ``dim`` of x float32: (codes uint8 like x, scale and zero in ``dtype``
    with ``dim`` of size 1). The stored zero is at or below each group's minimum and the
    stored scale reaches its maximum, so |x - (code * scale + zero)| <= scale / 2 (up to
    the arithmetic's rounding)."""
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    zero = _rounded(low, dtype, up=False)
    scale = _rounded((high - zero.float()) / (2**bits - 1), dtype, up=True)
    step = scale.float().masked_fill(scale == 0, 1.0)
    codes = ((x - zero.float()) / step).round_().clamp_(0, 2**bits - 1).to(torch.uint8)
    return codes, scale, zero


@dataclass
class QuantizedRows:
    """One layer's quantized prompt rows: N rows of keys [B, G, N, D] and values
    [B, G, N, Dv] in ``bits``.

    keys: packed uint8 [B, G, N * bits // 8, D], key_scale / key_zero [B, G, ceil(N /
    TOKEN_GROUP), D]; values: packed uint8 [B, G, N * bits // 8, Dv], value_scale /
    value_zero [B, G, N, Dv / channel_group(Dv)]; scales and zeros in the rows' dtype.
    """

    bits: int
    keys: Tensor
    key_scale: Tensor
    key_zero: Tensor
    values: Tensor
    value_scale: Tensor
    value_zero: Tensor

    @classmethod
    def quantize(cls, keys: Tensor, values: Tensor, bits: int) -> QuantizedRows:
        """keys [B, G, N, D], values [B, G, N, Dv] (N a multiple of 8 // bits) -> rows. The
        last key group is padded with copies of its last row, which leave its minimum and
        maximum as they are; their codes are dropped."""
        N = keys.shape[2]
        k = _key_groups(keys.float(), "replicate")  # [B, G, ceil(N / T), T, D]
        k_codes, k_scale, k_zero = _quantize(k, bits, 3, keys.dtype)
        v = values.float().unflatten(3, (-1, channel_group(values.shape[-1])))  # [B, G, N, Dv / c, c]
        v_codes, v_scale, v_zero = _quantize(v, bits, 4, values.dtype)
        return cls(bits, pack(k_codes.flatten(2, 3)[:, :, :N], bits), k_scale.squeeze(3), k_zero.squeeze(3),
                   pack(v_codes.flatten(3, 4), bits), v_scale.squeeze(4), v_zero.squeeze(4))

    def dequantize(self) -> tuple[Tensor, Tensor]:
        """(keys [B, G, N, D], values [B, G, N, Dv]) in the scales' dtype."""
        k = _key_groups(unpack(self.keys, self.bits))  # [B, G, ceil(N / T), T, D]
        keys = torch.addcmul(self.key_zero[:, :, :, None], k, self.key_scale[:, :, :, None])
        v = unpack(self.values, self.bits).unflatten(3, (self.value_scale.shape[-1], -1))  # [B, G, N, Dv / c, c]
        values = v * self.value_scale[..., None] + self.value_zero[..., None]  # as dequantize_into rounds
        return keys.flatten(2, 3)[:, :, :self.rows], values.flatten(3, 4)

    def dequantize_into(self, keys: Tensor, values: Tensor, codes: Tensor | None) -> None:
        """dequantize() written into keys [B, G, N, D] and values [B, G, N, Dv] (views in
        the scales' dtype). codes None: float32 CPU rows through kvpolicy_kernels.quantized_cpu
        (one pass a tensor). Otherwise ATen, codes a uint8 scratch of at least B * G * N *
        max(D, Dv): each tensor's codes are converted into it first, then scaled there in
        the scales' dtype (a mixed-dtype ``addcmul`` casts in a temporary, and one whose
        scale broadcasts along the innermost axis (values) runs ~3x slower on CPU than
        ``mul_`` then ``add_``). Both give the same rows."""
        if codes is None:
            quantized_cpu.dequantize_rows(self.keys.contiguous(), self.key_scale.contiguous(),
                                           self.key_zero.contiguous(), keys, bits=self.bits,
                                           per_token=False, group=TOKEN_GROUP)
            quantized_cpu.dequantize_rows(self.values.contiguous(), self.value_scale.contiguous(),
                                           self.value_zero.contiguous(), values, bits=self.bits,
                                           per_token=True,
                                           group=values.shape[-1] // self.value_scale.shape[-1])
            return
        k = self._codes_into(self.keys, keys, codes)
        whole = k.shape[2] // TOKEN_GROUP * TOKEN_GROUP  # rows in whole groups, then the last group's rest
        if whole:
            k_whole = k[:, :, :whole].unflatten(2, (-1, TOKEN_GROUP))  # [B, G, N // T, T, D]
            g = whole // TOKEN_GROUP
            torch.addcmul(self.key_zero[:, :, :g, None], k_whole, self.key_scale[:, :, :g, None], out=k_whole)
        if whole < k.shape[2]:
            rest = k[:, :, whole:]  # [B, G, N % T, D]
            torch.addcmul(self.key_zero[:, :, -1:], rest, self.key_scale[:, :, -1:], out=rest)
        v = self._codes_into(self.values, values, codes).unflatten(3, (self.value_scale.shape[-1], -1))
        v.mul_(self.value_scale[..., None]).add_(self.value_zero[..., None])  # [B, G, N, Dv / c, c]

    def _codes_into(self, packed: Tensor, out: Tensor, codes: Tensor) -> Tensor:
        """out (a float view) holding the codes of ``packed`` (unpacked through the uint8
        scratch ``codes`` below 8 bits)."""
        c = packed if self.bits == 8 else unpack_into(packed, self.bits, codes[:out.numel()].view(out.shape))
        return out.copy_(c)

    def joined(self, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """(keys [B, G, N + n, D], values [B, G, N + n, Dv]): the rows dequantized, then
        keys/values [B, G, n, D / Dv] (the slots after them), as new tensors."""
        k, v = self.dequantize()
        return torch.cat([k, keys], 2), torch.cat([v, values], 2)

    @property
    def rows(self) -> int:
        """N: the prompt rows held."""
        return self.keys.shape[2] * 8 // self.bits

    def tensors(self) -> list[Tensor]:
        """Every tensor held (its memory)."""
        return [self.keys, self.key_scale, self.key_zero, self.values, self.value_scale,
                self.value_zero]


class Scratch:
    """Eager decode's buffers, shared by a cache's layers (a layer writes and reads them
    within its own attention): the layer's slots in the model's dtype (keys then values)
    and, on the ATen path, uint8 codes, each a flat buffer grown to the largest layer. They hold one layer's
    rows at a time and are not counted by ``PolicyCache.nbytes`` (like the attention's own
    temporaries); a copy of the cache starts with none."""

    def __init__(self) -> None:
        self.floats: Tensor | None = None
        self.codes: Tensor | None = None

    def __deepcopy__(self, memo) -> Scratch:
        return Scratch()

    @staticmethod
    def _take(buffer: Tensor | None, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(numel, dtype=dtype, device=device)
        return buffer

    def rows(self, rows: QuantizedRows, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """rows.joined(keys, values) as views of this scratch (valid until the next call)."""
        B, G, n, D = keys.shape
        Dv, N = values.shape[-1], rows.rows
        nk, nv = B * G * (N + n) * D, B * G * (N + n) * Dv
        self.floats = self._take(self.floats, nk + nv, keys.dtype, keys.device)
        k = self.floats[:nk].view(B, G, N + n, D)
        v = self.floats[nk:nk + nv].view(B, G, N + n, Dv)
        codes = None  # the C kernel needs no codes buffer
        if not quantized_cpu.usable(k):
            codes = self.codes = self._take(self.codes, B * G * N * max(D, Dv), torch.uint8, keys.device)
        rows.dequantize_into(k[:, :, :N], v[:, :, :N], codes)
        k[:, :, N:].copy_(keys)
        v[:, :, N:].copy_(values)
        return k, v
