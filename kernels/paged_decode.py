"""Paged attention for decode: one query token per sequence, split-K over the block table.

Flash-decoding in two kernels. Stage 1 runs a program per (sequence, KV head, split): it owns
all G = Hq / Hkv query heads that share the KV head (so each K/V tile is read once for the whole
group), walks its split's share of the sequence through the block table, and keeps an online
softmax in float32. Each sequence is cut into ``num_splits`` equal parts of its own length, so
the launch depends on no host-side maximum and is safe to capture in a CUDA graph. With one
split, stage 1 writes the normalised output directly; otherwise it writes unnormalised partial
outputs with their running max and sum, and stage 2 (a program per (sequence, query head))
rescales and combines them.

Scores live in the log2 domain (the scale carries log2(e)) so the kernels use exp2.
The K/V of the current token must already be in the cache (reshape_and_cache first).
"""

import math

import torch

from pagoda.kernels._triton import cdiv, next_power_of_2, require_triton, tl, triton
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
MIN_TOKENS_PER_SPLIT = 256  # below this a split costs more to reduce than it saves
MAX_SPLITS = 64


# Values that change from step to step are not specialized on: Triton would otherwise compile a new
# variant whenever one of them turns 1 or a multiple of 16, in the middle of serving.
@triton.jit(do_not_specialize=["num_splits", "stride_bt"])
def _paged_decode_kernel(
    q_ptr,  # (B, Hq, D)
    cache_ptr,  # (2, num_blocks, block_size, Hkv, D)
    block_tables_ptr,  # (B, max_blocks) int32
    seq_lens_ptr,  # (B,)
    out_ptr,  # (B, Hq, D), written when SPLIT is False
    part_acc_ptr,  # (B, Hq, num_splits, D) float32, written when SPLIT is True
    part_max_ptr,  # (B, Hq, num_splits) float32
    part_sum_ptr,  # (B, Hq, num_splits) float32
    qk_scale,  # softmax scale * log2(e)
    num_splits,
    stride_qb,
    stride_qh,
    stride_ob,
    stride_oh,
    stride_bt,
    stride_c_kv,
    stride_c_blk,
    stride_c_off,
    stride_c_h,
    NUM_Q_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # This split's share of the sequence, rounded to whole tiles.
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), TILE) * TILE
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kv_head * NUM_Q_PER_KV + g
    g_mask = g < NUM_Q_PER_KV
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qb + head[:, None] * stride_qh + d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    kv_base = cache_ptr + kv_head * stride_c_h
    for tile_start in range(start, end, TILE):
        pos = tile_start + tl.arange(0, TILE)
        valid = pos < end
        block = tl.load(block_tables_ptr + seq * stride_bt + pos // BLOCK_SIZE, mask=valid, other=0)
        token_off = block.to(tl.int64) * stride_c_blk + (pos % BLOCK_SIZE) * stride_c_off  # (TILE,)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(kv_base + token_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)  # (TILE, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_G, TILE)
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(kv_base + stride_c_kv + token_off[:, None] + d[None, :], mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if SPLIT:
        row = (seq * (NUM_Q_PER_KV * tl.num_programs(1)) + head) * num_splits + split  # (BLOCK_G,)
        tl.store(part_acc_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=out_mask)
        tl.store(part_max_ptr + row, m_i, mask=g_mask)
        tl.store(part_sum_ptr + row, l_i, mask=g_mask)
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # seq_len 0 (padding) gives zeros
        out_ptrs = out_ptr + seq * stride_ob + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _paged_decode_reduce_kernel(
    out_ptr,  # (B, Hq, D)
    part_acc_ptr,  # (B, Hq, num_splits, D) float32
    part_max_ptr,  # (B, Hq, num_splits) float32
    part_sum_ptr,  # (B, Hq, num_splits) float32
    num_splits,
    stride_ob,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    row = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    maxes = tl.load(part_max_ptr + row + s, mask=s_mask, other=float("-inf"))
    sums = tl.load(part_sum_ptr + row + s, mask=s_mask, other=0.0)
    m_max = tl.max(maxes, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # every split empty: seq_len 0
    w = tl.exp2(maxes - m_max)  # empty splits have m = -inf, weight 0
    total = tl.sum(w * sums, axis=0)
    acc = tl.load(
        part_acc_ptr + (row + s)[:, None] * HEAD_DIM + d[None, :], mask=s_mask[:, None] & d_mask[None, :], other=0.0
    )
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _tile_config(head_dim: int) -> dict:
    """K/V tile and launch shape of stage 1, from a sweep on an H100 (head_dim 128); heads over
    128 wide take a shallower pipeline to fit shared memory."""
    return {"TILE": 64, "num_warps": 4, "num_stages": 3 if next_power_of_2(head_dim) <= 128 else 2}


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, never splits shorter than 256 tokens."""
    if device.type != "cuda":
        return 1
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count
    wanted = cdiv(2 * num_sms, max(1, num_seqs * num_kv_heads))
    useful = cdiv(max(1, max_seq_len), MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def _check_decode_args(q, kv_cache, block_tables, seq_lens, out) -> None:
    _, _, num_kv_heads, head_dim = check_kv_cache("kv_cache", kv_cache)
    check_cache_input("q", q, kv_cache, ndim=3)
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=INDEX_DTYPES, last_dim_contiguous=True)
    check_same_device(q=q, kv_cache=kv_cache, block_tables=block_tables, seq_lens=seq_lens)
    check_dim("q", q, 2, head_dim, "head_dim of kv_cache")
    if q.shape[1] % num_kv_heads != 0:
        raise ValueError(f"q has {q.shape[1]} heads, not a multiple of the cache's {num_kv_heads} KV heads")
    check_dim("block_tables", block_tables, 0, q.shape[0], "one row per sequence")
    check_dim("seq_lens", seq_lens, 0, q.shape[0], "one length per sequence")
    if out is not None:
        check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES)
        check_same_device(q=q, out=out)
        if out.shape != q.shape:
            raise ValueError(f"out shape {tuple(out.shape)} must equal q shape {tuple(q.shape)}")


def paged_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    *,
    num_splits: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: q (B, Hq, D) over each sequence's ``seq_lens[b]`` cached tokens.

    ``num_splits`` fixes the split-K factor (default: chosen from the batch, the KV heads and
    ``max_seq_len``, which avoids a device sync when given). Returns out (B, Hq, D) in q's dtype;
    a sequence of length 0 gets zeros.
    """
    require_triton()
    _check_decode_args(q, kv_cache, block_tables, seq_lens, out)
    num_seqs, num_heads, head_dim = q.shape
    _, _, block_size, num_kv_heads, _ = kv_cache.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    if num_splits is None:
        max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_len, q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split = num_splits > 1
    part_shape = (num_seqs, num_heads, num_splits) if split else (1,)
    part_acc = torch.empty((*part_shape, head_dim) if split else (1,), dtype=torch.float32, device=q.device)
    part_max = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_sum = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    block_d = next_power_of_2(head_dim)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, out, part_acc, part_max, part_sum,
        scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_Q_PER_KV=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_power_of_2(group)), BLOCK_D=block_d, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", **_tile_config(head_dim),
    )  # fmt: skip
    if split:
        _paged_decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_acc, part_max, part_sum, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def paged_decode_ref(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Torch reference: gather each sequence's K/V through its block table, dense softmax in fp32."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        blocks = block_tables[b, : cdiv(n, block_size)].long()
        k = kv_cache[0, blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()  # (n, Hkv, D)
        v = kv_cache[1, blocks].reshape(-1, num_kv_heads, head_dim)[:n].float()
        k = k.repeat_interleave(num_heads // num_kv_heads, dim=1)  # (n, Hq, D)
        v = v.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale  # (Hq, n)
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), v).to(q.dtype)
    return out
