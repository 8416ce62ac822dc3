"""Per-step attention metadata: an explicit object the model runner builds and passes to the model.

The batch is flattened: T scheduled tokens from B sequences, sequence b owning tokens
``query_start_loc[b]:query_start_loc[b+1]``. Sequence b already has ``context_lens[b]`` tokens in
its KV blocks; this step computes ``query_lens[b]`` more, so it attends over
``seq_lens[b] = context_lens[b] + query_lens[b]`` tokens, causally. A decode-only batch (one query
token per sequence) reads only ``seq_lens``, so it may leave ``context_lens`` None (the decode graphs
do: no buffer to keep in step with ``seq_lens``).

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
    # (B,) int32: tokens already cached before this step; None in decode-only batches, which read seq_lens
    context_lens: torch.Tensor | None
    block_tables: torch.Tensor  # (B, max_blocks_per_seq) int32, padded with 0
    query_lens_cpu: list[int]  # (B,) host copy of the query lengths
    seq_lens_cpu: list[int]  # (B,) host copy of seq_lens
    max_query_len: int
    max_seq_len: int
    block_size: int

    def __post_init__(self) -> None:
        if self.context_lens is None and not self.is_decode_only:
            raise ValueError(
                "context_lens may be None only in decode-only batches (max_query_len == 1), "
                f"got max_query_len={self.max_query_len}"
            )

    @classmethod
    def dummy(
        cls, query_lens: list[int], context_lens: list[int], block_size: int, device: torch.device
    ) -> "AttentionMetadata":
        """A batch that writes nothing: every slot is -1 (the cache write skips it) and every block
        table row points at block 0. For memory profiles and kernel warm-up, never for real tokens."""
        i32 = dict(dtype=torch.int32, device=device)
        seq_lens = [c + q for c, q in zip(context_lens, query_lens)]
        starts = [0]
        for q in query_lens:
            starts.append(starts[-1] + q)
        max_blocks = max(1, -(-max(seq_lens) // block_size))
        return cls(
            slot_mapping=torch.full((starts[-1],), -1, dtype=torch.long, device=device),
            query_start_loc=torch.tensor(starts, **i32),
            seq_lens=torch.tensor(seq_lens, **i32),
            context_lens=torch.tensor(context_lens, **i32),
            block_tables=torch.zeros((len(query_lens), max_blocks), **i32),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=seq_lens,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            block_size=block_size,
        )

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence computes exactly one token (pure decode step)."""
        return self.max_query_len == 1
