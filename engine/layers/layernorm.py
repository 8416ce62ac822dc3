"""RMSNorm, optionally fused with the residual add that precedes it.

Numerics follow HF: normalise in float32, cast back to the input dtype, then scale by the weight.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from engine.layers.linear import default_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``s = x + residual`` and returns ``(norm(s), s)``."""
        if x.is_cuda and kernels.HAS_TRITON:  # one fused kernel instead of ~6 elementwise launches
            if residual is None:  # per-head norms (Qwen3 q/k) get strided (T, H, D) views: rows first
                return kernels.rms_norm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
