"""Kernel microbenchmarks on a GPU: achieved GB/s or TFLOP/s of every Triton kernel against the
copy bandwidth and matmul throughput measured in the same run, and the torch baseline.

    python -m bench.kernels        # writes bench/results/kernels.{json,md,png}
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.report import environment, markdown_table, write_report


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh([f"{r['kernel']} {r['shape'][:40]}" for r in rows], [100 * r["fraction_of_ceiling"] for r in rows])
    ax.set_xlabel("% of the ceiling measured in the same run")
    ax.set_title(result["environment"].get("gpu", ""))
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from pagoda.kernels.bench import bench_paged_decode, run_all

    ceilings, results = run_all()
    # the bar: batch 64, context 4096, 32 query / 8 KV heads, head dim 128
    results.append(bench_paged_decode(batch=64, context=4096, ceiling=ceilings["GB/s"]))
    rows = [r.row() for r in results]
    result = {"benchmark": "kernels", "ceilings": ceilings, "environment": environment(), "results": rows}
    table = markdown_table(
        [dict(r, of_ceiling=f"{r['fraction_of_ceiling']:.0%}") for r in rows],
        ["kernel", "shape", "ms", "achieved", "unit", "of_ceiling", "baseline", "speedup"],
    )

    write_report(args.out, "kernels", result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
