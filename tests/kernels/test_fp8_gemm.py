"""The FP8 GEMM for few rows against its torch reference (dequantized operands, float32 product)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.fp8_gemm import default_config, fp8_gemm, fp8_gemm_ref
from pagoda.kernels.fp8_quant import per_token_fp8_ref
from tests.kernels.paged_inputs import DEVICE, gpu_param

CASES = [  # (M, N, K, config); the CPU interpreter runs small tiles
    pytest.param(1, 48, 64, (16, 32, 64, 4, 1), id="decode-row-partial-tile"),
    pytest.param(5, 100, 300, (16, 32, 128, 4, 1), id="ragged-k"),
    pytest.param(17, 64, 256, (16, 16, 128, 4, 1), id="two-row-tiles"),
    pytest.param(3, 32, 400, (16, 32, 64, 4, 1, 3), id="split-k-ragged"),  # 7 blocks of K in slices of 3, 3, 1
    pytest.param(2, 16, 64, (16, 16, 64, 4, 1, 4), id="split-k-more-slices-than-blocks"),
    gpu_param(1, 6144, 4096, None, id="gpu-qkv-batch1"),
    gpu_param(16, 28672, 4096, None, id="gpu-gate-up-batch16"),
    gpu_param(1, 4096, 14336, None, id="gpu-down-batch1-split-k"),
    gpu_param(64, 4096, 14336, None, id="gpu-down-batch64"),
]


@pytest.mark.parametrize("m, n, k, config", CASES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_reference(m, n, k, config, out_dtype):
    gen = torch.Generator().manual_seed(m * 7 + n)
    a, a_scale = per_token_fp8_ref(torch.randn(m, k, generator=gen))
    w = torch.randn(n, k, generator=gen) * torch.linspace(0.01, 1, n).unsqueeze(1)
    b_scale = w.abs().amax(dim=1) / 448
    b = (w / b_scale[:, None]).to(torch.float8_e4m3fn)
    a, a_scale, b, b_scale = (t.to(DEVICE) for t in (a, a_scale, b, b_scale))
    got = fp8_gemm(a, b, a_scale, b_scale, out_dtype=out_dtype, config=config)
    expected = fp8_gemm_ref(a, b, a_scale, b_scale, out_dtype=torch.float32)
    # float32 sums in another order: differences scale with the largest output (K = 14,336 on the GPU)
    atol = (1e-5 if out_dtype == torch.float32 else 1e-2) * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got.float(), expected, rtol=1e-5 if out_dtype == torch.float32 else 1e-2, atol=atol)


def test_rejects_mismatched_operands():
    a, a_scale = per_token_fp8_ref(torch.randn(2, 64))
    b = torch.zeros(32, 48, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="b must be \\(N, 64\\)"):
        fp8_gemm(a.to(DEVICE), b.to(DEVICE), a_scale.to(DEVICE), torch.ones(32, device=DEVICE))
    with pytest.raises(ValueError, match="a has dtype torch.bfloat16"):
        fp8_gemm(torch.ones(2, 64, dtype=torch.bfloat16, device=DEVICE), b.to(DEVICE), a_scale.to(DEVICE),
                 torch.ones(32, device=DEVICE))
    assert default_config(1, 4096, 4096)[0] == 16 and default_config(64, 4096, 4096)[0] == 32
    assert default_config(1, 4096, 14336)[-1] > 1 == default_config(1, 6144, 4096)[-1]  # down splits K
