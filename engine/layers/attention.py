"""Paged attention: the torch path, which is also the reference for the Triton kernels.

Contract (see ``engine/attention_metadata.py``): one step's T tokens come from B sequences laid
end to end. ``forward`` first writes this step's K/V into the cache at ``attn.slot_mapping``, then
each query token attends causally over its sequence's whole context: the ``context_lens[b]`` tokens
already cached plus this step's tokens up to itself. Query head ``h`` reads KV head
``h // (Hq // Hkv)`` (GQA, HF's ``repeat_kv`` order).

Three paths, picked on host-side metadata only (no device sync):
- decode-only batch: rows grouped by length (on CPU), per group one gather of whole blocks and one
  masked SDPA;
- a sequence with no cached context: attends to its fresh k/v, no gather;
- any other (chunked prefill, prefix hits, mixed batches): per-sequence gather + masked SDPA.
An empty ``kv_cache`` (dummy/profile run) skips the cache and attends to fresh k/v only.

On CUDA with Triton the same contract runs on the kernels of ``kernels/`` (cache write, then the
split-K decode kernel or the unified varlen prefill kernel); this torch path is their reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata, DecodeGroup
from pagoda.kernels import attention as triton_attention
from pagoda.kernels import reshape_and_cache as triton_cache
from pagoda.kernels._triton import HAS_TRITON


def write_kv_cache(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache (2, num_blocks, block_size, Hkv, D); k, v (T, Hkv, D); slot_mapping (T,) flat slots."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    slots = slot_mapping.long()
    kv_cache[0].view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, k.to(kv_cache.dtype))
    kv_cache[1].view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slots, v.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` cached K and V of each row of ``block_tables`` (B, max_blocks).

    Returns k, v of shape (B, num_tokens, Hkv, D); positions past a sequence's length hold whatever
    its padding blocks contain and must be masked by the caller.
    """
    num_blocks = -(-num_tokens // kv_cache.shape[2])
    k, v = gather_blocks(kv_cache, block_tables[:, :num_blocks].reshape(-1).long(), block_tables.shape[0])
    return k[:, :num_tokens], v[:, :num_tokens]  # (B, nb*bs, Hkv, D) -> (B, L, Hkv, D)


def gather_blocks(kv_cache: torch.Tensor, blocks: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of ``blocks`` (num_rows * nb,) int64, row after row -> k, v (num_rows, nb * block_size, Hkv, D).

    One ``index_select`` of whole blocks per tensor: on CPU it copies each block as one run, where
    advanced indexing walks it element by element (2-3x slower, most of a decode step's attention)."""
    _, total_blocks, _, num_kv_heads, head_dim = kv_cache.shape
    k = kv_cache[0].view(total_blocks, -1).index_select(0, blocks)  # (num_rows * nb, bs * Hkv * D)
    v = kv_cache[1].view(total_blocks, -1).index_select(0, blocks)
    return k.view(num_rows, -1, num_kv_heads, head_dim), v.view(num_rows, -1, num_kv_heads, head_dim)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q (Lq, Hq, D); k, v (Lk, Hkv, D); mask (Lq, Lk) bool or None for plain causal -> (Lq, Hq, D)."""
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, Hq, Lq, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hkv, Lk, D)
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out.squeeze(0).transpose(0, 1)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata, scale: float) -> torch.Tensor:
    """One query token per sequence. q (B, Hq, D) -> (B, Hq, D).

    Rows go in groups of similar length (``attn.decode_groups``: one group off the CPU), each
    gathered and attended up to its own longest sequence, so a short row does not pay for a long one."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = kv_cache.shape[3]
    # Fold the query heads of a KV group into the "query length" axis so K/V are never repeated.
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)  # (B, Hkv, G, D)
    groups = attn.decode_groups
    if groups[0].rows is None:  # one group: every row, in order
        return _attend_group(q, kv_cache, groups[0], scale).reshape(num_seqs, num_heads, head_dim)
    out = torch.empty_like(q)
    for group in groups:
        out.index_copy_(0, group.rows, _attend_group(q.index_select(0, group.rows), kv_cache, group, scale))
    return out.view(num_seqs, num_heads, head_dim)


def _attend_group(q: torch.Tensor, kv_cache: torch.Tensor, group: DecodeGroup, scale: float) -> torch.Tensor:
    """q (n, Hkv, G, D) of the group's rows -> (n, Hkv, G, D)."""
    k, v = gather_blocks(kv_cache, group.blocks, q.shape[0])  # (n, L, Hkv, D), L = num_blocks * block_size
    mask = group.additive_mask(q.dtype)  # (n, 1, 1, L)
    return F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor | None,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Any batch, one sequence at a time. q (T, Hq, D); k, v (T, Hkv, D) -> (T, Hq, D).

    With ``kv_cache`` None every sequence attends to its fresh k/v only (no context).
    """
    out = torch.empty_like(q)
    start = 0
    for b, (query_len, seq_len) in enumerate(zip(attn.query_lens_cpu, attn.seq_lens_cpu)):
        end = start + query_len
        context_len = seq_len - query_len if kv_cache is not None else 0
        if query_len == 0:
            pass
        elif context_len == 0:
            out[start:end] = _sdpa(q[start:end], k[start:end], v[start:end], scale, None)
        else:
            seq_k, seq_v = gather_kv(kv_cache, attn.block_tables[b : b + 1], seq_len)  # (1, L, Hkv, D)
            query_pos = context_len + torch.arange(query_len, device=q.device)  # (Lq,)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= query_pos[:, None]  # (Lq, L)
            out[start:end] = _sdpa(q[start:end], seq_k[0], seq_v[0], scale, mask)
        start = end
    return out


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Write this step's K/V, then attend. q (T, Hq, D); k, v (T, Hkv, D) -> (T, Hq, D)."""
    if kv_cache.numel() == 0:
        return varlen_attention(q, k, v, None, attn, scale)
    if q.is_cuda and HAS_TRITON:
        triton_cache.reshape_and_cache(k, v, kv_cache, attn.slot_mapping)
        return triton_attention.paged_attention(q, kv_cache, attn, scale)
    write_kv_cache(kv_cache, k, v, attn.slot_mapping)
    if attn.is_decode_only:
        return decode_attention(q, kv_cache, attn, scale)
    return varlen_attention(q, k, v, kv_cache, attn, scale)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_kv_heads = num_kv_heads
        self.scale = scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        attn: AttentionMetadata,
    ) -> torch.Tensor:
        """q (T, Hq, D); k, v (T, Hkv, D); kv_cache (2, num_blocks, block_size, Hkv, D) -> (T, Hq*D)."""
        out = paged_attention(q, k, v, kv_cache, attn, self.scale)  # (T, Hq, D)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
