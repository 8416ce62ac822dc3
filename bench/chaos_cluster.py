"""The application as KubeRay runs it, on a local Ray cluster: the API servers in an ingress Serve replica
(``pagoda.cluster.api.ingress:build_app``), not in the driver, so that the chaos bench can kill the ingress
and Serve restarts it on the same fixed ports — as it would on a head pod.

    python -m bench.chaos_cluster --config app.yaml --num-cpus 8     # the driver; SIGINT / SIGTERM stop it

``IngressServer`` starts that driver as a subprocess; it is a ``bench.serving_server.Server`` (``http_url``,
``grpc_target``, ``wait_ready``, ``stop`` with SIGINT, ``log``) that runs this driver instead of ``pagoda serve``.
The driver writes ``<state dir>/cluster.json`` (GCS address, Ray session folder) for the bench to attach
with ``attach``, and the ``pagoda serve`` state file. ``pagoda status`` finds the cluster by it but cannot
report on this application (it calls ``stats`` on the application's ingress, here the API deployment), so
``engine_state`` reads the engine deployment itself, in ``bench.load.engine_state``'s shape.

``RetryLog`` counts ``PagodaClient``'s retries from outside: each is a log line of the ingress replica's
process (``pagoda.cluster.client.RETRY_LOG``), which outlives the process in the Ray session's logs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from bench.serving_server import ROOT, Server, _free_port

CLUSTER_FILE = "cluster.json"


class IngressServer(Server):
    """The chaos driver as a subprocess; ``app`` is the application YAML without its ``api:`` section,
    which is added here: loopback and two fixed free ports."""

    def __init__(self, app: dict, label: str, num_cpus: int, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.http_port, self.grpc_port = _free_port(), _free_port()
        self.state_dir = workdir / f"{label}-state"
        (self.state_dir / CLUSTER_FILE).unlink(missing_ok=True)
        cfg = workdir / f"{label}.yaml"
        api = {"host": "127.0.0.1", "http_port": self.http_port, "grpc_port": self.grpc_port}
        cfg.write_text(yaml.safe_dump({**app, "api": api}))
        paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PAGODA_STATE_DIR": str(self.state_dir), "PYTHONPATH": os.pathsep.join(paths)}
        self.log = open(workdir / f"{label}.log", "w")  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.chaos_cluster", "--config", str(cfg), "--num-cpus", str(num_cpus)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def cluster(self, timeout_s: float = 60) -> dict:
        """What the driver wrote once the application was up: ``gcs_address``, ``session_dir``, ``app``."""
        path, deadline = self.state_dir / CLUSTER_FILE, time.monotonic() + timeout_s
        while not path.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"the chaos driver wrote no {path}; see {self.log.name}")
            time.sleep(0.2)
        return json.loads(path.read_text())


def attach(cluster: dict) -> None:
    """Connect this process to the chaos driver's cluster (before anything here imports Ray: Ray reads
    ``RAY_AUTH_MODE`` and ``RAY_ENABLE_AUTO_CONNECT`` at import). Auto-connect is off: after ``detach`` a
    Serve thread still polling the old cluster's controller would otherwise start a new local cluster in this
    process (a ``.remote()`` without Ray calls ``ray.init()``), and the next ``attach`` would then fail."""
    if cluster["auth_mode"]:
        os.environ["RAY_AUTH_MODE"] = cluster["auth_mode"]
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    import ray

    ray.init(address=cluster["gcs_address"], log_to_driver=False, logging_level="ERROR")


def detach() -> None:
    """Disconnect from the cluster (if attached)."""
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


def engine_state(app: str, tries_per_replica: int = 10) -> dict:
    """Running, waiting and KV usage over the engine replicas that run now (``bench.load.engine_state``'s keys);
    each replica answers through the deployment's handle, so the call is repeated until every one did."""
    from ray import serve

    from pagoda.cluster.app import DEPLOYMENT_SUFFIX

    name = app + DEPLOYMENT_SUFFIX
    states = serve.status().applications[app].deployments[name].replica_states
    running = sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")
    handle, seen = serve.get_deployment_handle(name, app), {}
    for _ in range(tries_per_replica * running):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats
        if len(seen) >= running:
            break
    replicas = list(seen.values())
    return {"replicas": len(replicas), "running": sum(r["num_running"] for r in replicas),
            "waiting": sum(r["num_waiting"] for r in replicas),
            "kv_usage": max((r["kv_cache_usage"] for r in replicas), default=0.0),
            "preemptions": sum(r["num_preemptions"] for r in replicas)}


def settled_state(app: str, timeout_s: float = 30.0) -> dict:
    """The engines' state once they are empty, or the last one seen after ``timeout_s`` (a leak)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = engine_state(app)
        if (state["running"], state["waiting"], state["kv_usage"]) == (0, 0, 0.0) or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


class RetryLog:
    """Retries logged so far by the client in any ingress process of the session (also killed ones): the
    distinct (request, attempt) pairs of ``RETRY_LOG`` lines in the workers' stderr and Serve's logs."""

    def __init__(self, session_dir: str) -> None:
        self.logs = Path(session_dir) / "logs"
        self._offsets: dict[Path, int] = {}
        self._seen: set[str] = set()

    def count(self) -> int:
        from pagoda.cluster.client import RETRY_LOG

        for path in [*self.logs.glob("worker-*.err"), *self.logs.glob("serve/*.log")]:
            with open(path, "rb") as f:
                f.seek(self._offsets.get(path, 0))
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line still being written is read next time
            self._offsets[path] = self._offsets.get(path, 0) + end
            for line in data[:end].decode(errors="replace").splitlines():
                if RETRY_LOG in line:
                    self._seen.add(line[line.index(RETRY_LOG):])
        return len(self._seen)


def serve_forever(config_path: str, num_cpus: int) -> None:
    """The driver: a local Ray cluster, the ingress application, the state files; until SIGINT / SIGTERM."""
    import ray
    from ray import serve

    from pagoda.cluster.api.ingress import build_app
    from pagoda.cluster.config import read_yaml
    from pagoda.cluster.serve_state import remove_state, state_path, write_state

    args = read_yaml(config_path)
    name = args["deployment"]["name"]
    ctx = ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(dict(args)), name=name, route_prefix=None)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        gcs = ctx.address_info["gcs_address"]
        write_state(name, gcs)
        # Ray turns token auth on for local clusters and says so in this process's environment; a second
        # driver (the bench, `pagoda status`) must then set RAY_AUTH_MODE=token too (bench.load looks for it).
        auth = os.environ.get("RAY_AUTH_MODE", "")
        cluster = {"app": name, "gcs_address": gcs, "session_dir": ctx.address_info["session_dir"], "auth_mode": auth}
        (state_path(name).parent / CLUSTER_FILE).write_text(json.dumps(cluster))
        print(f"chaos driver: ready {json.dumps(cluster)} (connect: RAY_AUTH_MODE={auth or 'disabled'})", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        remove_state(name)
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="application YAML with its api: section")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    args = p.parse_args(argv)
    serve_forever(args.config, args.num_cpus)


if __name__ == "__main__":
    main()
