"""Per-token FP8 quantization against its torch reference: bit-exact codes and scales."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.fp8_quant import FP8_MAX, MIN_SCALE, per_token_fp8, per_token_fp8_ref
from tests.kernels.paged_inputs import DEVICE, gpu_param

CASES = [
    pytest.param((5, 64), torch.float32, id="fp32"),
    pytest.param((3, 100), torch.bfloat16, id="bf16-hidden100"),
    pytest.param((1, 4096), torch.float16, id="fp16-one-row"),
    gpu_param((4096, 14336), torch.bfloat16, id="gpu-llama8b-mlp"),
    gpu_param((1, 4096), torch.bfloat16, id="gpu-decode"),
]


def _assert_same(got, expected):
    (q, scale), (q_ref, scale_ref) = got, expected
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == (q.shape[0], 1)
    torch.testing.assert_close(scale, scale_ref, atol=0, rtol=0)
    mismatched = (q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()
    assert mismatched == 0, f"{mismatched} of {q.numel()} codes differ from the reference"


@pytest.mark.parametrize("shape, dtype", CASES)
def test_per_token_fp8_matches_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    # rows of very different magnitudes, so every binade of E4M3 (and its subnormals) is exercised
    x = (torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[0]).unsqueeze(1)).to(dtype).to(DEVICE)
    _assert_same(per_token_fp8(x), per_token_fp8_ref(x))


def test_rounding_ties_and_exponent_carry():
    # values that round up into the next binade (31.6 -> 32) and exact ties (ties go to the even code)
    row = torch.tensor([448.0, 31.6, -126.3, 0.0, 17.0, 19.0, -0.0009, 2.0**-9 * 1.5, 1e-6], device=DEVICE)
    x = row.repeat(2, 8)[:, :64].contiguous()
    _assert_same(per_token_fp8(x), per_token_fp8_ref(x))
    q, scale = per_token_fp8(x)
    assert scale[0, 0].item() == 1.0 and q[0, 1].float().item() == 32.0 and q[0, 4].float().item() == 16.0


def test_zero_row_and_strided_rows():
    wide = torch.randn(4, 96, device=DEVICE)
    wide[2] = 0.0
    x = wide[:, 16:80]  # row stride 96
    q, scale = per_token_fp8(x)
    _assert_same((q, scale), per_token_fp8_ref(x))
    assert scale[2, 0].item() == pytest.approx(MIN_SCALE) and not q[2].float().any()
    assert (q.float() * scale - x).abs().max() <= x.abs().amax(dim=1).max() / FP8_MAX * 16  # half a step at most


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="x must have 2 dims"):
        per_token_fp8(torch.randn(2, 3, 16, device=DEVICE))
    with pytest.raises(ValueError, match="x has dtype torch.int32"):
        per_token_fp8(torch.ones(2, 16, dtype=torch.int32, device=DEVICE))
