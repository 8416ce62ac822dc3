"""Dynamic per-token FP8 (E4M3) quantization of activations: one pass, one program per row.

Each row x gets ``scale = max(|x|) / 448`` (at least ``MIN_SCALE``, so an all-zero row quantizes to
zeros), and ``q = round_to_e4m3(clamp(x / scale, -448, 448))``, what ``torch._scaled_mm`` takes with
``scale_a = scale`` (one float32 per row). ``per_token_fp8_ref`` is the torch reference: the kernel's
output equals it bit for bit.

The kernel rounds to the E4M3 grid in float32 itself (round half to even) before the cast, so the cast
is exact: on the GPU that is the same as converting directly; Triton's CPU interpreter (the tests'
TRITON_INTERPRET=1) does not carry a rounded-up mantissa into the exponent (31.6 becomes 16, not 32).
"""

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import FLOAT_DTYPES, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # vLLM's floor: tiny rows keep a finite, non-zero scale
MAX_HIDDEN = 65536


@triton.jit
def round_to_e4m3(v):
    """fp32 values in [-448, 448] -> the nearest E4M3 value (ties to even), still fp32; the sign of a
    value that rounds to zero is kept, as a cast keeps it (set as a bit: on the GPU a float select between
    ``-r`` and ``r`` came out +0.0 for negative values that round to zero)."""
    bits = v.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF  # biased fp32 exponent
    exp = tl.maximum(exp, 127 - 6)  # below E4M3's smallest normal (2^-6) the step stays 2^-9
    ulp = ((exp - 3) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits: the step is 2^(e-3)
    magic = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds |y| < 2^22 to an integer, ties to even
    rounded = ((tl.math.div_rn(tl.abs(v), ulp) + magic) - magic) * ulp
    sign = bits & -2147483648  # 0x80000000: the sign bit alone
    return (rounded.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_row(x, min_scale, FP8_MAX: tl.constexpr):
    """One row x (fp32, padding lanes 0) -> (codes on the E4M3 grid, still fp32; its scale). The scale as
    torch computes it (times the float32 reciprocal); the division rounded as torch's is (Triton's default
    fp32 division on the GPU is approximate)."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=0) * (1.0 / FP8_MAX), min_scale)
    return round_to_e4m3(tl.clamp(tl.math.div_rn(x, scale), -FP8_MAX, FP8_MAX)), scale


@triton.jit
def _per_token_fp8_kernel(
    x_ptr,  # (N, K)
    q_ptr,  # (N, K) float8_e4m3fn
    scale_ptr,  # (N,) float32
    stride_x,
    stride_q,
    hidden,
    min_scale,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    q, scale = quantize_row(x, min_scale, FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, K) float -> (q (N, K) float8_e4m3fn, scale (N, 1) float32) with x ~= q * scale."""
    require_triton()
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    num_rows, hidden = x.shape
    if hidden > MAX_HIDDEN:
        raise ValueError(f"x's last dim {hidden} is over the kernel's limit {MAX_HIDDEN}")
    q = torch.empty((num_rows, hidden), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((num_rows, 1), dtype=torch.float32, device=x.device)
    block = next_power_of_2(hidden)
    if num_rows > 0:
        _per_token_fp8_kernel[(num_rows,)](
            x, q, scale, x.stride(0), q.stride(0), hidden, MIN_SCALE,
            FP8_MAX=FP8_MAX, BLOCK=block, num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return q, scale


def per_token_fp8_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of ``per_token_fp8`` (also the CPU path): the same scales, the same rounding."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) * (1.0 / FP8_MAX)).clamp(min=MIN_SCALE)
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
