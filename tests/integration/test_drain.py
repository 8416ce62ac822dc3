"""Drain: a scale-down and a redeploy under steady load lose no request. Serve stops routing to a replica
it removes and waits (``graceful_shutdown_timeout_s``) for the requests it holds, running or queued in
its engine, before stopping it; a request that has no token yet when its replica goes is re-sent by
``PagodaClient``. Real local Ray cluster, the embedded model on CPU."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve

from pagoda import SamplingParams
from pagoda.cluster.app import deploy, deployment_name
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.engine.tokenizer import load_tokenizer

PARAMS = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def config(model: str, replicas: int, max_num_seqs: int = 16) -> AppConfig:
    return AppConfig.from_dict({
        "engine": {"model": model, "dtype": "float32", "device": "cpu", "max_model_len": 256,
                   "cpu_kv_cache_gib": 0.05, "max_num_seqs": max_num_seqs},
        "deployment": {"name": "drain", "num_replicas": replicas, "health_check_period_s": 1,
                       "graceful_shutdown_timeout_s": 60},
        "router": {"stats_period_s": 0.25},
    })


def replicas_running(name: str) -> int:
    status = serve.status().applications["drain"].deployments[name]
    return status.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def test_scale_down_and_redeploy_under_load_lose_no_request(ray_cluster, embedded_path):
    two = config(str(embedded_path), replicas=2)
    handle = deploy(two)
    client = PagodaClient(handle, load_tokenizer(embedded_path))
    results: list[tuple[str, str | None]] = []  # (phase, error or None)
    phase = ["two replicas"]

    async def worker(k: int, stop: asyncio.Event) -> None:
        i = 0
        while not stop.is_set():
            started_in = phase[0]  # requests are counted by the phase they started in
            try:
                out = await client.complete(f"Request {k}-{i}: count from one to ten.", PARAMS)
                results.append((started_in, None if len(out.token_ids) == PARAMS.max_tokens else "short"))
            except Exception as exc:  # noqa: BLE001 — every failure is counted and reported
                results.append((started_in, f"{type(exc).__name__}: {exc}"))
            i += 1

    async def served(at_least: int, timeout_s: float = 120.0) -> None:
        """Until ``at_least`` more requests have finished (the load runs through each phase)."""
        target, deadline = len(results) + at_least, time.monotonic() + timeout_s
        while len(results) < target and time.monotonic() < deadline:
            await asyncio.sleep(0.2)

    async def scenario() -> None:
        stop = asyncio.Event()
        workers = [asyncio.create_task(worker(k, stop)) for k in range(8)]
        await served(8)
        phase[0] = "scale down to one"
        await asyncio.to_thread(deploy, dataclasses.replace(two, deployment=dataclasses.replace(
            two.deployment, num_replicas=1)))
        deadline = time.monotonic() + 120
        while replicas_running(deployment_name(two)) != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        await served(4)
        phase[0] = "redeploy (new engine config: every replica replaced)"
        await asyncio.to_thread(deploy, config(str(embedded_path), replicas=1, max_num_seqs=12))
        phase[0] = "after"
        await served(8)
        stop.set()
        await asyncio.gather(*workers)

    asyncio.run(scenario())
    failures = [r for r in results if r[1] is not None]
    assert not failures, failures[:5]
    per_phase = {p: sum(1 for q, _ in results if q == p) for p, _ in results}
    assert all(n > 0 for n in per_phase.values()) and len(per_phase) == 4, per_phase  # load ran through every phase
