"""Load: bursts of concurrent streams against `pagoda serve` on loopback — who is served, who is refused
and how fast, and whether anything hangs, fails or leaks.

    python -m bench.load                                        # 100, 1,000, 5,000 streams, HTTP and gRPC
    python -m bench.load --concurrency 200 --queue-run --queue-run-concurrency 200 --client-procs 2 \
        --no-plot                                               # the size CI runs (tests/integration)
    python -m bench.load --queue-run                            # a small configured queue: the refusals' latency

A level is one burst: ``concurrency`` streams start together (split over ``--client-procs`` load
processes, so the client is not the ceiling; they start once every one of them has imported and connected),
each a short request (``--prompt-len`` random token ids, ``--max-tokens`` out, ``ignore_eos``) sent once.
Every stream ends as one of:

- ``ok``: all its tokens arrived;
- ``refused``: 429 / RESOURCE_EXHAUSTED (the documented answer when the queues are full);
- ``failed``: any other status or a stream that broke (5xx / INTERNAL / UNAVAILABLE are counted apart);
- ``hung``: no end within ``--stream-timeout-s``.

A refusal's latency is timed from its stream's start (``refusal_p50_ms``) and, over HTTP, also from the moment
its request was on the wire (``refusal_after_send_p50_ms``): the difference is the load process's own
queueing and connecting (2 cores, 1,000 at once from 2 load processes: p50 443 ms from the start, 228 ms
from the wire).

After each level the server's engines must be empty again: no running or waiting request and KV
usage 0, read as ``pagoda status`` reads them (``collect_status``) by this process, attached to the
server's Ray cluster. The server runs the application's defaults with a tiny random model on CPU
(``--shape``): what admission, queues and the API process do under a burst, not model speed.
Writes bench/results/<name>.json|md|png (no PNG with ``--no-plot``). The seed's own table (99.8 / 98.7 /
95.2% success at 100 / 1,000 / 5,000 concurrent; 12 / 45 / 120 ms) is printed beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path

from bench import chaos_cluster
from bench.load_client import Outcome, burst, grpc_once, http_once, raise_fd_limit
from bench.report import environment, markdown_table, write_report
from bench.serving import MODEL_NAME, Variant
from bench.serving_load import Workload, percentiles
from bench.serving_server import Server
from pagoda.cluster.api.config import EVENT_LOOPS

SEED_TABLE = {100: (99.8, 12), 1000: (98.7, 45), 5000: (95.2, 120)}  # concurrency -> (success %, latency ms)
SERVER_FAULTS = ("500", "503", "INTERNAL", "UNAVAILABLE", "UNKNOWN")
# `pagoda serve`'s ready lines: "ray cluster:  <gcs>   (connect: [RAY_AUTH_MODE=token, ]ray.init(...))"
READY = re.compile(r"ray cluster:\s+(?P<gcs>\S+)\s+\(connect: (?P<token>RAY_AUTH_MODE=token, )?")


# ---- the server's state ---------------------------------------------------------------------------------


def attach_to(server: Server, timeout_s: float = 60.0) -> None:
    """Connect this process to the server's own Ray cluster (the address `pagoda serve` prints once ready), so
    that the engines' state is read here, not by a `pagoda status` process per check; ``detach`` before
    ``server.stop()``."""
    deadline = time.monotonic() + timeout_s
    while not (ready := READY.search(Path(server.log.name).read_text())):
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise RuntimeError(f"pagoda serve printed no ray cluster address; see {server.log.name}")
        time.sleep(0.2)
    # Ray turns token auth on for a local cluster in the server's process: this driver then needs it too.
    chaos_cluster.attach({"gcs_address": ready["gcs"], "auth_mode": "token" if ready["token"] else ""})


def detach() -> None:
    """Leave the server's cluster, and forget Serve's client of it: Ray keeps that client across ``ray.shutdown()``
    and hands it out again on the next cluster if this process has the same job id there, as it has on each
    server's cluster (the second driver after `pagoda serve`)."""
    if "ray.serve" in sys.modules:
        from ray.serve import context

        context._disconnect()
    chaos_cluster.detach()


def engine_state() -> dict:
    """Running, waiting and KV usage summed over the replicas, read as `pagoda status` reads them
    (``collect_status``) on the cluster this process is attached to."""
    from pagoda.cluster.status_cli import collect_status

    status = collect_status(MODEL_NAME)
    if status is None:
        raise RuntimeError(f"no Serve application {MODEL_NAME!r} on the attached cluster")
    replicas = status.replicas
    return {"replicas": len(replicas), "running": sum(r["num_running"] for r in replicas),
            "waiting": sum(r["num_waiting"] for r in replicas),
            "kv_usage": max((r["kv_cache_usage"] for r in replicas), default=0.0),
            "preemptions": sum(r["num_preemptions"] for r in replicas)}


