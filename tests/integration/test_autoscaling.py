"""Serve autoscaling on CPU, 1 to 2 replicas: KV occupancy brings the second replica up, idleness takes
it down.

``target_ongoing_requests`` is set so high that the request count alone would never ask for a second
replica: the scale-up can only come from the KV signal (``KVAwarePolicy`` over the replicas'
``record_autoscaling_stats``). A tiny KV cache fills with four long requests. Delays and report
intervals are short; each phase has a deadline, and the load stops by itself.
"""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")
from ray import serve

from pagoda import SamplingParams
from pagoda.cluster.app import deploy, deployment_name
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.engine.tokenizer import load_tokenizer

APP = "autoscale"
UP_DEADLINE_S = 90
DOWN_DEADLINE_S = 60


def running_replicas(config: AppConfig) -> int:
    app = serve.status().applications.get(APP)
    if app is None:
        return 0
    deployment = app.deployments[deployment_name(config)]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.fixture(scope="module")
def served(embedded_path):
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        config = AppConfig.from_dict({
            "engine": {"model": str(embedded_path), "dtype": "float32", "device": "cpu", "max_model_len": 128,
                       "cpu_kv_cache_gib": 0.0075, "max_num_seqs": 8, "max_num_batched_tokens": 256},
            "deployment": {"name": APP, "num_replicas": 1, "graceful_shutdown_timeout_s": 1,
                           "health_check_period_s": 2},
            "autoscaling": {"enabled": True, "min_replicas": 1, "max_replicas": 2,
                            "target_ongoing_requests": 1000, "target_kv_usage": 0.5,
                            "upscale_delay_s": 0.5, "downscale_delay_s": 2,
                            "metrics_interval_s": 0.5, "look_back_period_s": 1},
        })
        handle = deploy(config)
        yield config, PagodaClient(handle, load_tokenizer(embedded_path))
    finally:
        serve.shutdown()
        ray.shutdown()


def test_kv_load_adds_a_replica_and_idleness_removes_it(served):
    config, client = served
    assert running_replicas(config) == 1
    params = SamplingParams(max_tokens=96, ignore_eos=True)
    prompt = "Tell me a long story about a lighthouse keeper and the sea, with many details."

    async def keep_busy(stop: asyncio.Event) -> None:
        async def one():
            while not stop.is_set():
                await client.complete(prompt, params)
        await asyncio.gather(*(one() for _ in range(4)))

    async def until_scaled_up() -> float:
        stop = asyncio.Event()
        load = asyncio.create_task(keep_busy(stop))
        start = time.monotonic()
        try:
            while time.monotonic() - start < UP_DEADLINE_S:
                if running_replicas(config) == 2:
                    return time.monotonic() - start
                await asyncio.sleep(0.5)
            raise AssertionError(f"no second replica within {UP_DEADLINE_S}s of KV load")
        finally:
            stop.set()
            await asyncio.wait_for(load, timeout=60)  # in-flight requests finish; no new ones start

    up_s = asyncio.run(until_scaled_up())
    start = time.monotonic()
    while running_replicas(config) != 1:
        assert time.monotonic() - start < DOWN_DEADLINE_S, f"still 2 replicas {DOWN_DEADLINE_S}s after the load stopped"
        time.sleep(0.5)
    print(f"scaled up after {up_s:.1f}s of load, down {time.monotonic() - start:.1f}s after it stopped")
