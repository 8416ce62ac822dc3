"""Argument checks shared by the kernel wrappers: every failure is a ValueError naming the argument."""

import torch

from pagoda.kernels._triton import check_device

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# a KV cache may also hold FP8 (E4M3, scale 1): written rounded from the model's dtype, read back into it
KV_CACHE_DTYPES = (*FLOAT_DTYPES, torch.float8_e4m3fn)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = None,
    last_dim_contiguous: bool = True,
) -> torch.Tensor:
    """Check type, rank, dtype, device and a unit last-dim stride; return the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if ndim is not None and tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} has dtype {tensor.dtype}, expected one of: {allowed}")
    if last_dim_contiguous and tensor.dim() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim, got strides {tensor.stride()}")
    check_device(name, tensor)
    return tensor


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must share one device, got {devices}")


def check_dim(name: str, tensor: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if tensor.shape[dim] != expected:
        raise ValueError(f"{name}.shape[{dim}] is {tensor.shape[dim]}, expected {expected} ({what})")


def check_kv_cache(name: str, kv_cache: torch.Tensor) -> tuple[int, int, int, int]:
    """kv_cache is (2, num_blocks, block_size, num_kv_heads, head_dim); returns the last four."""
    check_tensor(name, kv_cache, ndim=5, dtypes=KV_CACHE_DTYPES)
    if kv_cache.shape[0] != 2:
        raise ValueError(f"{name}.shape[0] must be 2 (keys, values), got {kv_cache.shape[0]}")
    _, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.shape
    return num_blocks, block_size, num_kv_heads, head_dim


def check_cache_input(name: str, tensor: torch.Tensor, kv_cache: torch.Tensor, ndim: int) -> None:
    """``tensor`` (queries, keys or values) is in the cache's dtype, or in a float dtype for an FP8 cache."""
    allowed = FLOAT_DTYPES if kv_cache.dtype == torch.float8_e4m3fn else (kv_cache.dtype,)
    check_tensor(name, tensor, ndim=ndim, dtypes=allowed)
