"""Random paged-attention batches for the kernel tests: a shuffled block pool, ragged sequences."""

from dataclasses import dataclass

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_param(*values, id: str):
    """A test case at real shapes, run only on the device machine (pytest -m gpu)."""
    return pytest.param(*values, id=id, marks=[pytest.mark.gpu, ON_GPU])


def tolerance(dtype: torch.dtype) -> dict:
    return {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=5e-3, rtol=5e-3)}.get(
        dtype, dict(atol=3e-2, rtol=3e-2)
    )


@dataclass
class PagedBatch:
    q: torch.Tensor  # (T, Hq, D)
    kv_cache: torch.Tensor  # (2, num_blocks, block_size, Hkv, D), random everywhere
    block_tables: torch.Tensor  # (B, max_blocks) int32, padded with 0
    query_start_loc: torch.Tensor  # (B + 1,) int32
    context_lens: torch.Tensor  # (B,) int32
    seq_lens: torch.Tensor  # (B,) int32
    slot_mapping: torch.Tensor  # (T,) int64: cache slot of each query token


def make_paged_batch(
    context_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """Each sequence's blocks are drawn from a shuffled pool (plus spare blocks never referenced)."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + 3
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = torch.zeros(len(seq_lens), max(blocks_per_seq) + 1, dtype=torch.int32)
    slots = []
    for b, count in enumerate(blocks_per_seq):
        row, pool = pool[:count], pool[count:]
        block_tables[b, :count] = torch.tensor(row, dtype=torch.int32)
        for pos in range(context_lens[b], seq_lens[b]):
            slots.append(row[pos // block_size] * block_size + pos % block_size)
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    q = torch.randn(sum(query_lens), num_heads, head_dim, generator=gen)
    starts = torch.tensor([0] + query_lens).cumsum(0).to(torch.int32)
    return PagedBatch(
        q=q.to(dtype).to(DEVICE),
        kv_cache=kv_cache.to(dtype).to(DEVICE),
        block_tables=block_tables.to(DEVICE),
        query_start_loc=starts.to(DEVICE),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
    )
