"""One entry point for the model's attention layer: pick the kernel for this step's batch.

A pure decode step (every sequence computes one token) goes to the split-K decode kernel;
anything else (prefill, chunked prefill, mixed prefill + decode) to the unified varlen kernel.
``meta`` is an ``pagoda.engine.attention_metadata.AttentionMetadata`` (any object with its fields).
Only the prefill kernel and the reference read ``meta.context_lens``, which decode-only batches may
leave None.
"""

from typing import TYPE_CHECKING

import torch

from pagoda.kernels.paged_decode import paged_decode
from pagoda.kernels.paged_prefill import paged_prefill, paged_prefill_ref

if TYPE_CHECKING:
    from pagoda.engine.attention_metadata import AttentionMetadata


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: "AttentionMetadata",
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q (T, Hq, D) against the layer's cache (2, num_blocks, block_size, Hkv, D); returns (T, Hq, D)."""
    if meta.is_decode_only:
        return paged_decode(q, kv_cache, meta.block_tables, meta.seq_lens, scale, max_seq_len=meta.max_seq_len, out=out)
    return paged_prefill(
        q, kv_cache, meta.block_tables, meta.query_start_loc, _context_lens(meta), scale,
        max_query_len=meta.max_query_len, out=out,
    )  # fmt: skip


def paged_attention_ref(
    q: torch.Tensor, kv_cache: torch.Tensor, meta: "AttentionMetadata", scale: float | None = None
) -> torch.Tensor:
    """Torch reference for any batch (decode rows are query chunks of length 1)."""
    return paged_prefill_ref(q, kv_cache, meta.block_tables, meta.query_start_loc, _context_lens(meta), scale)


def _context_lens(meta: "AttentionMetadata") -> torch.Tensor:
    if meta.context_lens is None:
        raise ValueError(
            "meta.context_lens is None (allowed only in decode-only batches, which the decode kernel "
            "serves from seq_lens); the prefill kernel and the torch reference need it"
        )
    return meta.context_lens
