"""`pagoda serve`, run as a user would: bad configs fail fast, a good one serves until Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import requires_smollm2

CLI = [sys.executable, "-m", "pagoda.engine.cli"]


def test_generate_does_not_import_ray():
    code = "import sys; from engine.cli import build_parser; build_parser().parse_args(['generate', 'hi']); " \
           "print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert out.stdout.strip() == "False", out.stderr


def test_serve_help_lists_its_flags():
    out = subprocess.run(CLI + ["serve", "--help"], capture_output=True, text=True, timeout=60, check=False).stdout
    for flag in ("--config", "--address", "--num-cpus", "--dashboard"):
        assert flag in out


def test_bad_config_fails_before_ray_starts(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("deployment:\n  num_replicas: 0\n")
    start = time.monotonic()
    result = subprocess.run(CLI + ["serve", "--config", str(bad)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert "deployment.num_replicas must be >= 1, got 0" in result.stderr
    assert time.monotonic() - start < 30


@requires_smollm2
def test_serve_runs_until_interrupted_and_answers(tmp_path):
    config = tmp_path / "one.yaml"
    config.write_text(textwrap.dedent("""
        engine: {dtype: float32, device: cpu, max_model_len: 256, cpu_kv_cache_gib: 0.05}
        deployment: {name: clitest, num_replicas: 1}
    """))
    state = {"PAGODA_STATE_DIR": str(tmp_path / "state")}  # where `pagoda status` finds this serve
    server = subprocess.Popen(CLI + ["serve", "--config", str(config), "--num-cpus", "2"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **state})
    try:
        lines = _read_until(server, "Ctrl-C to stop", timeout_s=180)
        assert "ready" in lines[0] and "'clitest'" in lines[0]
        gcs = re.search(r"ray\.init\(address='([^']+)'\)", "\n".join(lines)).group(1)
        client = textwrap.dedent(f"""
            import asyncio, ray
            from ray import serve
            from pagoda.cluster.client import PagodaClient
            from pagoda import SamplingParams
            ray.init(address={gcs!r}, log_to_driver=False)
            client = PagodaClient(serve.get_app_handle("clitest"))
            out = asyncio.run(client.complete("The capital of France is", SamplingParams(temperature=0, max_tokens=8)))
            print("ANSWER", out.text)
        """)
        env = {**os.environ, "RAY_AUTH_MODE": "token"} if "RAY_AUTH_MODE=token" in "\n".join(lines) else None
        answer = subprocess.run([sys.executable, "-c", client], capture_output=True, text=True, timeout=120, env=env,
                                check=False)
        assert "ANSWER" in answer.stdout and "Paris" in answer.stdout, answer.stderr[-2000:]
        # no --address: the cluster this `pagoda serve` started, whatever else runs on the host
        status_env = {k: v for k, v in {**os.environ, **(env or {}), **state}.items() if k != "RAY_ADDRESS"}
        status = subprocess.run(CLI + ["status", "--app", "clitest", "--json"], capture_output=True, text=True,
                                timeout=120, env=status_env, check=False)
        assert status.returncode == 0 and '"deployment": "clitest-engine"' in status.stdout, status.stderr[-2000:]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            rc = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0, server.stderr.read()[-2000:]
    assert not (tmp_path / "state" / "serve-clitest.json").exists()  # removed on exit


def _read_until(proc: subprocess.Popen, marker: str, timeout_s: float) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                pytest.fail(f"pagoda serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            continue
        if line.startswith("pagoda serve") or lines:
            lines.append(line.rstrip())
        if marker in line:
            return lines
    pytest.fail(f"pagoda serve printed no {marker!r} within {timeout_s}s: {lines}")
