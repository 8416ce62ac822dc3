"""Causal paged attention over a ragged batch: prefill, chunked prefill, and decode rows alike.

Sequence b contributes query tokens ``query_start_loc[b]:query_start_loc[b+1]`` (flattened into
q of shape (T, Hq, D)); it already has ``context_lens[b]`` tokens cached, so its query token i sits
at absolute position ``context_lens[b] + i`` and attends to cache positions ``0..context_lens[b]+i``.
Every K/V is read from the paged cache, including this step's (reshape_and_cache first), so a
cached prefix and the new chunk are one loop.

Grid: (query blocks, KV heads). A program takes BLOCK_Q consecutive query tokens of one sequence
times the G = Hq / Hkv query heads of one KV head, as BLOCK_M = BLOCK_Q * G rows (row r is token
r // G, head r % G), so each K/V tile is loaded once per group. Query blocks are numbered without
a host-side scan: sequence b's blocks start at ``query_start_loc[b] // BLOCK_Q + b``, an upper
bound that leaves at most one idle program per sequence; a program finds its sequence by binary
search over query_start_loc. The launch needs no device sync.
"""

import math

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_cache_input,
    check_dim,
    check_kv_cache,
    check_same_device,
    check_tensor,
)

LOG2E = 1.4426950408889634


