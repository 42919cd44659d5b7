"""Which implementation an op runs: ``KVPOLICY_BACKEND`` = auto (default) | triton | torch.

auto: Triton on CUDA tensors, the PyTorch reference elsewhere. triton: always the kernel;
on CPU tensors that needs ``TRITON_INTERPRET=1`` set before ``kvpolicy_kernels`` is
imported (the kernels are then numpy-interpreted). torch: always the reference.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    """The requested backend, validated."""
    choice = os.environ.get("KVPOLICY_BACKEND", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"KVPOLICY_BACKEND must be one of {BACKENDS}, got {choice!r}")
    return choice


def is_interpreted(kernel: object) -> bool:
    """True when ``kernel`` was jitted under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def use_triton(device: torch.device, kernel: object) -> bool:
    """True when an op on ``device`` should launch the Triton ``kernel`` (a jitted function)."""
    choice = backend()
    if choice == "torch" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda" and not is_interpreted(kernel):
        raise RuntimeError(
            "KVPOLICY_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 in the environment "
            "before kvpolicy_kernels (and triton) are imported"
        )
    return True
