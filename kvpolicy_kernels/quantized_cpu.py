"""CPU kernels for eager decode over float32 quantized prompt rows (8, 4 or 2 bits):
``quantized_attention`` reads the packed rows where they lie (a layer's decode step;
twin: quantized_attention_ref), ``dequantize_rows`` writes them as float32 rows in one pass
(kvpolicy.quantized.Scratch, for steps that attend over rows: observed steps, cache
rotary; twin: QuantizedRows.dequantize_into's ATen path). In ATen, dequantizing takes
about ten ops a tensor (unpack block by block, convert, scale, each a pass over memory),
then the attention reads the rows again: eager 4-bit decode took ~1.2-1.4x a 16-bit one.

The C source (quantized_cpu.c) is compiled on first use with the system's C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``) into ``$KVPOLICY_CACHE_DIR``
(default ``~/.cache/kvpolicy``), keyed by the source, the flags, the compiler and the CPU,
and loaded with ctypes. Where it cannot be built, ``usable`` warns once with the reason and
kvpolicy keeps its ATen path (the twin: ``QuantizedRows.dequantize_into``), which gives
the same rows; ``KVPOLICY_BACKEND=torch`` always takes the ATen path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from .backend import backend
from .attention_ref import _probabilities
from .quantized_attention_ref import TOKEN_GROUP

SOURCE = Path(__file__).with_name("quantized_cpu.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
MAX_DIM, MAX_ACC = 1024, 16384  # the C kernels' buffers: D and Dv; query heads of a group x Dv
_P, _I, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "dequantize_rows_f32": [_P] * 4 + [_I] * 3 + [_INT, _INT, _I, _I, _INT],
    "quantized_logits_f32": [_P] * 5 + [_I] * 2 + [_P] * 2 + [_I] * 6 + [_INT, _I, _F, _I, _INT],
    "quantized_values_f32": [_P] * 5 + [_I] * 2 + [_P] + [_I] * 6 + [_INT, _I, _I, _INT],
}


def _cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvpolicy"
    return Path(os.environ.get("KVPOLICY_CACHE_DIR", default))


def _cpu() -> str:
    """The CPU's feature flags (``-march=native`` builds for them), or its machine name."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    return next((line for line in lines if line.startswith(("flags", "Features"))), platform.machine())


def _build() -> Path:
    """The shared library's path, compiled if this source, compiler and CPU have none yet.
    Raises OSError / subprocess.CalledProcessError where it cannot be built."""
    compiler = os.environ.get("CC", "cc")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), version, _cpu()]).encode())
    target = _cache_dir() / f"quantized_cpu-{key.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True,
                           text=True, check=True)
            os.replace(built, target)  # atomic: a concurrent build leaves one whole file
    return target