@triton.jit
def _find_sequence(query_start_loc_ptr, block_id, num_seqs, BLOCK_Q: tl.constexpr):
    """The last sequence b whose first query block (query_start_loc[b] // BLOCK_Q + b) <= block_id."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= block_id:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tiles(
    q, m_i, l_i, acc, kv_base, bt_row, q_pos, tile_begin, tile_end, kv_end, qk_scale,
    stride_c_kv, stride_c_blk, stride_c_off, d, d_mask,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Online softmax over K/V positions [tile_begin, tile_end), TILE at a time. Without MASKED
    every position must be visible to every row (below the causal diagonal, inside the sequence)."""
    for tile_start in range(tile_begin, tile_end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        in_seq = pos < kv_end
        block = tl.load(bt_row + pos // BLOCK_SIZE, mask=in_seq, other=0)
        token_off = block.to(tl.int64) * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_off  # (TILE,)
        kv_mask = in_seq[:, None] & d_mask[None, :]
        k = tl.load(kv_base + token_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # (TILE, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, TILE)
        if MASKED:
            s = tl.where((pos[None, :] <= q_pos[:, None]) & in_seq[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_base + stride_c_kv + token_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


# Batch-dependent integers are not specialized on (no recompile when they turn 1 or a multiple of 16).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_prefill_kernel(
    q_ptr,  # (T, Hq, D)
    cache_ptr,  # (2, num_blocks, block_size, Hkv, D)
    block_tables_ptr,  # (B, max_blocks) int32
    query_start_loc_ptr,  # (B + 1,)
    context_lens_ptr,  # (B,)
    out_ptr,  # (T, Hq, D)
    qk_scale,  # softmax scale * log2(e)
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_bt,
    stride_c_kv,
    stride_c_blk,
    stride_c_off,
    stride_c_h,
    NUM_Q_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    block_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, block_id, num_seqs, BLOCK_Q)
    q_begin = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - q_begin
    q_first = (block_id - (q_begin // BLOCK_Q + seq)) * BLOCK_Q
    if q_first >= query_len:
        return
    context_len = tl.load(context_lens_ptr + seq)

    r = tl.arange(0, BLOCK_M)
    q_idx = q_first + r // NUM_Q_PER_KV  # token within this sequence's query chunk
    head = kv_head * NUM_Q_PER_KV + r % NUM_Q_PER_KV
    row_valid = (r // NUM_Q_PER_KV < BLOCK_Q) & (q_idx < query_len)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    token = (q_begin + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_M, BLOCK_D)
    q_pos = context_len + q_idx  # absolute position of each row's token
    kv_end = context_len + tl.minimum(q_first + BLOCK_Q, query_len)  # last row's position + 1

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_base = cache_ptr + kv_head * stride_c_h
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    # Tiles wholly before this block's first query position are visible to every row: no mask.
    # The rest straddle the causal diagonal. Position 0 is visible to every row, so the first
    # tile gives each row a finite running max.
    unmasked_end = (context_len + q_first) // TILE * TILE
    m_i, l_i, acc = _attend_tiles(
        q, m_i, l_i, acc, kv_base, bt_row, q_pos, 0, unmasked_end, kv_end, qk_scale,
        stride_c_kv, stride_c_blk, stride_c_off, d, d_mask, BLOCK_SIZE, TILE, False, DOT_PRECISION,
    )  # fmt: skip
    m_i, l_i, acc = _attend_tiles(
        q, m_i, l_i, acc, kv_base, bt_row, q_pos, unmasked_end, kv_end, kv_end, qk_scale,
        stride_c_kv, stride_c_blk, stride_c_off, d, d_mask, BLOCK_SIZE, TILE, True, DOT_PRECISION,
    )  # fmt: skip

    out = acc / l_i[:, None]
    out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_mask[None, :])


def _check_prefill_args(q, kv_cache, block_tables, query_start_loc, context_lens, out) -> None:
    _, _, num_kv_heads, head_dim = check_kv_cache("kv_cache", kv_cache)
    check_cache_input("q", q, kv_cache, ndim=3)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("context_lens", context_lens, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device(
        q=q, kv_cache=kv_cache, block_tables=block_tables, query_start_loc=query_start_loc, context_lens=context_lens
    )
    check_dim("q", q, 2, head_dim, "head_dim of kv_cache")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the cache's {num_kv_heads} KV heads")
    num_seqs = context_lens.shape[0]
    check_dim("query_start_loc", query_start_loc, 0, num_seqs + 1, "num_seqs + 1, from context_lens")
    check_dim("block_tables", block_tables, 0, num_seqs, "one row per sequence")
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES)
        check_same_device(q=q, out=out)
        if out.shape != q.shape:
            raise ValueError(f"out shape {tuple(out.shape)} must equal q shape {tuple(q.shape)}")


def _tile_config(group: int, max_query_len: int, head_dim: int) -> dict:
    """Rows per program (BLOCK_M, at least one KV group), K/V tile and launch shape, from a sweep
    on an H100 (head_dim 128): decode-like batches take the smallest row block, long prefills
    the largest tiles. Heads over 128 wide take shallower pipelines to fit shared memory."""
    wide = next_power_of_2(head_dim) > 128
    if max_query_len <= 1:
        return {"BLOCK_M": max(16, next_power_of_2(group)), "TILE": 64, "num_warps": 4, "num_stages": 2 if wide else 3}
    if max_query_len < 256 or wide:
        return {"BLOCK_M": max(64, next_power_of_2(group)), "TILE": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": max(128, next_power_of_2(group)), "TILE": 128, "num_warps": 8, "num_stages": 3}


def paged_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for a ragged batch q (T, Hq, D) over paged K/V; returns (T, Hq, D).

    ``query_start_loc`` (B + 1,) splits q into sequences; ``context_lens`` (B,) counts each one's
    tokens cached before this step. ``max_query_len`` only tunes the tile shape. Rows of q past
    ``query_start_loc[-1]`` (padding) are left unwritten.
    """
    require_triton()
    _check_prefill_args(q, kv_cache, block_tables, query_start_loc, context_lens, out)
    num_tokens, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    num_seqs = context_lens.shape[0]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if max_query_len is None:
        max_query_len = 1 if num_tokens == num_seqs else num_tokens
    config = _tile_config(group, max_query_len, head_dim)
    block_q = config["BLOCK_M"] // group
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, kv_cache, block_tables, query_start_loc, context_lens, out,
        scale * LOG2E, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_Q_PER_KV=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_D=next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **config,
    )  # fmt: skip
    return out


def paged_prefill_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch reference: per sequence, gather K/V through the block table and run dense causal
    softmax attention in float32 (query i at position context_len + i sees keys 0..that)."""
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        begin, end = starts[b], starts[b + 1]
        if end == begin:
            continue
        n = ctx + end - begin
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()  # (n, Hkv, D)
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,nhd->hqn", q[begin:end].float(), k) * scale  # (Hq, Lq, n)
        q_pos = torch.arange(ctx, n, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > q_pos, float("-inf"))
        out[begin:end] = torch.einsum("hqn,nhd->qhd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
