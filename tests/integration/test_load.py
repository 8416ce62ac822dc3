"""Under a burst of 200 streams per protocol, `pagoda serve` serves every one, refuses only with
429 / RESOURCE_EXHAUSTED (with Retry-After) when the configured queue is full, never hangs or fails
a stream, and its engines are empty afterwards — ``bench.load`` at the size CI affords."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bursts_are_served_or_refused_cleanly_and_nothing_leaks(tmp_path):
    cmd = [sys.executable, "-m", "bench.load", "--concurrency", "200", "--protocols", "http", "grpc",
           "--client-procs", "2", "--num-cpus", "2", "--stream-timeout-s", "120", "--queue-run",
           "--queue-run-concurrency", "200", "--model-dir", str(tmp_path / "models"), "--out", str(tmp_path),
           "--name", "load", "--no-plot"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = {run["label"]: run["rows"] for run in json.loads((tmp_path / "load.json").read_text())["runs"]}

    for row in runs["defaults"] + runs["small-queue"]:
        where = f"{row['protocol']} x {row['concurrency']}: {row['failure_kinds']}"
        assert row["hung"] == 0 and row["failed"] == 0 and row["server_faults"] == 0, where
        assert (row["after_running"], row["after_waiting"], row["after_kv_usage"]) == (0, 0, 0.0), row
        assert row["refusals_without_retry_after"] == 0, where
    for row in runs["defaults"]:  # the default queues hold a 200-stream burst: everyone is served
        assert row["success_pct"] == 100.0 and row["refused"] == 0, row
    for row in runs["small-queue"]:  # 4 running + 8 waiting + 8 in the API process: the rest are refused
        assert 0 < row["refused"] < 200, row
    probe = next(run for run in json.loads((tmp_path / "load.json").read_text())["runs"]
                 if run["label"] == "small-queue")["refusal_probe"]  # every queue held full: each probe refused
    assert probe["http"]["codes"] == ["429"] and probe["grpc"]["codes"] == ["RESOURCE_EXHAUSTED"], probe
