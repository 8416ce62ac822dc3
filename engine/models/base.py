"""``CausalLM``: what the model runner relies on, written once; every architecture implements it.

A model is built from a ``ModelSpec`` (``spec.py``) and this rank's ``TPGroup``, with parameters of
this rank's shard only; ``load_weights`` then fills them from HF-named checkpoint tensors. The
runner calls nothing else: ``forward`` (or ``forward_layers`` for decode graphs captured in
pieces), then ``compute_logits`` for the sampler or ``greedy_tokens`` for a plain-greedy step.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable

import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.distributed import TPGroup
from pagoda.engine.models.spec import ModelSpec


class CausalLM(nn.Module, abc.ABC):
    def __init__(self, spec: ModelSpec, tp: TPGroup) -> None:
        super().__init__()
        self.spec = spec
        self.tp = tp

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Decoder layers, the range ``forward_layers`` splits (and the number of KV caches)."""

    @abc.abstractmethod
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor], attn: AttentionMetadata
    ) -> torch.Tensor:
        """input_ids, positions (T,); one KV cache per layer, written at ``attn.slot_mapping`` -> (T, hidden)."""

    @abc.abstractmethod
    def forward_layers(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        start: int,
        end: int,
        carry: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Layers ``start:end`` of ``forward``: a range from 0 embeds ``input_ids``, any other continues
        from ``carry`` (what the previous range returned); the range that ends at the last layer
        returns what ``forward`` returns, the others a (hidden, residual) carry."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) -> (N, vocab) float32 on the sampling rank (rank 0); None on the others."""

    @abc.abstractmethod
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N,) int64 argmax of the logits, on every rank."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter (this rank's shard) from HF-named tensors; raise on unknown or missing names."""
