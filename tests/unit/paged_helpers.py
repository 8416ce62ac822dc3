"""A stand-in for the block manager + model runner in tests: block tables, slot mappings, metadata."""

from __future__ import annotations

import random

import torch

from pagoda.engine.attention_metadata import AttentionMetadata


def make_metadata(
    block_tables: list[list[int]], context_lens: list[int], query_lens: list[int], block_size: int
) -> tuple[torch.Tensor, AttentionMetadata]:
    """Positions (T,) and the AttentionMetadata of one step, exactly as the contract describes."""
    slots, positions = [], []
    for table, ctx, q in zip(block_tables, context_lens, query_lens):
        for pos in range(ctx, ctx + q):
            positions.append(pos)
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        context_lens=torch.tensor(context_lens, dtype=torch.int32),
        block_tables=torch.tensor(padded, dtype=torch.int32),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )
    return torch.tensor(positions, dtype=torch.int64), attn


class PagedKV:
    """Per-sequence block tables over a shuffled pool, and KV caches pre-filled with noise
    (so a read of a slot that was never written shows up as a wrong answer, not as zeros)."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int, seed=0):
        gen = torch.Generator().manual_seed(seed)
        shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
        self.kv_caches = [torch.randn(shape, generator=gen) * 10 for _ in range(num_layers)]
        self.block_size = block_size
        self.free = list(range(1, num_blocks))  # block 0 stays unused: it is the table padding value
        random.Random(seed).shuffle(self.free)
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, chunks: list[tuple[str, int]]) -> tuple[torch.Tensor, AttentionMetadata]:
        """Schedule ``num_tokens`` more tokens for each ``(seq_id, num_tokens)``; grows block tables."""
        tables, ctx_lens, q_lens = [], [], []
        for seq_id, num_tokens in chunks:
            table = self.tables.setdefault(seq_id, [])
            ctx = self.lens.get(seq_id, 0)
            while len(table) * self.block_size < ctx + num_tokens:
                table.append(self.free.pop())
            self.lens[seq_id] = ctx + num_tokens
            tables.append(table)
            ctx_lens.append(ctx)
            q_lens.append(num_tokens)
        return make_metadata(tables, ctx_lens, q_lens, self.block_size)
