"""All-reduce latency by message size: NCCL against the symmetric-memory one-shot kernel; and the
all-reduce + residual add + RMSNorm after each row-parallel layer: NCCL then the fused add+norm
kernel, against the one fused symmetric-memory kernel (kernels/allreduce_rmsnorm.py).

One process per GPU joins a group exactly as an engine rank does (``pagoda.engine.distributed``), then
for each size (bf16, the shape of ``tokens x hidden``) measures, on the same group in the same run:
- in a CUDA graph (how decode steps run): ``--per-graph`` all-reduces captured back to back,
  replayed ``--replays`` times, GPU time per all-reduce from CUDA events;
- eager (how prefill steps run): wall time per all-reduce over a loop, host overhead included;
and checks both results against the fp32 sum on random data (``_error``; the one-shot one must be
no worse than NCCL's or than world_size units). For ``--norm-tokens`` rows (decode batches) it times
``all_reduce`` + ``pagoda.kernels.rmsnorm.fused_add_rms_norm`` against ``all_reduce_rms_norm`` the same way in a
graph, after checking the fused kernel on every rank over consecutive calls (both buffer parities)
against ``pagoda.kernels.allreduce_rmsnorm.all_reduce_rms_norm_ref`` of all ranks' inputs: the residual stream bitwise, the
normed output to ``norm_max_err`` (``_error``'s units: 2 is one bf16 ulp, the rstd being summed in
another order than torch's), and the outputs bitwise equal on every rank.

    python -m bench.allreduce --world-size 2          # on a 2-GPU machine

Writes bench/results/allreduce_tp<k>_cuda.{json,md,png}. The one-shot path (opt-in,
``custom_all_reduce``) is used for messages up to ``pagoda.engine.custom_all_reduce.MAX_BYTES`` of the
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
EPS = 1e-5


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
    from pagoda.engine.custom_all_reduce import SymmMemAllReduce
    from pagoda.engine.distributed import init_tp_group

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
        norm_rows = [_norm_row(fast, tokens, rank, world, args) for tokens in args.norm_tokens]
        fast = None
        tp.destroy()
        results.put((rank, (rows, norm_rows) if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results.put((rank, traceback.format_exc()))


def _norm_check(fast, tokens: int, rank: int, world: int, residual, weight, calls: int = 4) -> dict:
    """The fused kernel against the reference over ``calls`` consecutive calls, on every rank."""
    import torch.distributed as dist

    from pagoda.kernels.allreduce_rmsnorm import all_reduce_rms_norm_ref

    bad, worst = torch.zeros(2, device=residual.device), 0.0  # [residual mismatches, rank disagreements]
    for call in range(calls):
        torch.manual_seed(rank * 1000 + tokens * 10 + call)
        x = torch.randn(tokens, HIDDEN, device=residual.device, dtype=torch.bfloat16)
        out, new_residual = fast.all_reduce_rms_norm(x, residual, weight, EPS)
        partials = torch.empty((world, *x.shape), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(partials, x)
        ref_out, ref_residual = all_reduce_rms_norm_ref(list(partials.unbind(0)), residual, weight, EPS)
        bad[0] += not torch.equal(new_residual, ref_residual)
        worst = max(worst, _error(out, ref_out.float(), ref_out.float().abs()))
        outs = torch.empty((world, *out.shape), dtype=out.dtype, device=out.device)
        dist.all_gather_into_tensor(outs, out)
        bad[1] += not all(torch.equal(o, outs[0]) for o in outs.unbind(0))
    dist.all_reduce(bad)
    err = torch.tensor([worst], device=bad.device)
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return {"norm_residual_exact": bad[0].item() == 0, "norm_max_err": err.item(), "ranks_equal": bad[1].item() == 0}


def _norm_row(fast, tokens: int, rank: int, world: int, args) -> dict:
    """NCCL all-reduce then the fused add+norm kernel, against one all_reduce_rms_norm, in a graph."""
    import torch.distributed as dist

    from pagoda.kernels.rmsnorm import fused_add_rms_norm

    device = torch.device("cuda", rank)
    torch.manual_seed(tokens)  # residual and weight: the same on every rank, as in the model
    residual = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    weight = (1 + 0.1 * torch.randn(HIDDEN, device=device)).to(torch.bfloat16)
    check = _norm_check(fast, tokens, rank, world, residual, weight)
    row = {"tokens": tokens, "kib": tokens * HIDDEN * 2 / 1024, **check}

    def nccl_then_norm(x):
        dist.all_reduce(x)  # in place, as the model reduces a fresh partial sum (values grow; times don't)
        return fused_add_rms_norm(x, residual, weight, EPS)

    def fused(x):
        return fast.all_reduce_rms_norm(x, residual, weight, EPS)

    x = torch.randn(tokens, HIDDEN, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        row["nccl_norm_graph_us"] = _time_graph(nccl_then_norm, x.clone(), args.per_graph, args.replays)
        row["fused_norm_graph_us"] = _time_graph(fused, x.clone(), args.per_graph, args.replays)
    row["norm_graph_speedup"] = row["nccl_norm_graph_us"] / row["fused_norm_graph_us"]
    return row


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
    ap.add_argument("--norm-tokens", type=int, nargs="*", default=[1, 8, 64],
                    help="rows of 4096 bf16 for the all-reduce + RMSNorm rows (decode batches)")
    ap.add_argument("--per-graph", type=int, default=64, help="all-reduces per captured graph (~ a decode step)")
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--iters", type=int, default=200, help="eager calls timed per size")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.world_size:
        found = torch.cuda.device_count()
        raise SystemExit(f"--world-size {args.world_size} needs that many CUDA GPUs; torch sees {found}")
    from pagoda.engine.custom_all_reduce import NORM_MAX_BYTES

    if args.norm_tokens and max(args.norm_tokens) * HIDDEN * 2 > NORM_MAX_BYTES:
        raise SystemExit(f"--norm-tokens: at most {NORM_MAX_BYTES // (HIDDEN * 2)} rows (NORM_MAX_BYTES)")
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
    rows, norm_rows = got[0]
    result = {"benchmark": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(), "rows": rows, "norm_rows": norm_rows}
    columns = ["tokens", "kib", "nccl_graph_us", "oneshot_graph_us", "graph_speedup", "nccl_eager_us",
               "oneshot_eager_us", "oneshot_max_err", "nccl_max_err", "matches_nccl"]
    norm_columns = ["tokens", "kib", "nccl_norm_graph_us", "fused_norm_graph_us", "norm_graph_speedup",
                    "norm_residual_exact", "norm_max_err", "ranks_equal"]
    table = markdown_table(rows, columns)
    if norm_rows:
        table += "\n\nall-reduce + residual add + RMSNorm, in a graph:\n\n" + markdown_table(norm_rows, norm_columns)
    write_report(args.out, name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
