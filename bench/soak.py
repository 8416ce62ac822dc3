"""Soak: steady mixed load on `pagoda serve` for minutes — memory that grows, KV blocks that leak, errors
that appear only after thousands of requests — and a KV-pressure run served through preemption.

    python -m bench.soak                                   # 10 minutes steady + 2 minutes under KV pressure
    python -m bench.soak --duration-s 6 --pressure-duration-s 10 --concurrency 8 --no-plot   # the size CI runs

(tests/integration/test_soak.py; ``pytest -m slow`` runs its longer variant: 20 s steady, 15 s under KV pressure.)

Steady: ``--concurrency`` closed-loop streams over loopback, half HTTP and half gRPC, prompts of 8 to
``--max-prompt`` random tokens and 4 to ``--max-tokens`` out; every ``--disconnect-every``-th stream
is dropped by its client after its first token (the abort path). Every ``--sample-s`` seconds the
resident memory (VmRSS) of the API process and of each replica is sampled; growth is the mean of the
last minute against the mean of the first minute after ``--warmup-s`` (allocator pools, caches and
compiled kernels fill during warm-up). After the load, the engines must be empty: no running or
waiting request, KV usage 0.

KV pressure: a second server whose replica has a pool of ``--pressure-blocks`` KV blocks gets long
prompts from more streams than fit; the engine must preempt and recompute, and every request must
still finish. Writes bench/results/<name>.json|md|png (RSS over time; no PNG with ``--no-plot``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import time
import zlib
from pathlib import Path

from bench.load import attach_to, detach, settled_state
from bench.load_client import MODEL_NAME, Outcome, grpc_once, http_once, raise_fd_limit
from bench.report import environment, markdown_table, write_report
from bench.serving import Variant
from bench.serving_load import Workload, percentiles
from bench.serving_server import Server


def rss_mib(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB; 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def replica_pids(server_pid: int) -> list[int]:
    """The Serve replicas of this server's own Ray cluster (its descendants), not another's on the host."""
    out = subprocess.run(["pgrep", "-f", "ServeReplica:"], capture_output=True, text=True, check=False).stdout
    return sorted(pid for pid in map(int, out.split()) if _descends_from(pid, server_pid))


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4: ppid
        except (OSError, IndexError, ValueError):
            return False
    return False


async def steady_load(server: Server, args, duration_s: float, vocab: int, max_prompt: int, max_tokens: int,
                      concurrency: int, seed: int, samples: list[dict] | None = None) -> list[Outcome]:
    """Closed-loop streams for ``duration_s``, half per protocol; RSS sampled into ``samples``."""
    import aiohttp
    import grpc

    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    counter = itertools.count()
    start = time.perf_counter()
    end = start + duration_s

    def work() -> Workload:
        return Workload(rng.randint(8, max_prompt), rng.randint(4, max_tokens), vocab, seed)

    async def worker(k: int, session, stub) -> None:
        while time.perf_counter() < end:
            i = next(counter)
            timeout = args.stream_timeout_s
            if args.disconnect_every and i % args.disconnect_every == args.disconnect_every - 1:
                timeout = 0.05  # the client gives up early: the server must abort and free the request
            if k % 2 == 0:
                out = await http_once(session, server.http_url, work(), i, timeout)
            else:
                out = await grpc_once(stub, pb, work(), i, timeout)
            if timeout == 0.05 and out.kind == "hung":
                out.kind = "dropped"
            outcomes.append(out)

    async def sampler() -> None:
        while time.perf_counter() < end:
            t = time.perf_counter() - start
            samples.append({"t_s": t, "api_mib": rss_mib(server.proc.pid),
                            "replica_mib": [rss_mib(p) for p in replica_pids(server.proc.pid)]})
            await asyncio.sleep(args.sample_s)

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session, \
            grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.PagodaStub(channel)
        tasks = [worker(k, session, stub) for k in range(concurrency)]
        if samples is not None:
            tasks.append(sampler())
        await asyncio.gather(*tasks)
    return outcomes


def growth_pct(samples: list[dict], key: str, warmup_s: float, window_s: float = 60.0) -> float | None:
    """Mean of the last ``window_s`` against the mean of the first ``window_s`` after warm-up, in %."""
    values = [(s["t_s"], s[key] if key == "api_mib" else sum(s["replica_mib"])) for s in samples]
    values = [(t, v) for t, v in values if t >= warmup_s and v > 0]
    if len(values) < 4:
        return None
    t_end = values[-1][0]
    window = min(window_s, (t_end - warmup_s) / 2)
    first = [v for t, v in values if t < warmup_s + window]
    last = [v for t, v in values if t > t_end - window]
    if not first or not last:
        return None
    a, b = sum(first) / len(first), sum(last) / len(last)
    return 100.0 * (b - a) / a


def summarize(label: str, outcomes: list[Outcome], wall_s: float, after: dict) -> dict:
    kinds = {k: sum(o.kind == k for o in outcomes) for k in ("ok", "dropped", "refused", "failed", "hung")}
    ok = [o for o in outcomes if o.kind == "ok"]
    row = {"run": label, "requests": len(outcomes), **kinds, "requests_per_s": len(outcomes) / wall_s,
           "server_faults": sum(o.code in ("500", "503", "INTERNAL", "UNAVAILABLE", "UNKNOWN") for o in outcomes)}
    for name, values in (("ttft", [o.ttft_s for o in ok]), ("e2e", [o.end_s for o in ok])):
        p = percentiles([v for v in values if v is not None])
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = 1000 * p["p50"], 1000 * p["p99"]
    row.update({f"after_{k}": v for k, v in after.items()})
    row["failure_kinds"] = sorted({f"{o.kind} {o.code}: {o.error[:120]}" for o in outcomes
                                   if o.kind in ("failed", "hung", "refused")})[:10]
    return row


def run(args, label: str, app: dict, duration_s: float, max_prompt: int, concurrency: int, vocab: int,
        samples: list[dict] | None) -> dict:
    state_dir = args.out / "soak_logs" / f"{label}-state"
    server = Server(app, Variant(label, env={"PAGODA_STATE_DIR": str(state_dir)}), args.num_cpus,
                    args.out / "soak_logs")
    try:
        server.wait_ready()
        attach_to(server)
        t0 = time.perf_counter()
        outcomes = asyncio.run(steady_load(server, args, duration_s, vocab, max_prompt, args.max_tokens,
                                           concurrency, zlib.crc32(label.encode()), samples))
        wall = time.perf_counter() - t0
        after = settled_state()
        row = summarize(label, outcomes, wall, after)
    finally:
        detach()  # before the cluster goes: a driver that loses its GCS ends the process a minute later
        server.stop()
    print(json.dumps({k: v for k, v in row.items() if k != "failure_kinds"}), flush=True)
    return row


COLUMNS = ["run", "requests", "ok", "dropped", "refused", "failed", "hung", "server_faults", "requests_per_s",
           "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "after_running", "after_waiting",
           "after_kv_usage", "after_preemptions", "api_rss_growth_pct", "replica_rss_growth_pct"]


def plot(samples: list[dict], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ts = [s["t_s"] for s in samples]
    ax.plot(ts, [s["api_mib"] for s in samples], label="API process")
    ax.plot(ts, [sum(s["replica_mib"]) for s in samples], label="replica(s)")
    ax.set_xlabel("s")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title("Resident memory under steady load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-cpu-tiny", help="random-weight model (bench/random_models.py)")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--duration-s", type=float, default=600.0)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--sample-s", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-prompt", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--disconnect-every", type=int, default=20, help="every k-th stream is dropped early (0: none)")
    p.add_argument("--pressure-duration-s", type=float, default=120.0, help="0: no KV-pressure run")
    p.add_argument("--pressure-blocks", type=int, default=64, help="KV blocks of the pressure run's replica")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--stream-timeout-s", type=float, default=120.0)
    p.add_argument("--name", default="soak_cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--no-plot", action="store_true", help="JSON and markdown only (the tests: no matplotlib)")
    args = p.parse_args(argv)
    raise_fd_limit()

    from transformers import AutoConfig

    from bench.random_models import make_random_model

    model = str(make_random_model(args.shape, args.model_dir / args.shape))
    vocab = AutoConfig.from_pretrained(model).vocab_size
    engine = {"model": model, "device": "cpu", "dtype": "float32", "max_model_len": 1024}
    deployment = {"name": MODEL_NAME, "num_replicas": 1, "cpus_per_replica": 1}
    samples: list[dict] = []
    steady = run(args, "steady", {"engine": engine, "deployment": deployment}, args.duration_s, args.max_prompt,
                 args.concurrency, vocab, samples)
    steady["api_rss_growth_pct"] = growth_pct(samples, "api_mib", args.warmup_s)
    steady["replica_rss_growth_pct"] = growth_pct(samples, "replica_mib", args.warmup_s)
    rows = [steady]
    if args.pressure_duration_s > 0:
        # The pool holds one longest request (max_model_len = its capacity); 16 streams of prompts up to
        # 60% of it need several times the pool, so the engine preempts and recomputes.
        capacity = args.pressure_blocks * 16
        tight = {**engine, "num_blocks": args.pressure_blocks, "block_size": 16, "max_num_seqs": 16,
                 "max_model_len": capacity}
        rows.append(run(args, "kv-pressure", {"engine": tight, "deployment": deployment}, args.pressure_duration_s,
                        min(capacity * 6 // 10, capacity - args.max_tokens - 1), 16, vocab, None))
    result = {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows,
              "rss_samples": samples}
    write_report(args.out, args.name, result,
                 f"Soak on loopback, {args.shape} on CPU, {args.concurrency} streams (half HTTP, half gRPC) for "
                 f"{args.duration_s:.0f} s; KV pressure: {args.pressure_blocks} blocks\n\n" + markdown_table(rows, COLUMNS),
                 None if args.no_plot else lambda png: plot(samples, png))


if __name__ == "__main__":
    main()
