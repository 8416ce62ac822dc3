"""FP8 (E4M3) linear layers: ``y = (q_x * s_x) @ (q_w * s_w).T + b`` in one scaled GEMM.

Invariants:
- Weights: ``float8_e4m3fn`` ``(out, in)`` with one float32 scale per output row (``weight_scale``
  ``(out,)``); a layer quantized here gets ``s_w = max|w_row| / 448``, a checkpoint's per-tensor
  scales become rows of equal scales (q, k and v keep their own).
- Activations: per token at run time (``s_x = max|x_row| / 448``), or one static scale from the
  checkpoint (``input_scale``, the largest of a fused layer's parts).
- The GEMM is ``torch._scaled_mm`` with row-wise scales (CUTLASS / cuBLASLt on Hopper and Ada; torch's
  own kernel on CPU, for tests), the output in the activations' dtype; a bias is added after it. A
  decode-sized batch on the GPU (at most ``SMALL_M`` rows) takes ``kernels/fp8_gemm.py`` instead, a
  Triton GEMM that splits long K over more programs (``bench/results/fp8_gemm_splitk_h100.md``, 8B shape,
  M = 1: a layer's four GEMMs 137 us against 148 us; gate_up alone is slower with the default config).
  Both take the same FP8 operands and scales.
- The LM head, the embedding and a vision tower stay in the model's dtype.
- An RMSNorm whose only reader is an FP8 layer with per-token scales hands it ``Fp8Rows``, quantized
  in the norm's own kernel (``RMSNorm.fp8_output``): the same codes and scales, one launch fewer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels.fp8_gemm import fp8_gemm
from pagoda.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, MIN_SCALE, per_token_fp8, per_token_fp8_ref

MIN_CAPABILITY = (8, 9)  # Ada and Hopper have FP8 tensor cores
SMALL_M = 16  # rows up to which the Triton GEMM runs a layer's GEMMs faster than _scaled_mm (measured M = 1-16)


@dataclass(frozen=True)
class Fp8Rows:
    """Activations already quantized for an FP8 layer: codes (T, K) float8_e4m3fn, scales (T, 1) float32
    (per token), and ``dtype``, the activations' own dtype, which the layer's output takes."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def check_fp8_support(device: torch.device, dtype: torch.dtype) -> None:
    """ValueError unless FP8 linear layers can run on ``device`` with activations of ``dtype``."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < MIN_CAPABILITY:
            raise ValueError(
                f"quantization 'fp8' needs a GPU of compute capability >= 8.9 (Ada, Hopper), "
                f"this {torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}"
            )
        if dtype != torch.bfloat16:  # cuBLASLt's row-wise scaled GEMM writes bf16 only
            raise ValueError(f"quantization 'fp8' on CUDA needs dtype bfloat16, got {str(dtype).removeprefix('torch.')}")
    elif device.type != "cpu":
        raise ValueError(f"quantization 'fp8' runs on cuda or cpu, not {device.type}")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float -> (float8_e4m3fn (out, in), float32 scale (out,)), one scale per output row."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=MIN_SCALE)
    return (w / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def quantize_activations(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> (float8 (M, K), float32 (M, 1)): per token, or with the static scale ``input_scale`` (a scalar)."""
    if input_scale is not None:
        q = (x.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return q, input_scale.reshape(1, 1).expand(x.shape[0], 1).contiguous()  # row-wise, as _scaled_mm takes it
    return per_token_fp8(x) if x.is_cuda else per_token_fp8_ref(x)


def fp8_linear(
    x: torch.Tensor | Fp8Rows,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, through an FP8 weight (out, in) with row scales (out,).
    ``x`` may come quantized already (``Fp8Rows``, per-token scales; not with a static ``input_scale``)."""
    if isinstance(x, Fp8Rows):
        if input_scale is not None:
            raise ValueError("a layer with a static input_scale takes float activations, not per-token Fp8Rows")
        q, x_scale, dtype, lead = x.q, x.scale, x.dtype, x.q.shape[:-1]
    else:
        q, x_scale = quantize_activations(x.reshape(-1, x.shape[-1]), input_scale)
        dtype, lead = x.dtype, x.shape[:-1]
    if q.is_cuda and q.shape[0] <= SMALL_M:
        out = fp8_gemm(q, weight, x_scale, weight_scale, out_dtype=dtype)
    else:  # weight.t() is (in, out) column-major: the layout _scaled_mm wants for its second operand
        out = torch._scaled_mm(q, weight.t(), scale_a=x_scale, scale_b=weight_scale.view(1, -1), out_dtype=dtype)
    if bias is not None:
        out = out + bias
    return out.view(*lead, out.shape[-1])


def dequantize(weight: torch.Tensor, weight_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight an FP8 weight with row scales stands for (tests, accuracy reports)."""
    return (weight.float() * weight_scale.float().unsqueeze(1)).to(dtype)
