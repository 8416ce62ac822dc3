"""`pagoda status`: the running application's replicas, their queues and KV usage.

    pagoda status                         # the application "pagoda": RAY_ADDRESS, else this host's `pagoda serve`
    pagoda status --address 10.0.0.5:6379 --app pagoda --json
    pagoda status --address auto          # Ray's choice: the cluster started last on this host

Without ``--address``, the cluster is ``$RAY_ADDRESS`` (set inside a KubeRay pod), else the one this
host's `pagoda serve` of the application started (``pagoda.cluster.serve_state``). Ray's ``auto`` is
not the default: with several clusters on a host it attaches to the newest, which need not be ours.

Serve's status gives the application and replica states; each replica's engine numbers come from
its ``stats()`` (a call lands on one replica, so it is repeated until every running one answered).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field

_TRIES_PER_REPLICA = 10


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="replicas, KV usage and queue lengths of the running application")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else this host's `pagoda serve` of --app)")
    p.add_argument("--app", default="pagoda", help="Serve application name (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@dataclass
class AppStatus:
    app: str
    status: str  # Serve's application status (RUNNING, DEPLOYING, ...)
    deployment: str
    replica_states: dict[str, int]  # Serve replica state -> count
    replicas: list[dict] = field(default_factory=list)  # LLMReplica.stats() of each replica that answered


def collect_status(app: str) -> AppStatus | None:
    """The application's status on the connected Ray cluster, or None when it is not deployed."""
    import asyncio

    from ray import serve

    from pagoda.cluster.app import DEPLOYMENT_SUFFIX

    app_status = serve.status().applications.get(app)
    if app_status is None:
        return None
    # The engine deployment, also when an API ingress deployment fronts it (the KubeRay application).
    name = app + DEPLOYMENT_SUFFIX
    deployment = app_status.deployments.get(name)
    states = {_plain(k): v for k, v in (deployment.replica_states if deployment is not None else {}).items()}
    result = AppStatus(app, _plain(app_status.status), name, states)
    running = states.get("RUNNING", 0)
    if running:
        result.replicas = asyncio.run(_replica_stats(serve.get_deployment_handle(name, app), running))
    return result


def _plain(value) -> str:
    """Serve's status enums as their plain names ('RUNNING')."""
    return str(getattr(value, "value", value))


async def _replica_stats(handle, expected: int) -> list[dict]:
    seen: dict[str, dict] = {}
    for _ in range(_TRIES_PER_REPLICA * expected):
        stats = await handle.stats.remote()
        seen[stats["replica"]] = stats
        if len(seen) >= expected:
            break
    return [seen[k] for k in sorted(seen)]


def format_status(status: AppStatus) -> str:
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(status.replica_states.items())) or "no replicas"
    lines = [f"application {status.app!r}: {status.status}; deployment {status.deployment!r}: {states}"]
    header = f"{'replica':<40} {'running':>7} {'waiting':>7} {'KV use':>7} {'blocks':>7} {'preempt':>7} {'prefix hit':>10}"
    lines.append(header)
    for r in status.replicas:
        queries = r.get("prefix_cache_queries", 0)
        hit = f"{r.get('prefix_cache_hits', 0) / queries:.0%}" if queries else "-"
        lines.append(f"{_short(r['replica']):<40} {r['num_running']:>7} {r['num_waiting']:>7} "
                     f"{r['kv_cache_usage']:>7.1%} {r['num_blocks']:>7} {r['num_preemptions']:>7} {hit:>10}")
    if status.replicas:
        total_run = sum(r["num_running"] for r in status.replicas)
        total_wait = sum(r["num_waiting"] for r in status.replicas)
        mean_kv = sum(r["kv_cache_usage"] for r in status.replicas) / len(status.replicas)
        lines.append(f"{'total':<40} {total_run:>7} {total_wait:>7} {mean_kv:>7.1%}")
    return "\n".join(lines)


def _short(replica_id: str) -> str:
    return replica_id if len(replica_id) <= 40 else "…" + replica_id[-39:]


def resolve_address(address: str | None, app: str) -> str | None:
    """The cluster to ask: the flag, else $RAY_ADDRESS, else this host's live `pagoda serve` of ``app``."""
    from pagoda.cluster.serve_state import find_serve

    return address or os.environ.get("RAY_ADDRESS") or find_serve(app)


def status_main(args: argparse.Namespace) -> int:
    try:
        import ray
    except ImportError:
        print("error: `pagoda status` needs Ray Serve: pip install 'pagoda[cluster]'", file=sys.stderr)
        return 2
    address = resolve_address(args.address, args.app)
    if address is None:
        print(f"error: no `pagoda serve` of application {args.app!r} runs on this host; pass --address "
              "(a Ray cluster's GCS address, or 'auto') or set RAY_ADDRESS", file=sys.stderr)
        return 1
    try:
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # noqa: BLE001 — no cluster there: say so plainly
        print(f"error: cannot connect to the Ray cluster at {address!r}: {exc}", file=sys.stderr)
        return 1
    try:
        status = collect_status(args.app)
        if status is None:
            print(f"error: no Serve application {args.app!r} on this cluster", file=sys.stderr)
            return 1
        print(json.dumps(asdict(status), indent=2) if args.json else format_status(status))
        return 0
    finally:
        ray.shutdown()
