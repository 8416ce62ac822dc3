"""Write this step's keys and values into the paged KV cache.

Token t's K/V (num_kv_heads, head_dim) goes to flat slot ``slot_mapping[t]`` of the layer's cache
``(2, num_blocks, block_size, num_kv_heads, head_dim)``: block ``slot // block_size``, offset
``slot % block_size``. A slot of -1 marks a padded token (CUDA-graph padding) and is skipped.
An FP8 cache (float8_e4m3fn, scale 1, as vLLM's ``kv_cache_dtype="fp8"`` without calibrated scales)
stores each value rounded to the nearest E4M3 value, saturated at +-448.
"""

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import (
    INDEX_DTYPES,
    check_cache_input,
    check_dim,
    check_kv_cache,
    check_same_device,
    check_tensor,
)
from pagoda.kernels.fp8_quant import FP8_DTYPE, FP8_MAX, round_to_e4m3


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # (T, Hkv, D)
    value_ptr,  # (T, Hkv, D)
    cache_ptr,  # (2, num_blocks, block_size, Hkv, D)
    slot_ptr,  # (T,)
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_c_kv,
    stride_c_blk,
    stride_c_off,
    stride_c_h,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < NUM_KV_HEADS) & (d < HEAD_DIM)
    dst = cache_ptr + block * stride_c_blk + offset * stride_c_off + h * stride_c_h + d
    k = tl.load(key_ptr + token * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # rounded in float32 first: the cast itself is then exact (see fp8_quant.py)
        k = round_to_e4m3(tl.clamp(k.to(tl.float32), -448.0, 448.0))
        v = round_to_e4m3(tl.clamp(v.to(tl.float32), -448.0, 448.0))
    tl.store(dst, k.to(cache_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_c_kv, v.to(cache_ptr.dtype.element_ty), mask=mask)


def reshape_and_cache(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Scatter key/value (T, Hkv, D) into kv_cache in place; slot -1 skips the token.

    key and value may be strided views (e.g. slices of a fused QKV output) as long as the
    head_dim axis is contiguous. Their dtype must equal the cache's, or be any float dtype for an
    FP8 cache.
    """
    require_triton()
    _, block_size, num_kv_heads, head_dim = check_kv_cache("kv_cache", kv_cache)
    check_cache_input("key", key, kv_cache, ndim=3)
    check_cache_input("value", value, kv_cache, ndim=3)
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES)
    check_same_device(key=key, value=value, kv_cache=kv_cache, slot_mapping=slot_mapping)
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} must equal key shape {tuple(key.shape)}")
    check_dim("key", key, 1, num_kv_heads, "num_kv_heads of kv_cache")
    check_dim("key", key, 2, head_dim, "head_dim of kv_cache")
    check_dim("slot_mapping", slot_mapping, 0, key.shape[0], "one slot per token")
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    block_h, block_d = next_power_of_2(num_kv_heads), next_power_of_2(head_dim)
    _reshape_and_cache_kernel[(num_tokens,)](
        key, value, kv_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_H=block_h, BLOCK_D=block_d, FP8=kv_cache.dtype == FP8_DTYPE,
        num_warps=4 if block_h * block_d >= 1024 else 1,
    )  # fmt: skip


def reshape_and_cache_ref(
    key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Torch reference: the same scatter through a flat (slots, Hkv, D) view of the cache."""
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if kv_cache.dtype == FP8_DTYPE:  # saturate, then round to nearest (the assignment's cast)
        key, value = (t.float().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE) for t in (key, value))
    kv_cache[0].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = key[keep]
    kv_cache[1].view(num_blocks * block_size, num_kv_heads, head_dim)[slots] = value[keep]
