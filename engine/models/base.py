"""``CausalLM``: what the model runner relies on, written once; every architecture implements it.

A model is built from a ``ModelSpec`` (``spec.py``) and this rank's ``TPGroup``, with parameters of
this rank's shard only; ``load_weights`` then fills them from HF-named checkpoint tensors. The
runner calls nothing else: ``forward`` (or ``forward_layers`` for decode graphs captured in
pieces), then ``compute_logits`` for the sampler or ``greedy_tokens`` for a plain-greedy step.

A model that reads images also implements ``SupportsImages``: the runner encodes a prompt's images
with ``encode_images``, writes the rows into ``embed_input_ids(prompt)`` at the image placeholder
tokens (``image_token_id``), and passes the result as ``inputs_embeds``. A model with
``uses_mrope`` takes (3, T) positions (temporal, height, width rows) for such prompts.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import ClassVar

import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.distributed import TPGroup
from pagoda.engine.models.spec import ModelSpec


class CausalLM(nn.Module, abc.ABC):
    # True: forward also takes positions (3, T), one row per M-RoPE section (temporal, height, width);
    # (T,) positions mean all three rows equal (text-only prompts, decode steps).
    uses_mrope: ClassVar[bool] = False
    # submodules whose linear layers stay in the model's dtype under quantization (a vision tower);
    # the LM head and the embedding are not linear layers and always do
    unquantized_modules: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ModelSpec, tp: TPGroup) -> None:
        super().__init__()
        self.spec = spec
        self.tp = tp

    @property
    @abc.abstractmethod
    def num_layers(self) -> int:
        """Decoder layers, the range ``forward_layers`` splits (and the number of KV caches)."""

    @abc.abstractmethod
    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(T,) token ids -> (T, hidden) embeddings, exactly ``forward``'s first step (reduced under TP)."""

    @abc.abstractmethod
    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids, positions (T,) (or (3, T) when ``uses_mrope``); one KV cache per layer, written at
        ``attn.slot_mapping`` -> (T, hidden). ``inputs_embeds`` (T, hidden), when given, replaces the
        embedding of ``input_ids`` (which may then be None)."""

    @abc.abstractmethod
    def forward_layers(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn: AttentionMetadata,
        start: int,
        end: int,
        carry: tuple[torch.Tensor, torch.Tensor] | None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Layers ``start:end`` of ``forward``: a range from 0 embeds ``input_ids`` (or takes
        ``inputs_embeds``), any other continues from ``carry`` (what the previous range returned); the
        range that ends at the last layer returns what ``forward`` returns, the others a (hidden,
        residual) carry."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """(N, hidden) -> (N, vocab) float32 on the sampling rank (rank 0); None on the others."""

    @abc.abstractmethod
    def greedy_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(N, hidden) -> (N,) int64 argmax of the logits, on every rank."""

    @abc.abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill every parameter (this rank's shard) from HF-named tensors; raise on unknown or missing names."""

    @abc.abstractmethod
    def parameter_for(self, checkpoint_name: str) -> tuple[str, object]:
        """An HF checkpoint tensor name -> (the parameter that loads it, its shard id or None), as
        ``load_weights`` routes it (FP8 checkpoints are read ahead with it)."""

    def norm_fed_linears(self) -> Iterable[tuple[nn.Module, nn.Module]]:
        """(RMSNorm, linear layer) pairs in which the linear layer is the only reader of the norm's
        output: under FP8 such a norm can hand its reader quantized rows (``RMSNorm.fp8_output``).
        Empty unless a model names them."""
        return ()


class SupportsImages(abc.ABC):
    """A ``CausalLM`` whose prompts may hold images: each image is ``num_tokens`` copies of
    ``image_token_id`` in the prompt, whose embeddings are replaced by the image's encoder rows."""

    image_token_id: int  # the placeholder token id; set by the model from its spec

    @abc.abstractmethod
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """pixel_values (sum of t*h*w, C * temporal_patch * patch * patch), the images' patch rows
        concatenated as transformers' image processor returns them (any float dtype), grid_thw one
        (t, h, w) patch grid per image -> one (t*h*w / merge**2, hidden) tensor per image, in the
        model's dtype: the rows that replace the image's placeholder token embeddings. Identical on
        every tensor-parallel rank."""

    @abc.abstractmethod
    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(pixel_values, grid_thw) of a blank image of about ``num_tokens`` placeholder tokens, for
        memory profiles: ``encode_images`` on it peaks as a real image of that size does."""
