"""CPU matmuls on weights packed once for oneDNN.

``F.linear`` on CPU runs the BLAS GEMM on the plain ``(out, in)`` weight at every call. oneDNN's linear
on a weight reordered once at load time into its own blocked layout (what inductor's weight freezing
does) runs a step of the embedded model's GEMMs (30 layers' weights
streamed from memory, 2 cores) 1.15-1.4x faster in float32 for M = 4..32 tokens and 1.2-1.7x in
bfloat16 (AMX) for M = 1..32; at M = 1 (float32) and 2048 it is within 6% either way. bench/offline_cpu.py
measures the whole engine.

A packed weight is an opaque oneDNN tensor: only ``packed_linear`` reads it. The worker packs a CPU
model once after loading it (``pack_model``); a layer whose ``pack_cpu_weight`` packed its weight reads
the packed copy from then on, and drops its plain weight where nothing else shares it.
"""

from __future__ import annotations

import torch
from torch import nn

PACK_BATCH_HINT = 16  # the batch size oneDNN lays the weight out for: a decode batch (1-32 all gain with it)
# the op itself, not its overload packet: the packet's Python dispatch costs ~10 us a call, 121 calls a step
_LINEAR = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default", None)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """A oneDNN-packed copy of a CPU (out, in) weight, or None where oneDNN cannot take it (no
    oneDNN in this torch, another device or dtype, no bf16 support on this CPU)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not torch.backends.mkldnn.is_available() or _LINEAR is None:
        return None
    if weight.dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return None
    elif weight.dtype != torch.float32:
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH_HINT)
    except (RuntimeError, AttributeError):  # an older torch, or a shape oneDNN refuses: plain F.linear
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``pack_weight(weight)``: x (..., in) -> (..., out)."""
    out = _LINEAR(x.reshape(-1, x.shape[-1]).contiguous(), packed, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


def pack_model(model: nn.Module) -> int:
    """Pack the weight of every module of ``model`` that has ``pack_cpu_weight``; returns how many packed."""
    return sum(bool(m.pack_cpu_weight()) for m in model.modules() if hasattr(m, "pack_cpu_weight"))
