"""All-reduce latency by message size: NCCL against the symmetric-memory one-shot kernel.

One process per GPU joins a group exactly as an engine rank does (``engine.distributed``), then
for each size (bf16, the shape of ``tokens x hidden``) measures, on the same group in the same run:
- in a CUDA graph (how decode steps run): ``--per-graph`` all-reduces captured back to back,
  replayed ``--replays`` times, GPU time per all-reduce from CUDA events;
- eager (how prefill steps run): wall time per all-reduce over a loop, host overhead included;
and checks both results against the fp32 sum on random data (``_error``; the one-shot one must be
no worse than NCCL's or than world_size units).

    python -m bench.allreduce --world-size 2          # on a 2-GPU machine

Writes bench/results/allreduce_tp<k>_cuda.{json,md,png}. The one-shot path (opt-in,
``custom_all_reduce``) is used for messages up to ``engine.custom_all_reduce.MAX_BYTES`` of the
world size; these tables are where those numbers come from. Back-to-back calls flatter the one-shot kernel: inside
a real decode step (PAGODA_PROFILE_DIR traces) NCCL's LL kernel took 6.6 us and the one-shot 9.1 us
at 8 KiB, so read bench/tp.py's end-to-end rows before turning it on.
"""

from __future__ import annotations

import argparse
import datetime
import traceback
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_report

HIDDEN = 4096  # Llama-3.1-8B


def _time_graph(fn, x: torch.Tensor, per_graph: int, replays: int) -> float:
    """GPU microseconds per call of ``fn(x)`` inside a graph of ``per_graph`` calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(x)  # warm-up outside the capture (NCCL and symm-mem set-up)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):  # stream order serializes them, as in a decode step
            fn(x)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / (replays * per_graph)


def _time_eager(fn, x: torch.Tensor, iters: int) -> float:
    """Wall microseconds per call, host overhead included."""
    import time

    for _ in range(5):
        fn(x)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(iters):
        fn(x)
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - begin) / iters


def _error(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> float:
    """Largest error of a bf16 sum against the fp32 one, in units of 2**-8 * sum(|terms|): one bf16
    rounding of the result is <= 1, and each rounded partial sum (NCCL's ring) up to 1 more. A
    wrong buffer or offset shows up as hundreds."""
    return float(((got.float() - exact).abs() / (scale * 2.0**-8).clamp_min(2.0**-100)).max())


def _rank(rank: int, world: int, port: int, args, results) -> None:
    from engine.custom_all_reduce import SymmMemAllReduce
    from engine.distributed import init_tp_group

    try:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        tp = init_tp_group(rank, world, "127.0.0.1", port, device, timeout_s=120)
        fast = SymmMemAllReduce(tp.group, device, torch.bfloat16, max_bytes=max(args.tokens) * HIDDEN * 2)
        import torch.distributed as dist

        def nccl(x):
            dist.all_reduce(x)
            return x

        rows = []
        for tokens in args.tokens:
            torch.manual_seed(rank * 1000 + tokens)
            x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
            exact, scale = nccl(x.float()), nccl(x.float().abs())  # the fp32 sum, and the sum of |terms|
            err_fast, err_nccl = _error(fast.all_reduce(x), exact, scale), _error(nccl(x.clone()), exact, scale)
            row = {"tokens": tokens, "kib": tokens * HIDDEN * 2 / 1024, "oneshot_max_err": err_fast,
                   "nccl_max_err": err_nccl, "matches_nccl": err_fast <= max(float(world), err_nccl)}
            with torch.inference_mode():
                row["nccl_graph_us"] = _time_graph(nccl, x.clone(), args.per_graph, args.replays)
                row["oneshot_graph_us"] = _time_graph(fast.all_reduce, x.clone(), args.per_graph, args.replays)
                row["nccl_eager_us"] = _time_eager(nccl, x.clone(), args.iters)
                row["oneshot_eager_us"] = _time_eager(fast.all_reduce, x.clone(), args.iters)
            row["graph_speedup"] = row["nccl_graph_us"] / row["oneshot_graph_us"]
            rows.append(row)
        fast = None
        tp.destroy()
        results.put((rank, rows if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, traceback.format_exc()))


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    kib = [r["kib"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for key, label in [("nccl_graph_us", "NCCL, in graph"), ("oneshot_graph_us", "one-shot, in graph"),
                       ("nccl_eager_us", "NCCL, eager"), ("oneshot_eager_us", "one-shot, eager")]:
        ax.plot(kib, [r[key] for r in rows], marker="o", label=label, linestyle="-" if "graph" in key else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("message KiB (bf16, tokens x 4096)")
    ax.set_ylabel("µs per all-reduce")
    ax.legend(fontsize=8)
    fig.suptitle(f"all-reduce, {result['args']['world_size']} x {result['environment'].get('gpu', '?')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256, 512, 1024, 2048],
                    help="rows of 4096 bf16 (1 row = 8 KiB)")
    ap.add_argument("--per-graph", type=int, default=64, help="all-reduces per captured graph (~ a decode step)")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--iters", type=int, default=200, help="eager calls timed per size")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world_size:
        found = torch.cuda.device_count()
        raise SystemExit(f"--world-size {args.world_size} needs that many CUDA GPUs; torch sees {found}")
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=120))
    ctx = torch.multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, args.world_size, store.port, args, results), daemon=True)
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    errors = {r: v for r, v in got.items() if isinstance(v, str)}
    if errors:
        raise SystemExit("\n".join(f"rank {r}:\n{e}" for r, e in errors.items()))
    name = f"allreduce_tp{args.world_size}_cuda"
    result = {"benchmark": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(), "rows": got[0]}
    columns = ["tokens", "kib", "nccl_graph_us", "oneshot_graph_us", "graph_speedup", "nccl_eager_us",
               "oneshot_eager_us", "oneshot_max_err", "nccl_max_err", "matches_nccl"]
    write_report(args.out, name, result, markdown_table(result["rows"], columns), lambda png: plot(result, png))


if __name__ == "__main__":
    main()
