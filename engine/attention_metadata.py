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

``decode_groups`` is the torch decode path's plan, derived once per step and shared by every layer:
the rows of a decode batch in groups of similar length, so that each group gathers and attends over
its own longest sequence instead of the batch's (on CPU, where that gather is most of attention).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

# A row joins the current (longer) group while its length is at least this share of the group's longest.
GROUP_LENGTH_RATIO = 0.6
MAX_DECODE_GROUPS = 4  # each group costs a few more ops per layer


def group_by_length(
    seq_lens: list[int], ratio: float = GROUP_LENGTH_RATIO, max_groups: int = MAX_DECODE_GROUPS
) -> list[list[int]]:
    """Row indices grouped longest first: a row joins the current group while its length is at least
    ``ratio`` of the group's longest, or when ``max_groups`` are open; so no group pads a row by more
    than 1/ratio of its length except the last."""
    groups: list[list[int]] = []
    for row in sorted(range(len(seq_lens)), key=lambda r: -seq_lens[r]):
        if groups and (seq_lens[row] >= ratio * seq_lens[groups[-1][0]] or len(groups) == max_groups):
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


@dataclass(frozen=True)
class DecodeGroup:
    """Rows of a decode batch attended together, each over the first ``num_blocks`` of its blocks."""

    rows: torch.Tensor | None  # (n,) int64 rows of the batch; None: every row, in batch order
    blocks: torch.Tensor  # (n * num_blocks,) int64: each row's first num_blocks block ids, row after row
    num_blocks: int
    valid: torch.Tensor  # (n, 1, 1, num_blocks * block_size) bool: key positions inside the row's sequence
    _biases: dict = field(default_factory=dict, compare=False, repr=False)  # dtype -> additive_mask(dtype)

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """``valid`` as 0 / -inf in ``dtype``, made once for all layers: SDPA would convert the bool
        mask on every call."""
        bias = self._biases.get(dtype)
        if bias is None:
            bias = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
            bias = self._biases[dtype] = bias.masked_fill_(~self.valid, float("-inf"))
        return bias


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

    @functools.cached_property
    def decode_groups(self) -> list[DecodeGroup]:
        """The decode-only batch's rows grouped by length (one group of every row off the CPU, where
        the kernels read the block tables themselves); built on first use, then shared by the layers."""
        device = self.seq_lens.device
        if device.type == "cpu":
            groups = group_by_length(self.seq_lens_cpu)
        else:
            groups = [list(range(self.num_seqs))]
        plan = []
        for rows in groups:
            num_blocks = -(-max(self.seq_lens_cpu[r] for r in rows) // self.block_size)
            index = None if len(groups) == 1 else torch.tensor(rows, dtype=torch.long, device=device)
            tables = self.block_tables if index is None else self.block_tables.index_select(0, index)
            seq_lens = self.seq_lens if index is None else self.seq_lens.index_select(0, index)
            keys = torch.arange(num_blocks * self.block_size, device=device)
            valid = (keys[None, :] < seq_lens[:, None])[:, None, None, :]  # (n, 1, 1, L)
            plan.append(DecodeGroup(index, tables[:, :num_blocks].reshape(-1).long(), num_blocks, valid))
        return plan

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        """Every sequence computes exactly one token (pure decode step)."""
        return self.max_query_len == 1
