"""RMSNorm, optionally fused with the residual add that precedes it, and under tensor parallelism
with the all-reduce of a row-parallel layer's partial sums before that.

Numerics follow HF: normalise in float32, cast back to the input dtype, then scale by the weight.
"""

from __future__ import annotations

import torch
from torch import nn

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
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

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None, partial: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``s = x + residual`` and returns ``(norm(s), s)``.

        ``partial``: x is this rank's partial sum of a row-parallel layer (built with
        ``reduce_results=False``); it is all-reduced first, fused into the norm where the group can
        (``TPGroup.all_reduce_rms_norm``). Every rank must then call this with the same shapes.
        """
        if partial and self.tp.world_size > 1:
            return self.tp.all_reduce_rms_norm(x, residual, self.weight, self.eps)
        return rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
