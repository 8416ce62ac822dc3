"""The microbenchmarks import without CUDA and produce sane numbers on a GPU."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels import bench  # noqa: E402
from tests.kernels.paged_inputs import ON_GPU  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_run_all_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="CUDA"):
        bench.run_all()


@pytest.mark.gpu
@ON_GPU
def test_small_benchmarks_report_positive_rates():
    results = [
        bench.bench_rms_norm(num_tokens=64, hidden=1024, ceiling=1000.0),
        bench.bench_paged_decode(batch=2, context=300, num_heads=8, num_kv_heads=2, head_dim=64, ceiling=1000.0),
        bench.bench_paged_prefill(batch=1, query_len=100, context=50, num_heads=8, num_kv_heads=2, head_dim=64),
    ]
    for result in results:
        assert result.ms > 0 and result.achieved > 0 and result.baseline_ms > 0
    assert "of ceiling" in bench.format_table({"GB/s": 1.0, "TFLOP/s": 1.0}, results)
