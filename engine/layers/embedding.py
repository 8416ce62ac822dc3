"""Token embedding and LM head, with the standard tensor-parallel names.

With TP (not yet implemented) both split the vocabulary into contiguous row ranges, one per rank:
the embedding masks ids outside its range and all-reduces, the head all-gathers the logits. With
tp_size 1 they are a plain ``nn.Embedding`` and a bias-free linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import _copy_checked


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.tp_rank, self.tp_size = 0, 1
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        rows = loaded_weight.shape[0] // self.tp_size  # TP hook: this rank's vocabulary range
        _copy_checked(param.data, loaded_weight.narrow(0, self.tp_rank * rows, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)  # (T,) -> (T, hidden)


class ParallelLMHead(VocabParallelEmbedding):
    """Hidden states -> logits. ``tie_to`` shares the embedding's weight (tied word embeddings)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, tie_to: VocabParallelEmbedding | None = None):
        super().__init__(num_embeddings, embedding_dim)
        if tie_to is not None:
            self.weight = tie_to.weight  # one Parameter: loading the embedding fills the head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)  # (N, hidden) -> (N, vocab)
