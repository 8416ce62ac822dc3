"""Unified causal paged attention (prefill, chunked prefill with a cached prefix, decode rows)."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.paged_prefill import paged_prefill, paged_prefill_ref  # noqa: E402
from pagoda.kernels.reshape_and_cache import reshape_and_cache  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param, make_paged_batch, tolerance  # noqa: E402

# (context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size)
CASES = [
    pytest.param([0, 0], [16, 7], 2, 2, 16, 4, id="prefill-mha"),
    pytest.param([0, 0, 0], [15, 16, 17], 4, 2, 32, 16, id="prefill-gqa2-boundaries"),
    pytest.param([16, 15, 17], [5, 9, 1], 8, 2, 16, 8, id="chunked-gqa4-prefix-boundaries"),
    pytest.param([0, 30, 7, 63], [20, 1, 1, 3], 4, 1, 16, 16, id="mixed-prefill-and-decode-rows"),
    pytest.param([3, 0, 11], [6, 0, 4], 6, 2, 24, 4, id="gqa3-headdim24-empty-query"),
    pytest.param([40], [70], 4, 4, 16, 8, id="long-chunk-after-prefix"),
    gpu_param([0, 0, 512, 4096], [1000, 17, 512, 1], 32, 8, 128, 16, id="gpu-llama8b-mixed"),
    gpu_param([2048, 15, 0], [300, 1, 2049], 16, 2, 128, 32, id="gpu-gqa8-chunked"),
    gpu_param([100, 0], [257, 64], 28, 4, 64, 16, id="gpu-gqa7-d64"),
    gpu_param([100, 0, 5], [600, 300, 1], 8, 4, 256, 16, id="gpu-gqa2-d256"),
    gpu_param([0, 50], [1024, 7], 12, 4, 96, 16, id="gpu-gqa3-d96"),
]


@pytest.mark.parametrize("max_query_len_hint", [None, 1], ids=["prefill-tiles", "decode-tiles"])
@pytest.mark.parametrize("context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size", CASES)
def test_matches_reference(
    context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, max_query_len_hint, request
):
    """The hint picks the tile shape; with 1 a program covers fewer query tokens, so long
    chunks span several programs and the block-to-sequence search is exercised."""
    dtype = torch.bfloat16 if request.node.get_closest_marker("gpu") else torch.float32
    batch = make_paged_batch(context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype)
    args = (batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.context_lens)
    out = paged_prefill(*args, max_query_len=max_query_len_hint)
    torch.testing.assert_close(out, paged_prefill_ref(*args), **tolerance(dtype))


def test_chunked_prefill_equals_dense_attention_over_the_whole_sequence():
    """Write a chunk's K/V through reshape_and_cache after a cached prefix, then compare with
    plain causal attention over the concatenated (contiguous) K/V: no block table involved."""
    num_heads, num_kv_heads, head_dim, context_len, chunk = 4, 2, 16, 13, 9
    batch = make_paged_batch([context_len], [chunk], num_heads, num_kv_heads, head_dim, 4, seed=3)
    new_k = torch.randn(chunk, num_kv_heads, head_dim, device=DEVICE)
    new_v = torch.randn(chunk, num_kv_heads, head_dim, device=DEVICE)
    reshape_and_cache(new_k, new_v, batch.kv_cache, batch.slot_mapping)
    out = paged_prefill(batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.context_lens)

    blocks = batch.block_tables[0].long()
    prefix_k = batch.kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
    prefix_v = batch.kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:context_len]
    k = torch.cat([prefix_k, new_k]).repeat_interleave(2, dim=1).transpose(0, 1)  # (Hq, n, D)
    v = torch.cat([prefix_v, new_v]).repeat_interleave(2, dim=1).transpose(0, 1)
    visible = torch.ones(chunk, context_len + chunk, dtype=torch.bool, device=DEVICE).tril(context_len)
    expected = torch.nn.functional.scaled_dot_product_attention(batch.q.transpose(0, 1), k, v, attn_mask=visible)
    torch.testing.assert_close(out, expected.transpose(0, 1), atol=1e-4, rtol=1e-4)


def test_padded_query_rows_are_left_alone():
    batch = make_paged_batch([5, 0], [3, 4], 2, 2, 16, 4, seed=4)
    q = torch.cat([batch.q, torch.randn(2, 2, 16, device=DEVICE)])  # 2 padding tokens past query_start_loc[-1]
    out = torch.full_like(q, 7.0)
    paged_prefill(q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.context_lens, out=out)
    assert torch.all(out[-2:] == 7.0)
    expected = paged_prefill_ref(batch.q, batch.kv_cache, batch.block_tables, batch.query_start_loc, batch.context_lens)
    torch.testing.assert_close(out[:-2], expected, atol=1e-4, rtol=1e-4)


def test_rejects_bad_arguments_naming_them():
    batch = make_paged_batch([4, 0], [2, 3], 4, 2, 16, 4)
    args = dict(
        q=batch.q,
        kv_cache=batch.kv_cache,
        block_tables=batch.block_tables,
        query_start_loc=batch.query_start_loc,
        context_lens=batch.context_lens,
    )
    bad = [
        ("query_start_loc", dict(query_start_loc=batch.query_start_loc[:-1])),
        ("query_start_loc", dict(query_start_loc=batch.query_start_loc.float())),
        ("block_tables", dict(block_tables=batch.block_tables[:1])),
        ("context_lens", dict(context_lens=batch.context_lens[:, None])),
        ("q", dict(q=batch.q.half())),
        ("out", dict(out=torch.empty(1, 4, 16, device=DEVICE))),
    ]
    for name, override in bad:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            paged_prefill(**{**args, **override})


def test_fp8_cache_chunked_prefill_reads_back_into_the_query_dtype():
    batch = make_paged_batch([0, 17, 40], [9, 5, 16], 4, 2, 16, 8, seed=5)
    cache = batch.kv_cache.to(torch.float8_e4m3fn)
    args = (batch.q, cache, batch.block_tables, batch.query_start_loc, batch.context_lens)
    out = paged_prefill(*args)
    assert out.dtype == batch.q.dtype
    torch.testing.assert_close(out, paged_prefill_ref(*args), atol=1e-5, rtol=1e-5)
