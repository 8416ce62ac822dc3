"""SiLU(x[:, :d]) * x[:, d:]."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param, tolerance  # noqa: E402

CASES = [
    pytest.param(5, 16, torch.float32, id="small"),
    pytest.param(3, 40, torch.float32, id="d40"),
    pytest.param(2, 1500, torch.float32, id="d1500-two-programs-per-row"),
    pytest.param(4, 64, torch.float16, id="fp16"),
    gpu_param(4096, 14336, torch.bfloat16, id="gpu-llama8b"),
    gpu_param(3, 13696, torch.bfloat16, id="gpu-glm4"),
]


@pytest.mark.parametrize("num_rows, d, dtype", CASES)
def test_matches_reference(num_rows, d, dtype):
    x = (3 * torch.randn(num_rows, 2 * d, generator=torch.Generator().manual_seed(0))).to(dtype).to(DEVICE)
    torch.testing.assert_close(silu_and_mul(x), silu_and_mul_ref(x), **tolerance(dtype))


def test_strided_input_and_out_buffer():
    wide = torch.randn(4, 3 * 24, device=DEVICE)
    x = wide[:, :48]
    out = torch.empty(4, 24, device=DEVICE)
    assert silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, silu_and_mul_ref(x))


def test_rejects_bad_arguments_naming_them():
    x = torch.randn(3, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"^x\b"):
        silu_and_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(ValueError, match=r"^x\b"):
        silu_and_mul(x[None])
    with pytest.raises(ValueError, match=r"^out\b"):
        silu_and_mul(x, out=torch.empty(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"^out\b"):
        silu_and_mul(x, out=torch.empty(3, 4, dtype=torch.float16, device=DEVICE))
