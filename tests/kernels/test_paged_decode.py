"""Split-K paged decode attention against the gather-then-dense torch reference."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.paged_decode import paged_decode, paged_decode_ref  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param, make_paged_batch, tolerance  # noqa: E402

# (seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits)
CASES = [
    pytest.param([16, 15, 17], 4, 4, 16, 4, 1, id="mha-block-boundaries"),
    pytest.param([32, 31, 33, 1], 4, 2, 32, 16, 1, id="gqa2-bs16-boundaries"),
    pytest.param([7, 40, 1, 64], 8, 2, 16, 8, 3, id="gqa4-split3-ragged"),
    pytest.param([48, 5], 6, 2, 24, 16, 4, id="gqa3-headdim24-split4"),
    pytest.param([12, 0, 9], 2, 2, 16, 4, 2, id="zero-length-padding-row"),
    pytest.param([99, 64], 4, 1, 16, 16, 8, id="mqa-more-splits-than-tiles"),
    gpu_param([4096, 4095, 4097, 1, 2047, 777, 16, 3000], 32, 8, 128, 16, None, id="gpu-llama8b"),
    gpu_param([1024, 513, 1], 16, 2, 128, 32, 5, id="gpu-gqa8-split5"),
    gpu_param([2000, 17], 28, 4, 64, 16, None, id="gpu-gqa7-d64"),
    gpu_param([3000, 129, 256], 8, 1, 256, 16, None, id="gpu-mqa-d256"),
    gpu_param([700, 1500], 12, 4, 96, 16, 2, id="gpu-gqa3-d96"),
]


@pytest.mark.parametrize("seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits", CASES)
def test_matches_reference(seq_lens, num_heads, num_kv_heads, head_dim, block_size, num_splits, request):
    dtype = torch.bfloat16 if request.node.get_closest_marker("gpu") else torch.float32
    batch = make_paged_batch(
        [max(n - 1, 0) for n in seq_lens], [1] * len(seq_lens), num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    batch.seq_lens.copy_(torch.tensor(seq_lens))  # a zero-length row is padding: it has no query token
    out = paged_decode(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens, num_splits=num_splits)
    expected = paged_decode_ref(batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens)
    torch.testing.assert_close(out, expected, **tolerance(dtype))


def test_split_count_does_not_change_the_result():
    batch = make_paged_batch([44, 20], [1, 1], 4, 2, 16, 8, seed=1)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.seq_lens)
    one = paged_decode(*args, num_splits=1)
    torch.testing.assert_close(paged_decode(*args, num_splits=5), one, atol=1e-5, rtol=1e-5)


def test_custom_scale_strided_q_and_out_buffer():
    batch = make_paged_batch([20, 9], [1, 1], 4, 2, 16, 4, seed=2)
    fused = torch.randn(2, 3 * 4 * 16, device=DEVICE)  # q as a slice of a fused QKV output
    q = fused[:, : 4 * 16].view(2, 4, 16)
    out = torch.empty_like(q)
    result = paged_decode(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3, num_splits=2, out=out)
    assert result is out
    torch.testing.assert_close(out, paged_decode_ref(q, batch.kv_cache, batch.block_tables, batch.seq_lens, 0.3))


def test_rejects_bad_arguments_naming_them():
    batch = make_paged_batch([8], [1], 4, 2, 16, 4)
    args = dict(q=batch.q, kv_cache=batch.kv_cache, block_tables=batch.block_tables, seq_lens=batch.seq_lens)
    bad = [
        ("block_tables", dict(block_tables=batch.block_tables.long())),
        ("q", dict(q=batch.q[..., :8])),
        ("q", dict(q=batch.q[:, :3])),
        ("kv_cache", dict(kv_cache=batch.kv_cache[0])),
        ("seq_lens", dict(seq_lens=batch.seq_lens.repeat(2))),
        ("q", dict(q=batch.q.double())),
        ("q", dict(q=batch.q.transpose(1, 2).contiguous().transpose(1, 2))),
    ]
    for name, override in bad:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            paged_decode(**{**args, **override})
    with pytest.raises(ValueError, match="num_splits"):
        paged_decode(**args, num_splits=0)


@pytest.mark.parametrize("q_dtype", [torch.float32, gpu_param(torch.bfloat16, id="gpu-bf16")])  # no bf16 dots in the interpreter
def test_fp8_cache_reads_back_into_the_query_dtype(q_dtype):
    batch = make_paged_batch([30, 7, 50], [1, 1, 1], 4, 2, 16, 8, seed=4)
    cache = batch.kv_cache.to(torch.float8_e4m3fn)
    q = batch.q.to(q_dtype)
    out = paged_decode(q, cache, batch.block_tables, batch.seq_lens, num_splits=2)
    assert out.dtype == q_dtype
    expected = paged_decode_ref(q, cache, batch.block_tables, batch.seq_lens)  # the dequantized cache, in fp32
    torch.testing.assert_close(out, expected, **({"atol": 1e-5, "rtol": 1e-5} if q_dtype == torch.float32 else
                                                  {"atol": 2e-2, "rtol": 2e-2}))