def settled_state(timeout_s: float = 30.0) -> dict:
    """The engines' state once they are empty, or the last one seen after ``timeout_s`` (a leak)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state()
        if (state["running"], state["waiting"], state["kv_usage"]) == (0, 0, 0.0) or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


# ---- summary --------------------------------------------------------------------------------------------


def summarize(protocol: str, concurrency: int, outcomes: list[Outcome], after: dict) -> dict:
    by = {k: [o for o in outcomes if o.kind == k] for k in ("ok", "refused", "failed", "hung")}
    ok, refused = by["ok"], by["refused"]
    row = {"protocol": protocol, "concurrency": concurrency, "requests": len(outcomes),
           "success_pct": 100.0 * len(ok) / max(1, len(outcomes)), "refused": len(refused),
           "failed": len(by["failed"]), "hung": len(by["hung"]),
           "server_faults": sum(o.code in SERVER_FAULTS for o in by["failed"]),
           "refusals_without_retry_after": sum(o.retry_after is None for o in refused)}
    for name, values in (("ttft", [o.ttft_s for o in ok]), ("e2e", [o.end_s for o in ok]),
                         ("refusal", [o.end_s for o in refused]), ("failure", [o.end_s for o in by["failed"]]),
                         ("refusal_after_send", [o.end_s - o.sent_s for o in refused if o.sent_s is not None])):
        p = percentiles([v for v in values if v is not None])
        row[f"{name}_p50_ms"], row[f"{name}_p99_ms"] = 1000 * p["p50"], 1000 * p["p99"]
    row.update({f"after_{k}": v for k, v in after.items()})
    failures = {}
    for o in by["failed"] + by["hung"]:
        failures.setdefault(f"{o.kind} {o.code}", o.error)
    row["failure_kinds"] = failures
    row["failures_after_first_token"] = sum(o.ttft_s is not None for o in by["failed"])
    row["refusal_kinds"] = sorted({_message(o.error)[:60] for o in refused})
    seed = SEED_TABLE.get(concurrency)
    row["seed_success_pct"], row["seed_latency_ms"] = (seed if seed else (None, None))
    return row


def _message(error: str) -> str:
    """An error body's message (an OpenAI error JSON, or a gRPC status' details as they are)."""
    try:
        return json.loads(error)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return error


COLUMNS = ["protocol", "concurrency", "requests", "success_pct", "refused", "failed", "hung", "server_faults",
           "ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "refusal_p50_ms", "refusal_p99_ms",
           "refusal_after_send_p50_ms", "refusal_after_send_p99_ms", "after_running", "after_waiting", "after_kv_usage",
           "seed_success_pct", "seed_latency_ms"]


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in result["runs"]:
        for protocol in sorted({r["protocol"] for r in run["rows"]}):
            rows = [r for r in run["rows"] if r["protocol"] == protocol]
            xs = [r["concurrency"] for r in rows]
            a.plot(xs, [r["success_pct"] for r in rows], marker="o", label=f"{run['label']} {protocol}")
            b.plot(xs, [r["ttft_p99_ms"] for r in rows], marker="o", label=f"{run['label']} {protocol} TTFT p99")
            b.plot(xs, [r["refusal_p99_ms"] for r in rows], marker="x", ls=":", label=f"{run['label']} {protocol} 429 p99")
    seed = sorted(SEED_TABLE.items())
    a.plot([c for c, _ in seed], [s for _, (s, _) in seed], "k--", label="seed's table")
    for ax, title in ((a, "requests served (%)"), (b, "ms")):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


# ---- main -----------------------------------------------------------------------------------------------


def app_config(args, model: str, overrides: dict) -> dict:
    """The application's defaults, except the model (tiny, random, on CPU) and ``overrides``."""
    app = {"engine": {"model": model, "device": "cpu", "dtype": "float32", "max_model_len": 512},
           "deployment": {"name": MODEL_NAME, "num_replicas": args.replicas, "cpus_per_replica": 1}}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        app.setdefault(section, {})[name] = value
    return app


async def refusal_probe(server: Server, work: Workload, holders: int, probes: int = 50) -> dict:
    """Refusal latency on its own: ``holders`` long streams fill every queue, then ``probes`` requests are sent
    one after another on one connection per protocol (no burst to queue behind); their latencies, ms."""
    import aiohttp
    import grpc

    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

    long = Workload(work.prompt_len, 400, work.vocab_size, seed=7)
    result = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session, \
            grpc.aio.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.PagodaStub(channel)
        fill = [asyncio.create_task(http_once(session, server.http_url, long, i, 120)) for i in range(holders)]
        await asyncio.sleep(3.0)  # every holder admitted or refused
        for protocol in ("http", "grpc"):
            times, codes = [], set()
            for i in range(probes):
                out = (await http_once(session, server.http_url, work, i, 10) if protocol == "http"
                       else await grpc_once(stub, pb, work, i, 10))
                times.append(1000 * (out.end_s or 0.0))
                codes.add(out.code or out.kind)
            p = percentiles(times)
            result[protocol] = {"probes": probes, "codes": sorted(codes), "p50_ms": p["p50"], "p99_ms": p["p99"]}
        for task in fill:
            task.cancel()
        await asyncio.gather(*fill, return_exceptions=True)
    return result


