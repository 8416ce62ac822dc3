"""Rotary position embedding, applied in place to q and k.

``cos_sin_cache`` is (max_position, rotary_dim): cos in the first rotary_dim / 2 columns, sin in
the rest (the vLLM convention). Only the first ``rotary_dim`` dims of each head rotate (partial
rotary, e.g. GLM-4); the rest pass through. Pair i of a head is
  NeoX style:        (x[i], x[i + rotary_dim / 2])
  interleaved style: (x[2i], x[2i + 1])            (GPT-J, GLM)
and becomes (x1 cos - x2 sin, x2 cos + x1 sin), computed in float32. One program per token
rotates all of its query and key heads.
"""

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import FLOAT_DTYPES, INDEX_DTYPES, check_dim, check_same_device, check_tensor


@triton.jit
def _rotate_heads(
    x_ptr, token, stride_t, stride_h, cos, sin,
    NUM_HEADS: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """cos, sin: (1, BLOCK_HALF) float32. Rotates heads [0, NUM_HEADS) of one token in place."""
    h = tl.arange(0, BLOCK_H)[:, None]
    base = x_ptr + token * stride_t + h * stride_h  # (BLOCK_H, 1)
    if IS_NEOX:  # the two halves are contiguous spans
        i = tl.arange(0, BLOCK_HALF)[None, :]
        mask = (h < NUM_HEADS) & (i < HALF)
        x1 = tl.load(base + i, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(base + HALF + i, mask=mask, other=0.0).to(tl.float32)
        tl.store(base + i, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
        tl.store(base + HALF + i, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    else:  # pairs: load the rotary span contiguously, then split even and odd lanes in registers
        j = tl.arange(0, 2 * BLOCK_HALF)[None, :]
        mask = (h < NUM_HEADS) & (j < 2 * HALF)
        x = tl.load(base + j, mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_H, BLOCK_HALF, 2)))
        y = tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin)  # (BLOCK_H, BLOCK_HALF, 2)
        tl.store(base + j, tl.reshape(y, (BLOCK_H, 2 * BLOCK_HALF)).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr,  # (T, Hq, D)
    k_ptr,  # (T, Hkv, D)
    positions_ptr,  # (T,)
    cache_ptr,  # (max_position, rotary_dim)
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)[None, :]
    cos = tl.load(cache_ptr + pos * stride_cache + i, mask=i < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, cos, sin, NUM_Q_HEADS, HALF, IS_NEOX, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, cos, sin, NUM_KV_HEADS, HALF, IS_NEOX, BLOCK_HKV, BLOCK_HALF)


def _check_rotary_args(q, k, positions, cos_sin_cache, rotary_dim) -> None:
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,))
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES)
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES)
    check_same_device(q=q, k=k, positions=positions, cos_sin_cache=cos_sin_cache)
    check_dim("k", k, 0, q.shape[0], "one row per token, like q")
    check_dim("k", k, 2, q.shape[2], "head_dim of q")
    check_dim("positions", positions, 0, q.shape[0], "one position per token")
    if rotary_dim % 2 != 0 or not 0 < rotary_dim <= q.shape[2]:
        raise ValueError(f"rotary_dim must be even and in (0, head_dim={q.shape[2]}], got {rotary_dim}")
    check_dim("cos_sin_cache", cos_sin_cache, 1, rotary_dim, "rotary_dim: cos and sin halves")


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (T, Hq, D) and k (T, Hkv, D) in place at ``positions`` (T,); returns (q, k).

    rotary_dim is ``cos_sin_cache.shape[1]``. q and k may be strided views (slices of a fused
    QKV output) with a contiguous head_dim. Positions are not bounds-checked (that would sync).
    """
    require_triton()
    rotary_dim = cos_sin_cache.shape[1] if isinstance(cos_sin_cache, torch.Tensor) else 0
    _check_rotary_args(q, k, positions, cos_sin_cache, rotary_dim)
    num_tokens, num_q_heads, _ = q.shape
    num_kv_heads = k.shape[1]
    half = rotary_dim // 2
    if num_tokens > 0:
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
            NUM_Q_HEADS=num_q_heads, NUM_KV_HEADS=num_kv_heads, HALF=half, IS_NEOX=is_neox,
            BLOCK_HQ=next_power_of_2(num_q_heads), BLOCK_HKV=next_power_of_2(num_kv_heads),
            BLOCK_HALF=next_power_of_2(half), num_warps=4,
        )  # fmt: skip
    return q, k


def rotary_cos_sin_cache(
    rotary_dim: int, max_position: int, base: float = 10000.0, dtype: torch.dtype = torch.float32, device=None
) -> torch.Tensor:
    """The standard (max_position, rotary_dim) cache: cat(cos, sin) of position * base^(-2i/rotary_dim)."""
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim)
    angles = torch.arange(max_position, dtype=torch.float32, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> torch.Tensor:
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim].float()
    x1, x2 = (rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2 :]) if is_neox else (rot[..., 0::2], rot[..., 1::2])
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    rotated = torch.cat([y1, y2], dim=-1) if is_neox else torch.stack([y1, y2], dim=-1).flatten(-2)
    return torch.cat([rotated.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def apply_rotary_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference; returns new (q, k) and leaves the inputs alone."""
    cos, sin = cos_sin_cache[positions.long()].float().chunk(2, dim=-1)  # (T, rotary_dim / 2) each
    cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
    return _rotate_ref(q, cos, sin, is_neox), _rotate_ref(k, cos, sin, is_neox)
