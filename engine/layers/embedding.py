"""Token embedding and LM head, with the standard tensor-parallel names.

Both split the vocabulary into contiguous row ranges, one per rank, each ``ceil(V / tp)`` rows:
rank r owns ids ``[r*rows, min((r+1)*rows, V))``; the last rank's rows past V are zero padding,
so any vocabulary size works. The embedding looks up the ids in its range (others give zeros)
and all-reduces; the head computes the logits of its range and gathers them to rank 0, the
sampling rank (other ranks get None). With one rank they are a plain ``nn.Embedding`` and a
bias-free linear.

Greedy rows need no logits anywhere: ``ParallelLMHead.greedy`` takes each rank's best id of its
own range and all-gathers one (value, id) pair per row, so every rank gets the argmax of the full
vocabulary from N * 2 numbers instead of N * V logits (and no broadcast of the sampled ids).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.cpu_gemm import pack_weight, packed_linear
from pagoda.engine.layers.linear import _copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or SINGLE_RANK
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.num_embeddings = num_embeddings  # the full vocabulary V
        self.embedding_dim = embedding_dim
        self.rows_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, num_embeddings)  # may equal start: all padding
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        if loaded_weight.shape[0] != self.num_embeddings:
            raise ValueError(
                f"checkpoint tensor has {loaded_weight.shape[0]} rows, the vocabulary has {self.num_embeddings}"
            )
        valid = self.vocab_end - self.vocab_start
        _copy_checked(param.data[:valid], loaded_weight.narrow(0, self.vocab_start, valid))
        param.data[valid:].zero_()  # padding rows: never looked up, logits cut off after the gather

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) -> (T, hidden)."""
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # (T,)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill_(outside.unsqueeze(-1), 0)  # (T, hidden)
        return self.tp.all_reduce(out)  # exactly one rank contributes each row


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits. ``tie_to`` shares the embedding's weight (tied word embeddings)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        tie_to: VocabParallelEmbedding | None = None,
        tp: TPGroup | None = None,
    ):
        super().__init__(num_embeddings, embedding_dim, tp)
        if self.tp_size > 1 and num_embeddings >= 2**24:
            raise ValueError(f"vocabulary size ({num_embeddings}) must be < 2**24 for the tensor-parallel greedy head")
        if tie_to is not None:
            self.weight = tie_to.weight  # one Parameter: loading the embedding fills the head
        self.packed_weight: torch.Tensor | None = None  # oneDNN's copy, once packed (CPU)

    def pack_cpu_weight(self) -> bool:
        """Pack the loaded weight for oneDNN (``cpu_gemm.py``). The plain one stays: a tied embedding
        looks its rows up."""
        self.packed_weight = pack_weight(self.weight)
        return self.packed_weight is not None

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N, rows_per_rank) in the weight's dtype."""
        if self.packed_weight is not None:
            return packed_linear(hidden, self.packed_weight, None)
        return F.linear(hidden, self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) -> (N, vocab) on rank 0; None on the other ranks."""
        logits = self._logits(hidden)  # (N, rows_per_rank)
        if self.tp_size == 1:
            return logits
        if logits.shape[0] == 0:  # every rank has the same N, so every rank skips the collective
            return logits.new_empty(0, self.num_embeddings) if self.tp.is_first else None
        full = self.tp.gather(logits, dim=-1, dst=0)  # (N, tp * rows_per_rank) on rank 0
        return full[:, : self.num_embeddings] if full is not None else None

    def greedy(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N,) int64: the argmax of the full-vocabulary logits, on every rank.

        Ties go to the lowest id, as ``torch.argmax`` over the gathered logits would: each rank
        keeps its first maximum, and across ranks the first rank holding the maximum wins.
        """
        logits = self._logits(hidden).float()  # (N, rows_per_rank), as compute_logits sees them
        if self.tp_size == 1:
            return logits.argmax(dim=-1)
        valid = self.vocab_end - self.vocab_start
        if valid < self.rows_per_rank:  # padding rows of the last rank can never win
            logits[:, valid:] = float("-inf")
        best, local_id = logits.max(dim=-1)  # (N,), (N,)
        # ids < 2**24 are exact in float32, so one float32 tensor carries both halves of the pair
        pair = torch.stack([best, (local_id + self.vocab_start).float()], dim=-1)  # (N, 2)
        pairs = self.tp.all_gather(pair.unsqueeze(0), dim=0)  # (tp, N, 2)
        winner = pairs[..., 0].argmax(dim=0, keepdim=True)  # (1, N): first rank with the maximum
        return pairs[..., 1].gather(0, winner).squeeze(0).long()  # (N,)
