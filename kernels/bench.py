"""Microbenchmarks of the kernels on CUDA: achieved GB/s (or TFLOP/s) against the measured ceiling.

Each ``bench_*`` function builds random inputs at a real model shape (Llama-3-8B by default:
32 query heads, 8 KV heads, head_dim 128, hidden 4096, intermediate 14336), times the Triton
kernel with ``triton.testing.do_bench`` (median), times a torch baseline in the same run, and
returns a ``BenchResult``. Bytes are those the kernel must move (each input read once, each
output written once, split-K partials included); FLOPs count the causal work actually done.
``measure_ceilings`` times a device copy and a large bf16 matmul for the ceilings.
Importable without CUDA; ``bench/kernels.py`` drives it, or ``python -m pagoda.kernels.bench``.
"""

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from pagoda.kernels.activation import silu_and_mul, silu_and_mul_ref
from pagoda.kernels.paged_decode import choose_num_splits, paged_decode
from pagoda.kernels.paged_prefill import paged_prefill
from pagoda.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from pagoda.kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from pagoda.kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin_cache

DEVICE = "cuda"


@dataclass
class BenchResult:
    kernel: str
    shape: str
    ms: float  # median time of the Triton kernel
    unit: str  # "GB/s" or "TFLOP/s"
    achieved: float  # in `unit`
    ceiling: float  # measured copy bandwidth or matmul throughput, in `unit`
    baseline: str  # what the kernel is compared with
    baseline_ms: float

    @property
    def fraction_of_ceiling(self) -> float:
        return self.achieved / self.ceiling if self.ceiling else float("nan")

    def row(self) -> dict:
        return {**asdict(self), "fraction_of_ceiling": self.fraction_of_ceiling, "speedup": self.baseline_ms / self.ms}


def _time_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _warm_up_gpu(seconds: float = 1.0) -> None:
    """Matmuls until clocks have ramped: on a freshly started machine the first timings ran slow."""
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    while True:
        for _ in range(20):
            a @ a
        end.record()
        end.synchronize()
        if start.elapsed_time(end) > 1000 * seconds:
            return


def measure_ceilings(dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Device-to-device copy GB/s (bytes read + written) and 8192^3 matmul TFLOP/s."""
    buffers = torch.empty(2, 1 << 30, dtype=torch.uint8, device=DEVICE)
    copy_gbps = 2 * buffers[0].numel() / _time_ms(lambda: buffers[1].copy_(buffers[0])) / 1e6
    buffers = None  # free 2 GiB before the matmul
    a = torch.randn(8192, 8192, dtype=dtype, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=dtype, device=DEVICE)
    matmul_tflops = 2 * 8192**3 / _time_ms(lambda: a @ b) / 1e9
    return {"GB/s": copy_gbps, "TFLOP/s": matmul_tflops}


def _paged_batch(context_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """Random cache whose blocks are scattered (a shuffled pool), as after a while in serving."""
    seq_lens = [c + q for c, q in zip(context_lens, query_lens, strict=True)]
    blocks = [math.ceil(n / block_size) for n in seq_lens]
    pool = torch.randperm(sum(blocks), device=DEVICE).to(torch.int32)
    block_tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=DEVICE)
    for b, (start, count) in enumerate(zip([0, *torch.tensor(blocks).cumsum(0).tolist()], blocks, strict=False)):
        block_tables[b, :count] = pool[start : start + count]
    cache = torch.randn(2, sum(blocks), block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    q = torch.randn(sum(query_lens), num_heads, head_dim, dtype=dtype, device=DEVICE)
    as_int = lambda xs: torch.tensor(xs, dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, cache, block_tables, as_int([0, *torch.tensor(query_lens).cumsum(0).tolist()]), as_int(context_lens)


def _dense_sdpa(q, cache, block_tables, context_lens, query_len, causal):
    """Baseline: torch SDPA over the same K/V gathered into dense (B, H, L, D) tensors
    beforehand (gather not timed): what a contiguous-cache engine would run."""
    num_seqs = block_tables.shape[0]
    k = cache[0, block_tables.long()].flatten(1, 2).transpose(1, 2)  # (B, Hkv, L, D)
    v = cache[1, block_tables.long()].flatten(1, 2).transpose(1, 2)
    qd = q.view(num_seqs, query_len, q.shape[1], q.shape[2]).transpose(1, 2)  # (B, Hq, Lq, D)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if causal:  # every sequence has the same context: a bottom-right aligned causal mask
        n = k.shape[2]
        ctx = int(context_lens[0])
        mask = torch.ones(query_len, n, dtype=torch.bool, device=DEVICE).tril(ctx)
        mask[:, ctx + query_len :] = False
        return lambda: sdpa(qd, k, v, attn_mask=mask if ctx else None, is_causal=not ctx, enable_gqa=True)
    return lambda: sdpa(qd, k, v, enable_gqa=True)


def bench_paged_decode(
    batch=64, context=2048, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, ceiling=0.0
) -> BenchResult:
    q, cache, bt, _, _ = _paged_batch(
        [context - 1] * batch, [1] * batch, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    splits = choose_num_splits(batch, num_kv_heads, context, q.device)
    ms = _time_ms(lambda: paged_decode(q, cache, bt, seq_lens, max_seq_len=context))
    es = q.element_size()
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * es
    partial_bytes = 2 * batch * num_heads * splits * (head_dim + 2) * 4 if splits > 1 else 0
    total = kv_bytes + 2 * q.numel() * es + bt.numel() * 4 + partial_bytes
    base = _time_ms(_dense_sdpa(q, cache, bt, None, 1, causal=False))
    shape = f"B={batch} ctx={context} Hq={num_heads} Hkv={num_kv_heads} D={head_dim} bs={block_size} splits={splits}"
    return BenchResult("paged_decode", shape, ms, "GB/s", total / ms / 1e6, ceiling, "dense SDPA", base)


def bench_paged_prefill(
    batch=4, query_len=1024, context=0, num_heads=32, num_kv_heads=8, head_dim=128, block_size=16,
    dtype=torch.bfloat16, ceiling=0.0,
) -> BenchResult:  # fmt: skip
    q, cache, bt, qsl, ctx = _paged_batch(
        [context] * batch, [query_len] * batch, num_heads, num_kv_heads, head_dim, block_size, dtype
    )
    ms = _time_ms(lambda: paged_prefill(q, cache, bt, qsl, ctx, max_query_len=query_len))
    attended = batch * sum(context + i + 1 for i in range(query_len))  # (query, key) pairs, causal
    flops = 4 * attended * num_heads * head_dim  # QK^T and PV, 2 FLOPs per multiply-add
    base = _time_ms(_dense_sdpa(q, cache, bt, ctx, query_len, causal=True))
    shape = f"B={batch} q={query_len} ctx={context} Hq={num_heads} Hkv={num_kv_heads} D={head_dim} bs={block_size}"
    return BenchResult("paged_prefill", shape, ms, "TFLOP/s", flops / ms / 1e9, ceiling, "dense SDPA", base)


def bench_reshape_and_cache(
    num_tokens=4096, num_kv_heads=8, head_dim=128, block_size=16, dtype=torch.bfloat16, ceiling=0.0
) -> BenchResult:
    num_blocks = 4 * num_tokens // block_size
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    key = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    ms = _time_ms(lambda: reshape_and_cache(key, value, cache, slots))
    base = _time_ms(lambda: reshape_and_cache_ref(key, value, cache, slots))
    total = 4 * key.numel() * key.element_size() + slots.numel() * 8
    shape = f"T={num_tokens} Hkv={num_kv_heads} D={head_dim} bs={block_size}"
    return BenchResult("reshape_and_cache", shape, ms, "GB/s", total / ms / 1e6, ceiling, "torch index_put", base)


def bench_fused_add_rms_norm(num_tokens=4096, hidden=4096, dtype=torch.bfloat16, ceiling=0.0) -> BenchResult:
    x, residual = (torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE) for _ in range(2))
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    ms = _time_ms(lambda: fused_add_rms_norm(x, residual, weight))
    base = _time_ms(lambda: fused_add_rms_norm_ref(x, residual, weight))
    total = 4 * x.numel() * x.element_size() + weight.numel() * weight.element_size()
    return BenchResult(
        "fused_add_rms_norm", f"T={num_tokens} H={hidden}", ms, "GB/s", total / ms / 1e6, ceiling, "torch eager", base
    )


def bench_rms_norm(num_tokens=4096, hidden=4096, dtype=torch.bfloat16, ceiling=0.0) -> BenchResult:
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    weight = torch.randn(hidden, dtype=dtype, device=DEVICE)
    ms = _time_ms(lambda: rms_norm(x, weight))
    base = _time_ms(lambda: rms_norm_ref(x, weight))
    total = 2 * x.numel() * x.element_size() + weight.numel() * weight.element_size()
    return BenchResult(
        "rms_norm", f"T={num_tokens} H={hidden}", ms, "GB/s", total / ms / 1e6, ceiling, "torch eager", base
    )


def bench_rotary(
    num_tokens=4096, num_heads=32, num_kv_heads=8, head_dim=128, rotary_dim=128, is_neox=True,
    dtype=torch.bfloat16, ceiling=0.0,
) -> BenchResult:  # fmt: skip
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=dtype, device=DEVICE)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    positions = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
    cache = rotary_cos_sin_cache(rotary_dim, 8192, device=DEVICE)
    ms = _time_ms(lambda: apply_rotary(q, k, positions, cache, is_neox))
    base = _time_ms(lambda: apply_rotary_ref(q, k, positions, cache, is_neox))
    rotated = num_tokens * (num_heads + num_kv_heads) * rotary_dim * q.element_size()
    total = 2 * rotated + num_tokens * (rotary_dim * cache.element_size() + 8)
    style = "neox" if is_neox else "interleaved"
    shape = f"T={num_tokens} Hq={num_heads} Hkv={num_kv_heads} D={head_dim} rot={rotary_dim} {style}"
    return BenchResult("rotary", shape, ms, "GB/s", total / ms / 1e6, ceiling, "torch eager", base)


def bench_silu_and_mul(num_tokens=4096, intermediate=14336, dtype=torch.bfloat16, ceiling=0.0) -> BenchResult:
    x = torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=DEVICE)
    ms = _time_ms(lambda: silu_and_mul(x))
    base = _time_ms(lambda: silu_and_mul_ref(x))
    total = 3 * num_tokens * intermediate * x.element_size()
    shape = f"T={num_tokens} d={intermediate}"
    return BenchResult("silu_and_mul", shape, ms, "GB/s", total / ms / 1e6, ceiling, "torch eager", base)


def run_all(dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, float], list[BenchResult]]:
    """Every kernel at Llama-3-8B shapes; decode and prefill at a few batch/context points."""
    if not torch.cuda.is_available():
        raise RuntimeError("kernel benchmarks need a CUDA GPU")
    _warm_up_gpu()
    ceilings = measure_ceilings(dtype)
    gbps, tflops = ceilings["GB/s"], ceilings["TFLOP/s"]
    results = [
        bench_reshape_and_cache(dtype=dtype, ceiling=gbps),
        bench_paged_decode(batch=1, context=8192, dtype=dtype, ceiling=gbps),
        bench_paged_decode(batch=16, context=2048, dtype=dtype, ceiling=gbps),
        bench_paged_decode(batch=64, context=2048, dtype=dtype, ceiling=gbps),
        bench_paged_decode(batch=256, context=512, dtype=dtype, ceiling=gbps),
        bench_paged_prefill(batch=4, query_len=1024, dtype=dtype, ceiling=tflops),
        bench_paged_prefill(batch=1, query_len=4096, dtype=dtype, ceiling=tflops),
        bench_paged_prefill(batch=4, query_len=512, context=2048, dtype=dtype, ceiling=tflops),
        bench_rms_norm(dtype=dtype, ceiling=gbps),
        bench_fused_add_rms_norm(dtype=dtype, ceiling=gbps),
        bench_rotary(dtype=dtype, ceiling=gbps),
        bench_rotary(num_heads=32, num_kv_heads=2, rotary_dim=64, is_neox=False, dtype=dtype, ceiling=gbps),
        bench_silu_and_mul(dtype=dtype, ceiling=gbps),
    ]
    return ceilings, results


def format_table(ceilings: dict[str, float], results: list[BenchResult]) -> str:
    lines = [f"ceilings: copy {ceilings['GB/s']:.0f} GB/s, bf16 matmul {ceilings['TFLOP/s']:.0f} TFLOP/s"]
    header = f"{'kernel':<19} {'ms':>8} {'achieved':>16} {'of ceiling':>10} {'baseline':>16} {'speedup':>8}  shape"
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.kernel:<19} {r.ms:8.4f} {r.achieved:9.1f} {r.unit:<6} {r.fraction_of_ceiling:10.0%} "
            f"{r.baseline:>16} {r.baseline_ms / r.ms:7.2f}x  {r.shape}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    ceilings, results = run_all()
    print(format_table(ceilings, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ceilings": ceilings, "results": [r.row() for r in results]}, f, indent=2)


if __name__ == "__main__":
    main()
