"""Per-step attention metadata: an explicit object the model runner builds and passes to the model.

The batch is flattened: T scheduled tokens from B sequences, sequence b owning tokens
``query_start_loc[b]:query_start_loc[b+1]``. Sequence b already has ``context_lens[b]`` tokens in
its KV blocks; this step computes ``query_lens[b]`` more, so it attends over
``seq_lens[b] = context_lens[b] + query_lens[b]`` tokens, causally.

KV cache layout, one tensor per layer: ``(2, num_blocks, block_size, num_kv_heads, head_dim)``,
index 0 keys, 1 values. Token ``i`` of sequence ``b`` lives in block ``block_tables[b, i // block_size]``
at offset ``i % block_size``; its flat slot is ``block * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot for each scheduled token's K/V
    query_start_loc: torch.Tensor  # (B + 1,) int32: cumulative query lengths
    seq_lens: torch.Tensor  # (B,) int32: context + query length per sequence
    context_lens: torch.Tensor  # (B,) int32: tokens already cached before this step
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32, padded with 0
    query_lens_cpu: list[int]  # (B,) host copy of the query lengths
    seq_lens_cpu: list[int]  # (B,) host copy of seq_lens
    max_query_len: int
    max_seq_len: int
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence computes exactly one token (pure decode step)."""
        return self.max_query_len == 1