def run_server(args, label: str, app: dict, concurrencies: list[int], work: Workload,
               probe_holders: int = 0) -> dict:
    # its own state folder: the bench's `pagoda serve` does not take the place of a user's in ~/.cache/pagoda
    state_dir = args.out / "load_logs" / f"{label}-state"
    server = Server(app, Variant(label, env={"PAGODA_STATE_DIR": str(state_dir)}), args.num_cpus,
                    args.out / "load_logs")
    rows = []
    try:
        server.wait_ready()
        attach_to(server)
        for protocol in args.protocols:
            target = server.http_url if protocol == "http" else server.grpc_target
            for c in concurrencies:
                outcomes = burst(protocol, target, work, c, args.client_procs, args.stream_timeout_s)
                row = summarize(protocol, c, outcomes, settled_state())
                rows.append(row)
                print(json.dumps({"label": label, **{k: row[k] for k in COLUMNS}}), flush=True)
        probe = asyncio.run(refusal_probe(server, work, probe_holders)) if probe_holders else None
        if probe:
            print(json.dumps({"label": label, "refusal_probe": probe}), flush=True)
            settled_state()
    finally:
        detach()  # before the cluster goes: a driver that loses its GCS ends the process a minute later
        server.stop()
    return {"label": label, "config": app, "rows": rows, "refusal_probe": probe}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen3-cpu-tiny", help="random-weight model (bench/random_models.py)")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--protocols", nargs="+", choices=("http", "grpc"), default=["http", "grpc"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[100, 1000, 5000])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--api-servers", type=int, nargs="+", default=[1],
                   help="api.num_servers of the server (processes on the same ports); several: one run each")
    p.add_argument("--event-loops", nargs="+", choices=EVENT_LOOPS, default=[None],
                   help="api.event_loop of the server (default: the config's default); several: one run each")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the server's local Ray cluster")
    p.add_argument("--stream-timeout-s", type=float, default=300.0, help="a stream with no end by then is hung")
    p.add_argument("--queue-run", action="store_true",
                   help="also a server with a small queue (running 4 + waiting 8 + 8 in the API process) "
                        "under --queue-run-concurrency streams: how fast the rest are refused")
    p.add_argument("--queue-run-concurrency", type=int, default=1000)
    p.add_argument("--name", default="load_cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--no-plot", action="store_true", help="JSON and markdown only (the tests: no matplotlib)")
    args = p.parse_args(argv)
    raise_fd_limit()

    from bench.random_models import make_random_model

    model = str(make_random_model(args.shape, args.model_dir / args.shape))
    from transformers import AutoConfig

    work = Workload(args.prompt_len, args.max_tokens, AutoConfig.from_pretrained(model).vocab_size)
    runs = []
    for servers, loop in [(s, loop) for s in args.api_servers for loop in args.event_loops]:
        tag, api = ("", {}) if servers == 1 else (f"-api{servers}", {"api.num_servers": servers})
        if loop is not None:
            tag, api = f"{tag}-{loop}", {**api, "api.event_loop": loop}
        runs.append(run_server(args, "defaults" + tag, app_config(args, model, api), args.concurrency, work))
        if args.queue_run:
            small = {"engine.max_num_seqs": 4, "engine.max_waiting": 8, "api.max_queued_requests": 8, **api}
            runs.append(run_server(args, "small-queue" + tag, app_config(args, model, small),
                                   [args.queue_run_concurrency], work, probe_holders=2 * (4 + 8 + 8)))
    result = {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "runs": runs}
    table = "\n\n".join(f"**{run['label']}** ({json.dumps(run['config'])})\n\n" + markdown_table(run["rows"], COLUMNS)
                        + (f"\n\nRefusals one at a time, every queue full: {json.dumps(run['refusal_probe'])}"
                           if run.get("refusal_probe") else "")
                        for run in runs)
    write_report(args.out, args.name, result, f"Load bursts on loopback, {args.shape} on CPU, "
                 f"{args.prompt_len}-token prompts, {args.max_tokens} out\n\n" + table,
                 None if args.no_plot else lambda png: plot(result, png))


if __name__ == "__main__":
    main()
