"""Chaos under load: SIGKILL an engine replica, a tensor-parallel rank or the API ingress at random every N
seconds (Ray's RandomKiller pattern) while closed-loop streams run, and check what clients see.

    python -m bench.chaos --duration-s 120 --kill-every-s 20 --targets replica rank ingress --out bench/results
    python -m bench.chaos --duration-s 28 --kill-every-s 4 --targets replica ingress --order cycle \\
        --max-kills 2 --concurrency 8 --max-num-seqs 1          # the size CI runs (tests/integration)

(tests/integration/test_chaos.py; ``pytest -m slow`` runs its longer variant: ``--duration-s 40 --kill-every-s 12``.)

The application runs as KubeRay runs it (``bench.chaos_cluster``: API servers in an ingress Serve replica on
fixed ports), ``--replicas`` engine replicas of a tiny random model on CPU, each with ``--tp`` ranks (2 when
``rank`` is a target). ``--concurrency`` closed-loop streams, half HTTP and half gRPC (``bench.load``'s
senders), each request with a deadline: ``Request-Timeout: --deadline-s`` / gRPC ``timeout=``. Engines run
at most ``--max-num-seqs`` requests, so a killed replica also holds queued requests with no token yet:
those ``PagodaClient`` must re-send to another replica (counted from its log lines, ``RetryLog``).
``bench.chaos_killer.Killer`` kills; the next kill waits until the cluster is whole again.

Every request ends ``ok`` or as a failure classed by its status:

    unavailable   503 / UNAVAILABLE: its replica died after its first token, or its engine was dead
    deadline      504 / DEADLINE_EXCEEDED
    refused       429 / RESOURCE_EXHAUSTED
    connection    refused, reset or cut short (on gRPC: an UNAVAILABLE raised by grpc-core): the ingress died
    fault         anything else — 500 / INTERNAL / UNKNOWN, a stream that never ended: never expected

Per kill: failures and retries while it was the latest kill (``unavailable_no_token``: 503 / UNAVAILABLE
before the stream's first token, which the client did not or could no longer retry); ``recovery_s``, kill ->
end of the first success of a request sent after it (per protocol, the later); ``disrupted_s``, kill -> end
of the window's last failure (deadlines missed while a replica restarts count); ``replaced_s``, kill ->
cluster whole again. Afterwards the engines must be empty (KV usage 0). Requests that
outlive their deadline by more than ``--grace-s`` are counted (``past_deadline``): none may.
Writes bench/results/<name>.json|md|png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import threading
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from bench.chaos_cluster import IngressServer, RetryLog, attach, detach, settled_state
from bench.chaos_killer import TARGETS, Killer
from bench.load_client import MODEL_NAME, Outcome, grpc_once, http_once, raise_fd_limit
from bench.report import environment, markdown_table, write_report
from bench.serving_load import Workload, percentiles

DOCUMENTED = {  # failure class -> codes (HTTP status, SSE error code after the first token, gRPC status)
    "unavailable": {"503", "unavailable", "UNAVAILABLE"},
    "deadline": {"504", "deadline_exceeded", "DEADLINE_EXCEEDED"},
    "refused": {"429", "resource_exhausted", "RESOURCE_EXHAUSTED"},
    # aiohttp's own errors: no server on the port, or the server process gone mid-stream
    "connection": {"ClientConnectorError", "ServerDisconnectedError", "ClientOSError", "ClientPayloadError",
                   "ClientConnectionResetError", "truncated"},
}
# gRPC channels retry a lost connection with exponential backoff up to 120 s by default: capped at 1 s so
# that what is measured is the server coming back, not the client's backoff.
GRPC_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                ("grpc.max_reconnect_backoff_ms", 1000)]
FAILURE_PAUSE_S = 0.2  # a stream whose request failed waits this long (no hot loop on a refused port)
# gRPC reports a lost connection as UNAVAILABLE too; grpc-core's own messages tell it from the server's status
GRPC_TRANSPORT = ("failed to connect", "Socket closed", "Connection reset", "Connection refused", "Broken pipe",
                  "GOAWAY", "Stream removed")


def classify(o: Outcome) -> str:
    if o.kind == "ok":
        return "ok"
    if o.code == "UNAVAILABLE" and any(m in o.error for m in GRPC_TRANSPORT):
        return "connection"
    return next((cls for cls, codes in DOCUMENTED.items() if o.code in codes), "fault")


class _DeadlineStub:
    """The pagoda.v1 stub with a deadline on every Generate (``bench.load.grpc_once`` sends none)."""

    def __init__(self, stub, timeout_s: float) -> None:
        self._stub, self._timeout_s = stub, timeout_s

    def Generate(self, request):  # the gRPC method's name
        return self._stub.Generate(request, timeout=self._timeout_s)


async def closed_loop(server: IngressServer, args, work: Workload, stop: threading.Event) -> list[dict]:
    """``args.concurrency`` streams (even: HTTP, odd: gRPC), each sending its next request when the last
    ended, until ``stop``; one record per request."""
    import aiohttp
    import grpc

    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

    records, counter = [], itertools.count()
    hung_after = args.deadline_s + args.grace_s + 10  # a stream with no end by then is recorded as hung

    async def stream(k: int, session, stub) -> None:
        protocol = "http" if k % 2 == 0 else "grpc"
        while not stop.is_set():
            i = next(counter)
            if protocol == "http":
                out = await http_once(session, server.http_url, work, i, hung_after)
            else:
                out = await grpc_once(stub, pb, work, i, hung_after)
            cls = classify(out)
            records.append({"protocol": protocol, "start": out.start, "end": time.perf_counter(), "class": cls,
                            "kind": out.kind, "code": out.code, "ttft_s": out.ttft_s, "error": out.error[:200]})
            if cls != "ok":
                await asyncio.sleep(FAILURE_PAUSE_S)

    headers = {"Request-Timeout": str(args.deadline_s)}
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=None)) as session, \
            grpc.aio.insecure_channel(server.grpc_target, options=GRPC_OPTIONS) as channel:
        stub = _DeadlineStub(pb_grpc.PagodaStub(channel), args.deadline_s)
        await asyncio.gather(*(stream(k, session, stub) for k in range(args.concurrency)))
    return records


def count_retries(retry_log: RetryLog, marks: list[tuple[float, int]], stop: threading.Event) -> None:
    """(perf_counter, retries so far) every half second until ``stop``, and once more after it."""
    while not stop.wait(0.5):
        marks.append((time.perf_counter(), retry_log.count()))
    marks.append((time.perf_counter(), retry_log.count()))


def run_chaos(server: IngressServer, cluster: dict, killer: Killer, args, work: Workload) -> dict:
    """The load, the killer and the retry counter together; the kills' and requests' records."""
    stop, marks = threading.Event(), []
    t0 = time.perf_counter()
    errors: list[Exception] = []

    def kill() -> None:
        try:
            killer.run(t0, t0 + args.duration_s)
        except Exception as exc:  # noqa: BLE001 — re-raised below: a failed killer must not pass for a calm run
            errors.append(exc)
            stop.set()

    kill_thread = threading.Thread(target=kill, name="chaos-killer")
    count_thread = threading.Thread(target=count_retries, args=(RetryLog(cluster["session_dir"]), marks, stop))

    def stop_later() -> None:  # the load outlives the last kill's recovery by tail_s
        kill_thread.join()
        time.sleep(max(0.0, t0 + args.duration_s - time.perf_counter()) + args.tail_s)
        stop.set()

    threads = [kill_thread, count_thread, threading.Thread(target=stop_later, name="chaos-stop")]
    for t in threads:
        t.start()
    try:
        records = asyncio.run(closed_loop(server, args, work, stop))
    finally:
        killer.stop()
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError("the killer failed") from errors[0]
    return {"t0": t0, "end": time.perf_counter(), "records": records, "marks": marks}


# ---- summary --------------------------------------------------------------------------------------------


def recovery_s(at: float, records: list[dict]) -> float | None:
    """Kill at ``at`` -> end of the first success of a request sent after it, per protocol, the later of the
    two; None when a protocol never succeeded again."""
    worst = 0.0
    for protocol in sorted({r["protocol"] for r in records}):
        ends = [r["end"] for r in records if r["protocol"] == protocol and r["class"] == "ok" and r["start"] >= at]
        if not ends:
            return None
        worst = max(worst, min(ends) - at)
    return worst


def retries_until(marks: list[tuple[float, int]], t: float) -> int:
    """Retries counted by time ``t`` (the last poll at or before it)."""
    return max((n for at, n in marks if at <= t), default=0)


def kill_rows(kills, run: dict) -> list[dict]:
    records, marks, t0 = run["records"], run["marks"], run["t0"]
    rows = []
    for n, kill in enumerate(kills):
        until = kills[n + 1].at if n + 1 < len(kills) else run["end"]
        failed = [r for r in records if kill.at <= r["end"] < until and r["class"] != "ok"]
        by = Counter(r["class"] for r in failed)
        rows.append({"kill": n + 1, "t_s": kill.at - t0, "target": kill.target,
                     "victim": kill.victim.rsplit("#", 1)[-1][:12] or kill.skipped, "pid": kill.pid,
                     "failed": len(failed), **{cls: by.get(cls, 0) for cls in (*DOCUMENTED, "fault")},
                     "unavailable_no_token": sum(r["class"] == "unavailable" and r["ttft_s"] is None for r in failed),
                     "retried": retries_until(marks, until) - retries_until(marks, kill.at),
                     "recovery_s": recovery_s(kill.at, records) if not kill.skipped else None,
                     "disrupted_s": max((r["end"] for r in failed), default=kill.at) - kill.at,
                     "replaced_s": None if kill.replaced_at is None else kill.replaced_at - kill.at,
                     "failure_codes": dict(Counter(f"{r['protocol']} {r['code']}" for r in failed)),
                     "failure_examples": {f"{r['protocol']} {r['code']}": r["error"][:160] for r in reversed(failed)}})
    return rows


def totals(run: dict, kills, args, after: dict) -> dict:
    records = run["records"]
    by = Counter(r["class"] for r in records)
    e2e = [r["end"] - r["start"] for r in records]
    ok_e2e = percentiles([r["end"] - r["start"] for r in records if r["class"] == "ok"])
    first_kill = kills[0].at if kills else run["end"]
    row = {"requests": len(records), "ok": by.get("ok", 0), "failed": len(records) - by.get("ok", 0),
           **{cls: by.get(cls, 0) for cls in (*DOCUMENTED, "fault")},
           "failed_before_first_kill": sum(r["class"] != "ok" and r["end"] < first_kill for r in records),
           "retried": run["marks"][-1][1] if run["marks"] else 0,
           "past_deadline": sum(x > args.deadline_s + args.grace_s for x in e2e),
           "max_e2e_s": max(e2e, default=0.0), "e2e_p50_ms": 1000 * ok_e2e["p50"], "e2e_p99_ms": 1000 * ok_e2e["p99"],
           "kills": sum(not k.skipped for k in kills)}
    row.update({f"after_{k}": v for k, v in after.items()})
    row["fault_examples"] = sorted({f"{r['protocol']} {r['kind']} {r['code']}: {r['error'][:150]}"
                                    for r in records if r["class"] == "fault"})[:10]
    return row


KILL_COLUMNS = ["kill", "t_s", "target", "victim", "failed", *DOCUMENTED, "fault", "unavailable_no_token", "retried",
                "recovery_s", "disrupted_s", "replaced_s"]
TOTAL_COLUMNS = ["requests", "ok", "failed", *DOCUMENTED, "fault", "retried", "past_deadline", "max_e2e_s",
                 "e2e_p50_ms", "e2e_p99_ms", "kills", "after_running", "after_waiting", "after_kv_usage"]


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    requests, deadline = result["requests"], result["deadline_s"]
    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 6), sharex=True)
    horizon = int(max((r[0] + r[1] for r in requests), default=0)) + 1
    for cls, color in (("ok", "tab:green"), ("failed", "tab:red")):
        per_s = Counter(int(r[0] + r[1]) for r in requests if (r[2] == "ok") == (cls == "ok"))
        a.bar(range(horizon), [per_s.get(s, 0) for s in range(horizon)], width=1.0, align="edge", color=color,
              alpha=0.7, label=cls)
    for r, color in (("ok", "tab:green"), ("failed", "tab:red")):
        pts = [(s, e) for s, e, c, _ in requests if (c == "ok") == (r == "ok")]
        b.scatter([p[0] for p in pts], [p[1] for p in pts], s=4, color=color, label=r)
    b.axhline(deadline, color="k", ls="--", lw=1, label="deadline")
    for kill in result["kills"]:
        for ax in (a, b):
            ax.axvline(kill["t_s"], color="tab:purple", lw=1)
            if kill["replaced_s"] is not None:  # until Serve ran the cluster whole again
                ax.axvspan(kill["t_s"], kill["t_s"] + kill["replaced_s"], color="tab:purple", alpha=0.08)
        a.annotate(kill["target"], (kill["t_s"], a.get_ylim()[1] * 0.9), rotation=90, fontsize=8, color="tab:purple")
    a.set_ylabel("requests ended / s")
    b.set_ylabel("e2e (s), by start")
    b.set_xlabel("s since the load started")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


# ---- main -----------------------------------------------------------------------------------------------


def app_config(args, model: str, tp: int) -> dict:
    """A tiny random model on CPU, ``--replicas`` replicas with TP ``tp``; quick health checks, so a dead
    engine is replaced in seconds (Serve replaces after 3 failed checks in a row)."""
    return {"engine": {"model": model, "device": "cpu", "dtype": "float32", "max_model_len": 512,
                       "cpu_kv_cache_gib": 0.05, "max_num_seqs": args.max_num_seqs, "tensor_parallel_size": tp},
            "deployment": {"name": MODEL_NAME, "num_replicas": args.replicas, "cpus_per_replica": 1,
                           "health_check_period_s": 1.0, "health_check_timeout_s": 10.0,
                           "graceful_shutdown_timeout_s": 1.0},
            "router": {"stats_period_s": 0.5}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration-s", type=float, default=120.0, help="kills happen in this span of the load")
    p.add_argument("--kill-every-s", type=float, default=20.0)
    p.add_argument("--jitter-s", type=float, default=None, help="+- around --kill-every-s (default: a quarter)")
    p.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--order", choices=("random", "cycle"), default="random", help="which target each kill takes")
    p.add_argument("--max-kills", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--tp", type=int, default=None, help="ranks per engine (default: 2 if rank is a target, else 1)")
    p.add_argument("--max-num-seqs", type=int, default=4, help="small, so that replicas queue requests")
    p.add_argument("--concurrency", type=int, default=16, help="closed-loop streams, half HTTP, half gRPC")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--deadline-s", type=float, default=5.0, help="every request's deadline")
    p.add_argument("--grace-s", type=float, default=1.0, help="past its deadline by more is a violation")
    p.add_argument("--recovery-limit-s", type=float, default=60.0, help="the cluster must be whole again by then")
    p.add_argument("--tail-s", type=float, default=5.0, help="load after the last kill's cluster is whole")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    p.add_argument("--shape", default="qwen3-cpu-tiny", help="random-weight model (bench/random_models.py)")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--name", default="chaos_cpu")
    p.add_argument("--out", type=Path, default=Path("bench/results"))
    p.add_argument("--log-dir", type=Path, default=Path("bench/out/chaos"), help="the server's config and log")
    args = p.parse_args(argv)
    args.tp = args.tp or (2 if "rank" in args.targets else 1)
    if "rank" in args.targets and args.tp < 2:
        p.error("--targets rank needs --tp >= 2")
    if args.jitter_s is None:
        args.jitter_s = args.kill_every_s / 4
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    raise_fd_limit()
    from transformers import AutoConfig

    from bench.random_models import make_random_model

    model = str(make_random_model(args.shape, args.model_dir / args.shape))
    work = Workload(args.prompt_len, args.max_tokens, AutoConfig.from_pretrained(model).vocab_size)
    app = app_config(args, model, args.tp)
    server = IngressServer(app, args.name, args.num_cpus, args.log_dir)
    try:
        server.wait_ready()
        cluster = server.cluster()
        attach(cluster)
        killer = Killer.for_app(MODEL_NAME, args.replicas, args.tp, targets=tuple(args.targets),
                                every_s=args.kill_every_s, jitter_s=args.jitter_s, seed=args.seed, order=args.order,
                                max_kills=args.max_kills, recovery_limit_s=args.recovery_limit_s)
        if killer.wait_whole_since(time.perf_counter(), 120) is None:
            raise RuntimeError(f"the cluster never ran whole: see {server.log.name}")
        run = run_chaos(server, cluster, killer, args, work)
        killer.wait_whole_since(time.perf_counter(), args.recovery_limit_s)
        after = settled_state(MODEL_NAME, timeout_s=60)
    finally:
        detach()  # before the cluster goes: a driver that loses its GCS ends the process a minute later
        server.stop()
    t0 = run["t0"]
    result = {"env": environment(), "args": {k: str(v) for k, v in vars(args).items()}, "config": app,
              "deadline_s": args.deadline_s, "totals": totals(run, killer.kills, args, after),
              "kills": kill_rows(killer.kills, run), "kill_log": [asdict(k) for k in killer.kills],
              "requests": [(round(r["start"] - t0, 3), round(r["end"] - r["start"], 3), r["class"], r["protocol"])
                           for r in run["records"]]}
    header = (f"Chaos under load: {args.shape} on CPU, {args.replicas} replica(s) x TP {args.tp}, "
              f"{args.concurrency} closed-loop streams (half HTTP, half gRPC), {args.prompt_len}-token prompts, "
              f"{args.max_tokens} out, deadline {args.deadline_s:g} s; kill every {args.kill_every_s:g} "
              f"+- {args.jitter_s:g} s among {', '.join(args.targets)} ({args.order}, seed {args.seed})")
    table = (f"{header}\n\n**totals**\n\n{markdown_table([result['totals']], TOTAL_COLUMNS)}\n\n"
             f"**kills** (failures and retries while each was the latest kill; recovery_s: to the first success "
             f"of a request sent after the kill; disrupted_s: to the end of the last failure; replaced_s: to Serve "
             f"running the cluster whole again)\n\n"
             f"{markdown_table(result['kills'], KILL_COLUMNS)}")
    write_report(args.out, args.name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
