"""SiLU-and-mul, the gated MLP activation: x (N, 2d) -> silu(x[:, :d]) * x[:, d:] (N, d).

Like HF's ``act_fn(gate) * up``, silu is rounded to the input dtype before the product.
"""

import torch

from pagoda.kernels._triton import cdiv, next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import FLOAT_DTYPES, check_same_device, check_tensor

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # (N, 2d)
    out_ptr,  # (N, d)
    stride_x,
    stride_o,
    d,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x (N, 2d) -> (N, d); the row stride of x may be anything, its last dim must be contiguous."""
    require_triton()
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if x.shape[1] % 2 != 0:
        raise ValueError(f"x's last dim must be even (gate and up halves), got {x.shape[1]}")
    num_rows, d = x.shape[0], x.shape[1] // 2
    if out is None:
        out = torch.empty((num_rows, d), dtype=x.dtype, device=x.device)
    check_tensor("out", out, ndim=2, dtypes=(x.dtype,))
    check_same_device(x=x, out=out)
    if tuple(out.shape) != (num_rows, d):
        raise ValueError(f"out shape {tuple(out.shape)} must be {(num_rows, d)}")
    if num_rows > 0 and d > 0:
        block = min(BLOCK, next_power_of_2(d))
        _silu_and_mul_kernel[(num_rows, cdiv(d, block))](
            x, out, x.stride(0), out.stride(0), d, BLOCK=block, num_warps=4 if block >= 512 else 1
        )
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Torch reference."""
    d = x.shape[-1] // 2
    return torch.nn.functional.silu(x[..., :d]) * x[..., d:]
