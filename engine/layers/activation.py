"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import activation as triton_ops
from pagoda.kernels._triton import HAS_TRITON


class SiluAndMul(nn.Module):
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim: (..., 2I) -> (..., I)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and HAS_TRITON and x.dim() == 2:
            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