@functools.cache
def _library() -> ctypes.CDLL | str:
    """The loaded kernel, or why it could not be built or loaded."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except subprocess.CalledProcessError as err:
        return f"{' '.join(map(str, err.cmd[:2]))} failed: {(err.stderr or '').strip()[-300:]}"
    except OSError as err:
        return str(err)
    for name, argtypes in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, None
    return lib


def _loaded() -> ctypes.CDLL:
    lib = _library()
    if isinstance(lib, str):
        raise RuntimeError(f"kvpolicy's CPU kernels for quantized rows are not available: {lib}")
    return lib


@functools.cache
def _warn(reason: str) -> None:
    warnings.warn(f"kvpolicy: the CPU kernels for quantized rows are not available ({reason}); "
                  f"eager decode over quantized rows takes the slower ATen path. Set CC "
                  f"to a C compiler with OpenMP, or KVPOLICY_BACKEND=torch to silence this.",
                  RuntimeWarning, stacklevel=3)


def usable(out: Tensor) -> bool:
    """Whether a step whose rows or query are ``out`` runs these kernels: float32 CPU
    tensors, backend auto or triton, not under torch.compile (inductor fuses the ATen path
    there), and the kernels built (else a one-time warning with the reason)."""
    if (backend() == "torch" or out.device.type != "cpu" or out.dtype != torch.float32
            or torch.compiler.is_compiling()):
        return False
    lib = _library()
    if isinstance(lib, str):
        _warn(lib)
        return False
    return True


def dequantize_rows(packed: Tensor, scale: Tensor, zero: Tensor, out: Tensor, *, bits: int,
                    per_token: bool, group: int) -> None:
    """Write the N rows of ``packed`` uint8 [B, G, M, D] (M = N * bits / 8, blocks as
    kvpolicy.quantized packs them) into out float32 [B, G, N, D] (rows contiguous, heads at
    one stride: a slice along N of a contiguous buffer). Keys (``per_token`` False): scale,
    zero float32 [B, G, ceil(N / group), D]; values: [B, G, N, D / group]."""
    B, G, M, D = packed.shape
    N = M * 8 // bits
    groups = (B, G, N, D // group) if per_token else (B, G, -(-N // group), D)
    if packed.dtype != torch.uint8 or not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous uint8, got {packed.dtype}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != groups:
            raise ValueError(f"{name} must be contiguous float32 {list(groups)}, got {t.dtype} "
                             f"{list(t.shape)}")
    if (tuple(out.shape) != (B, G, N, D) or out.dtype != torch.float32 or out.stride(3) != 1
            or out.stride(2) != D or out.stride(0) != G * out.stride(1)):
        raise ValueError(f"out must be float32 [{B}, {G}, {N}, {D}] with contiguous rows, got "
                         f"{out.dtype} {list(out.shape)} strides {out.stride()}")
    lib = _loaded()
    if N == 0:
        return
    lib.dequantize_rows_f32(packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr(),
                            B * G, M, D, bits, int(per_token), group, out.stride(1),
                            torch.get_num_threads())


def _rows_of(t: Tensor) -> Tensor:
    """t [B, G, n, D] with contiguous rows (a slice of a layer's buffer stays a view)."""
    return t if t.stride(3) == 1 and t.stride(2) == t.shape[3] else t.contiguous()


def fits(query: Tensor, values: Tensor) -> bool:
    """Whether quantized_attention's buffers hold these head sizes: D, Dv <= MAX_DIM and a
    KV group's query heads x Dv <= MAX_ACC."""
    H, D, G, Dv = query.shape[1], query.shape[-1], values.shape[1], values.shape[-1]
    return max(D, Dv) <= MAX_DIM and H // G * Dv <= MAX_ACC


def serves(query: Tensor, values: Tensor) -> bool:
    """Whether kvpolicy_kernels.quantized_attention runs these kernels for a decode step of
    ``query`` [B, H, 1, D] over ``values`` [B, G, n, Dv]: ``usable`` and ``fits``."""
    return usable(query) and fits(query, values)


def quantized_attention(query: Tensor, rows, keys: Tensor, values: Tensor, visible: Tensor, *,
                        bits: int, scaling: float, softcap: float = 0.0,
                        sinks: Tensor | None = None) -> Tensor:
    """out float32 [B, 1, H, Dv]: kvpolicy_kernels.quantized_attention (its shapes, checked
    there) for float32 CPU tensors that ``fits``. The logits come from the packed keys
    (quantized_logits_f32: each row dequantized once for its group's query heads), the
    model's softmax is attention_ref's over the [B, H, N + n] logits (softcap, sinks), and the
    output from the packed values (quantized_values_f32, in chunks of slots summed here).
    Each unit of work is a (batch row, KV head, chunk of the rows)."""
    key_codes, key_scale, key_zero, value_codes, value_scale, value_zero = (t.contiguous() for t in rows)
    B, H, _, D = query.shape
    G, n, Dv = keys.shape[1], keys.shape[2], values.shape[-1]
    M = key_codes.shape[2]
    S = M * 8 // bits + n
    floats = (query, keys, values, key_scale, key_zero, value_scale, value_zero)
    if any(t.dtype != torch.float32 for t in floats) or not fits(query, values):
        raise ValueError(f"quantized_cpu reads float32 rows and queries with D, Dv <= {MAX_DIM} and "
                         f"(H / G) * Dv <= {MAX_ACC}, got {[str(t.dtype) for t in floats]}, "
                         f"D = {D}, Dv = {Dv}, H / G = {H // G}")
    lib = _loaded()
    threads = torch.get_num_threads()
    chunks = max(1, -(-4 * threads // (B * G)))  # about four units a thread
    q = query.contiguous()
    keys, values, visible = _rows_of(keys), _rows_of(values), visible.contiguous()
    logits = q.new_empty(B, H, S)
    lib.quantized_logits_f32(q.data_ptr(), key_codes.data_ptr(), key_scale.data_ptr(),
                             key_zero.data_ptr(), keys.data_ptr(), keys.stride(0), keys.stride(1),
                             visible.data_ptr(), logits.data_ptr(), B, G, H, M, n, D, bits,
                             TOKEN_GROUP, scaling, chunks, threads)
    if softcap:  # the cap turns the hidden slots' -inf into -softcap: hide them again
        grouped = logits.view(B, G, H // G, S)
        grouped.div_(softcap).tanh_().mul_(softcap).masked_fill_(~visible[:, :, None], -torch.inf)
    sink = None if sinks is None else sinks.float().expand(B, H)
    probs, _ = _probabilities(logits, sink, False, torch.empty_like(logits), maybe_unseen=True)
    partial = q.new_empty(chunks, B, 1, H, Dv)
    lib.quantized_values_f32(probs.data_ptr(), value_codes.data_ptr(), value_scale.data_ptr(),
                             value_zero.data_ptr(), values.data_ptr(), values.stride(0),
                             values.stride(1), partial.data_ptr(), B, G, H, M, n, Dv, bits,
                             Dv // value_scale.shape[-1], chunks, threads)
    return partial.sum(0)
