"""RMSNorm and fused residual-add + RMSNorm."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param, tolerance  # noqa: E402

# (shape, dtype)
CASES = [
    pytest.param((5, 32), torch.float32, id="2d"),
    pytest.param((2, 3, 48), torch.float32, id="3d-hidden48"),
    pytest.param((1, 1000), torch.float32, id="hidden1000-one-row"),
    pytest.param((4, 64), torch.float16, id="fp16"),
    gpu_param((4096, 4096), torch.bfloat16, id="gpu-llama8b"),
    gpu_param((7, 5120), torch.bfloat16, id="gpu-hidden5120"),
]


def _inputs(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, residual = (torch.randn(shape, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    weight = (1.0 + 0.1 * torch.randn(shape[-1], generator=gen)).to(dtype).to(DEVICE)
    return x, residual, weight


@pytest.mark.parametrize("shape, dtype", CASES)
def test_rms_norm_matches_reference(shape, dtype):
    x, _, weight = _inputs(shape, dtype)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), rms_norm_ref(x, weight, 1e-5), **tolerance(dtype))


@pytest.mark.parametrize("shape, dtype", CASES)
def test_fused_add_rms_norm_matches_reference(shape, dtype):
    x, residual, weight = _inputs(shape, dtype)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = fused_add_rms_norm(x, residual, weight)
    expected_out, expected_residual = fused_add_rms_norm_ref(x, residual, weight)
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(out, expected_out, **tolerance(dtype))
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)  # inputs untouched


def test_strided_rows():
    x, residual, weight = _inputs((6, 40), torch.float32, seed=1)
    wide = torch.randn(6, 100, device=DEVICE)
    wide[:, 10:50] = x
    strided = wide[:, 10:50]
    out, new_residual = fused_add_rms_norm(strided, residual, weight)
    expected_out, expected_residual = fused_add_rms_norm_ref(x, residual, weight)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(new_residual, expected_residual)


def test_rejects_bad_arguments_naming_them():
    x, residual, weight = _inputs((3, 16), torch.float32)
    with pytest.raises(ValueError, match=r"^weight\b"):
        rms_norm(x, weight[:8])
    with pytest.raises(ValueError, match=r"^weight\b"):
        rms_norm(x, weight.half())
    with pytest.raises(ValueError, match=r"^x\b"):
        rms_norm(x.int(), weight)
    with pytest.raises(ValueError, match=r"^x\b"):
        rms_norm(x.t(), weight[:3])
    with pytest.raises(ValueError, match=r"^residual\b"):
        fused_add_rms_norm(x, residual[:2], weight)
    with pytest.raises(ValueError, match=r"^eps\b"):
        rms_norm(x, weight, eps=0.0)


FP8_CASES = [
    pytest.param((5, 64), torch.float32, id="fp32"),
    pytest.param((3, 96), torch.bfloat16, id="bf16-hidden96"),
    gpu_param((16, 4096), torch.bfloat16, id="gpu-llama8b"),
]


@pytest.mark.parametrize("shape, dtype", FP8_CASES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_fp8_output_is_the_per_token_quantization_of_the_norm(shape, dtype, with_residual):
    """Bit for bit: the codes and scales per_token_fp8 makes of the plain kernel's output."""
    from pagoda.kernels.fp8_quant import per_token_fp8_ref
    from pagoda.kernels.rmsnorm import fused_add_rms_norm_fp8, rms_norm_fp8

    x, residual, weight = _inputs(shape, dtype, seed=3)
    x[0] *= 40  # rows of very different ranges get their own scales
    if with_residual:
        q, scale, new_residual = fused_add_rms_norm_fp8(x, residual, weight)
        normed, expected_residual = fused_add_rms_norm(x, residual, weight)
        assert torch.equal(new_residual, expected_residual)
    else:
        q, scale = rms_norm_fp8(x, weight)
        normed = rms_norm(x, weight)
    expected_q, expected_scale = per_token_fp8_ref(normed)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (shape[0], 1)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


def test_fp8_output_needs_token_rows():
    from pagoda.kernels.rmsnorm import rms_norm_fp8

    x, _, weight = _inputs((2, 3, 16), torch.float32)
    with pytest.raises(ValueError, match="x must be \\(tokens, hidden\\)"):
        rms_norm_fp8(x, weight)
