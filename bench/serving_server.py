"""A `pagoda serve` subprocess for ``bench.serving``, and py-spy profiles of it under load."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


class Server:
    """A `pagoda serve` subprocess on loopback ports, stopped with SIGINT like a user's Ctrl-C."""

    def __init__(self, app: dict, variant, num_cpus: int, workdir: Path) -> None:
        """``variant``: a ``bench.serving.Variant`` (label, env, code)."""
        workdir.mkdir(parents=True, exist_ok=True)
        cfg = workdir / f"{variant.label}.yaml"
        cfg.write_text(yaml.safe_dump(app))
        self.http_port, self.grpc_port = _free_port(), _free_port()
        code = Path(variant.code).resolve() if variant.code else ROOT
        env = {**os.environ, **variant.env, "PYTHONPATH": os.pathsep.join(
            [str(code)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != ROOT])}
        self.log = open(workdir / f"{variant.label}.log", "w")  # noqa: SIM115 — closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pagoda.engine.cli", "serve", "--config", str(cfg), "--num-cpus", str(num_cpus),
             "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)],
            cwd=code, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def wait_ready(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pagoda serve exited with {self.proc.returncode}; see {self.log.name}")
            try:
                with urllib.request.urlopen(self.http_url + "/v1/models", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"pagoda serve not ready after {timeout_s}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile(server: Server, out: Path, seconds: int, tag: str) -> list[subprocess.Popen]:
    """py-spy (raw folded stacks) of the server process, its replicas and their engine cores while the next level runs."""
    out.mkdir(parents=True, exist_ok=True)
    pids = {"ingress": server.proc.pid}
    ps = subprocess.run(["pgrep", "-f", "ServeReplica:"], capture_output=True, text=True, check=False).stdout.split()
    pids.update({f"replica{k}": int(pid) for k, pid in enumerate(ps)})
    for k, pid in enumerate(ps):  # a replica's engine core process (deployment.engine_core: process)
        kids = subprocess.run(["pgrep", "-P", pid], capture_output=True, text=True, check=False).stdout.split()
        pids.update({f"core{k}_{j}": int(kid) for j, kid in enumerate(kids)})
    return [subprocess.Popen(["py-spy", "record", "-d", str(seconds), "-r", "250", "-f", "raw", "--threads",
                              "--nonblocking", "-p", str(pid), "-o", str(out / f"{tag}_{who}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for who, pid in pids.items()]
