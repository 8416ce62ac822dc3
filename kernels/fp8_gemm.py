"""FP8 GEMM for few rows (decode batches): ``out = (a * a_scale) @ (b * b_scale).T`` in bf16.

``a`` (M, K) and ``b`` (N, K) are float8_e4m3fn, row-major (b is an ``nn.Linear`` weight as stored);
``a_scale`` (M, 1) and ``b_scale`` (N,) are float32, one per row. One program computes a
(BLOCK_M, BLOCK_N) tile over K (or over one of SPLIT_K slices of K) with fp8 tensor-core dots
accumulating in float32, and applies both scales once at the end. For M of a decode batch the work is
reading b once: the tile is narrow in N so that every SM has programs, and deep in K so that each has
enough bytes in flight; a layer with few output columns and a long K (the MLP's down projection)
splits K so that its programs fill the GPU, and the slices add their scaled partial tiles into a
float32 output with atomics (then rounded to ``out_dtype``).
``fp8_gemm_ref`` is the torch reference (float32 products of the dequantized operands).
"""

import torch

from pagoda.kernels._triton import cdiv, require_triton, tl, triton
from pagoda.kernels._validate import check_tensor

FP8 = (torch.float8_e4m3fn,)


@triton.jit(do_not_specialize=["M"])  # the batch's rows change every step: no recompile when M turns 1 or 16
def _fp8_gemm_kernel(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, out_ptr,
    M, N, K,
    stride_a, stride_b, stride_o,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    blocks_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_start = tl.program_id(2) * blocks_per_split * BLOCK_K
    ks = k_start + tl.arange(0, BLOCK_K)
    a_tile = a_ptr + rows[:, None].to(tl.int64) * stride_a + ks[None, :]
    b_tile = b_ptr + cols[None, :].to(tl.int64) * stride_b + ks[:, None]  # (BLOCK_K, BLOCK_N): b transposed
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(blocks_per_split):
        k_left = K - k * BLOCK_K
        a = tl.load(a_tile, mask=(rows[:, None] < M) & (ks[None, :] < k_left), other=0.0)
        b = tl.load(b_tile, mask=(cols[None, :] < N) & (ks[:, None] < k_left), other=0.0)
        acc = tl.dot(a, b, acc)
        a_tile += BLOCK_K
        b_tile += BLOCK_K
    a_scale = tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)
    b_scale = tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)
    out = acc * a_scale[:, None] * b_scale[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    out_tile = out_ptr + rows[:, None].to(tl.int64) * stride_o + cols[None, :]
    if SPLIT_K == 1:
        tl.store(out_tile, out.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # float32 partial sums; the host rounds the total
        tl.atomic_add(out_tile, out, mask=mask, sem="relaxed")


def fp8_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    a_scale: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    config: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """a (M, K), b (N, K) float8 with a_scale (M, 1), b_scale (N,) float32 -> (M, N) ``out_dtype``.
    ``config`` is (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, split_k]); None picks one for
    the shape."""
    require_triton()
    check_tensor("a", a, ndim=2, dtypes=FP8)
    check_tensor("b", b, ndim=2, dtypes=FP8)
    (m, k), n = a.shape, b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"a is (M, {k}) and b is {tuple(b.shape)}: b must be (N, {k})")
    if a_scale.shape != (m, 1) or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale must be float32 ({m}, 1), got {a_scale.dtype} {tuple(a_scale.shape)}")
    if b_scale.shape != (n,) or b_scale.dtype != torch.float32:
        raise ValueError(f"b_scale must be float32 ({n},), got {b_scale.dtype} {tuple(b_scale.shape)}")
    block_m, block_n, block_k, warps, stages, *split = config or default_config(m, n, k)
    split_k = min(split[0] if split else 1, cdiv(k, block_k))  # no slice without a block of K
    if split_k > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m and n:
        _fp8_gemm_kernel[(cdiv(n, block_n), cdiv(m, block_m), split_k)](
            a, b, a_scale, b_scale, out, m, n, k, a.stride(0), b.stride(0), out.stride(0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, num_warps=warps, num_stages=stages,
        )  # fmt: skip
    return out.to(out_dtype)


def default_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, split_k) for an (M, K) x (K, N) product."""
    if m > 16:
        return (32, 64, 128, 4, 4, 1)
    split_k = 4 if k >= 3 * n else 1  # a long K over few columns (the down projection)
    return (16, 32, 256, 4, 4, split_k)  # bench/results/fp8_gemm_h100.md


def fp8_gemm_ref(a, b, a_scale, b_scale, out_dtype=torch.bfloat16) -> torch.Tensor:
    """Torch reference: the dequantized operands' product in float32, rounded to ``out_dtype``."""
    return ((a.float() * a_scale) @ (b.float() * b_scale[:, None]).T).to(out_dtype)
