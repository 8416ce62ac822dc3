"""RMSNorm, optionally fused with the residual add that precedes it, and under tensor parallelism
with the all-reduce of a row-parallel layer's partial sums before that.

Numerics follow HF: normalise in float32, cast back to the input dtype, then scale by the weight.

``fp8_output``: the norm's one reader is an FP8 linear layer with per-token activation scales (set by
``pagoda.engine.quantization``), so the norm returns its output quantized (``Fp8Rows``), in the same
kernel on CUDA.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.fp8 import Fp8Rows, quantize_activations
from pagoda.engine.layers.linear import default_weight_loader
from pagoda.kernels import rmsnorm as triton_rmsnorm
from pagoda.kernels._triton import HAS_TRITON


def rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``norm(x)``; with ``residual``: ``s = x + residual`` and returns ``(norm(s), s)``. One Triton
    kernel on CUDA, torch ops elsewhere (the numerics of ``pagoda.kernels.rmsnorm.fused_add_rms_norm_ref``)."""
    if x.is_cuda and HAS_TRITON:  # one fused kernel instead of ~6 elementwise launches
        if residual is None:  # per-head norms (Qwen3 q/k) get strided (T, H, D) views: rows first
            return triton_rmsnorm.rms_norm(x.reshape(-1, x.shape[-1]), weight, eps).view(x.shape)
        return triton_rmsnorm.fused_add_rms_norm(x, residual, weight, eps)
    if residual is None:
        return _norm(x, weight, eps)
    x = x + residual
    return _norm(x, weight, eps), x


def rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> Fp8Rows | tuple[Fp8Rows, torch.Tensor]:
    """``rms_norm``, its output quantized per token for an FP8 layer: one kernel on CUDA."""
    if x.is_cuda and HAS_TRITON and x.dim() == 2:
        if residual is None:
            return Fp8Rows(*triton_rmsnorm.rms_norm_fp8(x, weight, eps), x.dtype)
        q, scale, summed = triton_rmsnorm.fused_add_rms_norm_fp8(x, residual, weight, eps)
        return Fp8Rows(q, scale, x.dtype), summed
    return _to_fp8(rms_norm(x, residual, weight, eps))


def _to_fp8(out: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> Fp8Rows | tuple[Fp8Rows, torch.Tensor]:
    """A norm's output (and residual) with the output quantized per token."""
    normed, rest = (out[0], out[1:]) if isinstance(out, tuple) else (out, ())
    rows = normed.reshape(-1, normed.shape[-1])
    fp8 = Fp8Rows(*quantize_activations(rows, None), normed.dtype)
    return (fp8, *rest) if rest else fp8


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(nn.Module):
    """``tp`` is the group whose partial sums ``forward(..., partial=True)`` reduces; None: one rank."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, tp: TPGroup | None = None):
        super().__init__()
        self.eps = eps
        self.tp = tp or SINGLE_RANK
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader
        self.fp8_output = False  # return Fp8Rows (see the module docstring)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False
    ) -> torch.Tensor | Fp8Rows | tuple[torch.Tensor | Fp8Rows, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``s = x + residual`` and returns ``(norm(s), s)``; ``norm(...)``
        as ``Fp8Rows`` when ``fp8_output``.

        ``partial``: x is this rank's partial sum of a row-parallel layer (built with
        ``reduce_results=False``); it is all-reduced first, fused into the norm where the group can
        (``TPGroup.all_reduce_rms_norm``). Every rank must then call this with the same shapes.
        """
        if partial and self.tp.world_size > 1:
            out = self.tp.all_reduce_rms_norm(x, residual, self.weight, self.eps)
            return _to_fp8(out) if self.fp8_output else out
        if self.fp8_output:
            return rms_norm_fp8(x, residual, self.weight, self.eps)
        return rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}" + (", fp8_output" if self.fp8_output else "")
