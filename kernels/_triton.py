"""Triton when it is installed; inert stand-ins when it is not.

The kernel modules decorate with ``triton.jit`` and annotate with ``tl.constexpr`` at import
time. Importing through here keeps their torch references usable on a machine without triton
(a CPU-only laptop); the wrappers call ``require_triton()`` before launching anything.
"""

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit)
    tl = SimpleNamespace(constexpr=None)


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use the torch reference (kernels.*_ref) instead")


def check_device(name: str, tensor: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (TRITON_INTERPRET=1)."""
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return
    raise ValueError(
        f"{name} is on {tensor.device}: triton kernels need CUDA tensors "
        "(or CPU tensors with TRITON_INTERPRET=1 set before triton is imported)"
    )


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
