"""RMSNorm, plain and fused with the residual add that precedes it in every decoder layer.

Numerics follow HF transformers (LlamaRMSNorm): the residual sum is rounded to the input dtype,
normalised in float32, rounded back to the input dtype, then multiplied by the weight. One
program per row; the whole hidden dim is one tile.

``rms_norm_fp8`` / ``fused_add_rms_norm_fp8`` hand the normed rows on as FP8 for an FP8 linear layer:
the output as above (in the input dtype), quantized per token in the same program, bit for bit what
``pagoda.kernels.fp8_quant.per_token_fp8`` makes of it, without a second launch and a second read.
"""

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import FLOAT_DTYPES, check_same_device, check_tensor
from pagoda.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, quantize_row

MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # (N, H)
    residual_ptr,  # (N, H), read when HAS_RESIDUAL
    weight_ptr,  # (H,)
    out_ptr,  # (N, H)
    residual_out_ptr,  # (N, H), x + residual, written when HAS_RESIDUAL
    scale_ptr,  # (N,) float32 per-token scales, written when FP8_OUT (out_ptr is then float8_e4m3fn)
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    hidden,
    eps,
    min_scale,
    HAS_RESIDUAL: tl.constexpr,
    FP8_OUT: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = (normed * w).to(x_ptr.dtype.element_ty)
    if FP8_OUT:  # per_token_fp8's arithmetic on y (padding lanes are 0: no effect on the max)
        q, scale = quantize_row(y.to(tl.float32), min_scale, FP8_MAX)
        tl.store(out_ptr + row * stride_o + cols, q.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(scale_ptr + row, scale)
    else:
        tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def _as_rows(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) without a copy; the row stride may be anything."""
    check_tensor(name, tensor, dtypes=FLOAT_DTYPES)
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have at least one dim, got a scalar")
    if tensor.dim() == 2:
        return tensor
    try:
        return tensor.view(-1, tensor.shape[-1])
    except RuntimeError as err:
        raise ValueError(f"{name} of shape {tuple(tensor.shape)} cannot be viewed as rows: {err}") from err


def check_norm_params(weight: torch.Tensor, eps: float, dtype: torch.dtype, hidden: int, max_hidden: int) -> None:
    """ValueError unless weight is (hidden,) of ``dtype``, hidden <= max_hidden and eps > 0."""
    check_tensor("weight", weight, ndim=1, dtypes=(dtype,))
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements, expected x's hidden size {hidden}")
    if hidden > max_hidden:
        raise ValueError(f"x's hidden size {hidden} is over the kernel's limit {max_hidden}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _launch(x, residual, weight, eps, fp8_out=False):
    """(out, residual', scale); out in x's dtype, or float8_e4m3fn with float32 scales (N, 1) when ``fp8_out``."""
    require_triton()
    rows = _as_rows("x", x)
    hidden = rows.shape[1]
    check_norm_params(weight, eps, x.dtype, hidden, MAX_HIDDEN)
    check_same_device(x=x, weight=weight)
    res_rows = rows
    if residual is not None:
        res_rows = _as_rows("residual", residual)
        check_same_device(x=x, residual=residual)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )
    out = torch.empty(rows.shape, dtype=FP8_DTYPE if fp8_out else x.dtype, device=x.device)
    res_out = torch.empty(rows.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    scale = torch.empty((rows.shape[0], 1), dtype=torch.float32, device=x.device) if fp8_out else out
    block_n = next_power_of_2(hidden)
    if rows.shape[0] > 0:
        _rms_norm_kernel[(rows.shape[0],)](
            rows, res_rows, weight, out, res_out, scale,
            rows.stride(0), res_rows.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps, MIN_SCALE, HAS_RESIDUAL=residual is not None, FP8_OUT=fp8_out, FP8_MAX=FP8_MAX,
            BLOCK_N=block_n, num_warps=min(16, max(1, block_n // 512)),
        )  # fmt: skip
    return out.view(x.shape), res_out.view(x.shape), scale


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of x (..., H) with weight (H,); returns a new tensor."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """residual' = x + residual; returns (rms_norm(residual'), residual'), both new tensors."""
    return _launch(x, residual, weight, eps)[:2]


def rms_norm_fp8(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, H) -> ``per_token_fp8(rms_norm(x))``: (float8_e4m3fn (N, H), float32 scales (N, 1))."""
    out, _, scale = _launch(_rows_only(x), None, weight, eps, fp8_out=True)
    return out, scale


def fused_add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (N, H) -> (q, scales, residual') with (q, scales) = ``per_token_fp8(norm)`` of
    ``(norm, residual') = fused_add_rms_norm(x, residual)``."""
    out, res_out, scale = _launch(_rows_only(x), residual, weight, eps, fp8_out=True)
    return out, scale, res_out


def _rows_only(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden) for an FP8 output, got shape {tuple(x.shape)}")
    return x


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Torch reference, HF LlamaRMSNorm numerics."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference: the add in x's dtype, then rms_norm_ref."""
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed
