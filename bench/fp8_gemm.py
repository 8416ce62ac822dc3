"""FP8 linear layers at the 8B shape's GEMMs, by batch rows M, on a GPU: where the time of an FP8
step goes, against bf16 in the same run.

Per (M, layer): bf16 ``F.linear``; the per-token activation quantization alone; ``torch._scaled_mm``
with row-wise scales (cuBLASLt / CUTLASS); pagoda's Triton ``fp8_gemm`` at its best of a few tile
configs (M <= 64; split-K among them) and at its default config. Times are medians
(``triton.testing.do_bench``); GB/s counts the weight bytes, the floor of a decode GEMM.

    python -m bench.fp8_gemm
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.report import environment, markdown_table, write_report

LAYERS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
CONFIGS = [(16, 16, 256, 4, 4), (16, 32, 256, 4, 4), (16, 32, 128, 4, 6), (16, 64, 256, 4, 4),
           (16, 64, 128, 4, 4), (16, 32, 512, 4, 3), (16, 128, 128, 8, 4), (32, 64, 128, 4, 4), (64, 64, 128, 4, 4),
           # split K: (..., split_k)
           (16, 32, 256, 4, 4, 2), (16, 32, 256, 4, 4, 4), (16, 32, 256, 4, 4, 8), (16, 64, 256, 4, 4, 2),
           (16, 64, 256, 4, 4, 4), (16, 32, 128, 4, 4, 4), (16, 16, 256, 4, 4, 2), (16, 32, 512, 4, 3, 2)]


def _us(fn) -> float:
    from triton.testing import do_bench

    return 1000 * do_bench(fn, warmup=10, rep=50, return_mode="median")


def measure(m: int, layer: str) -> dict:
    from pagoda.engine.layers.fp8 import quantize_rows
    from pagoda.kernels.fp8_gemm import fp8_gemm
    from pagoda.kernels.fp8_quant import per_token_fp8

    n, k = LAYERS[layer]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    q, scale = quantize_rows(w)
    qx, x_scale = per_token_fp8(x)
    row = {"M": m, "layer": layer, "N": n, "K": k,
           "bf16_us": _us(lambda: F.linear(x, w)),
           "quant_us": _us(lambda: per_token_fp8(x)),
           "scaled_mm_us": _us(lambda: torch._scaled_mm(qx, q.t(), scale_a=x_scale, scale_b=scale.view(1, -1),
                                                         out_dtype=torch.bfloat16))}
    if m <= 64:
        timed = {c: _us(lambda c=c: fp8_gemm(qx, q, x_scale, scale, config=c)) for c in CONFIGS if c[0] >= min(m, 16)}
        best = min(timed, key=timed.get)
        row |= {"triton_us": timed[best], "triton_config": list(best),
                "triton_default_us": _us(lambda: fp8_gemm(qx, q, x_scale, scale))}
    row["fp8_GBps"] = n * k / min(row["scaled_mm_us"], row.get("triton_us", float("inf"))) / 1e3
    row["bf16_GBps"] = 2 * n * k / row["bf16_us"] / 1e3
    return row


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key, label in (("bf16_us", "bf16"), ("scaled_mm_us", "_scaled_mm"), ("triton_us", "triton fp8_gemm")):
        us = {}
        for r in rows:
            if key in r:
                us[r["M"]] = us.get(r["M"], 0.0) + r[key]
        ax.plot(list(us), list(us.values()), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows M")
    ax.set_ylabel("us, one layer's 4 GEMMs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512, 2048])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="fp8_gemm")
    args = ap.parse_args()
    rows = [measure(m, layer) for m in args.m for layer in LAYERS]
    result = {"benchmark": args.name, "environment": environment(), "rows": rows}
    table = markdown_table(rows, ["M", "layer", "bf16_us", "quant_us", "scaled_mm_us", "triton_us", "triton_config",
                                  "triton_default_us",
                                  "fp8_GBps", "bf16_GBps"])
    write_report(args.out, args.name, result, table, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
