"""A replica whose engine stops making progress is replaced by Serve, and requests go on.

One CPU replica of a tiny model on a real local Ray cluster, with fast health checks
(``health_check_period_s`` 0.5 s, ``stall_timeout_s`` 1 s). The test injects the stall
(``StallingReplica.stall``: the engine thread blocks inside its next step for good); the replica's
``check_health`` sees work and a snapshot whose last progress gets older, fails, and Serve starts
another replica. A request sent after the stall is answered by the replacement.
"""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, serve

import tests.integration.stalling_replica as stalling
from pagoda import SamplingParams
from pagoda.cluster.app import deployment_name, deployment_options
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import ReplicaUnavailableError
from pagoda.engine.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def config(model: str) -> AppConfig:
    return AppConfig.from_dict({
        "engine": {"model": model, "dtype": "float32", "device": "cpu", "max_model_len": 256, "cpu_kv_cache_gib": 0.02},
        "deployment": {"name": "stall", "num_replicas": 1, "engine_core": "thread", "health_check_period_s": 0.5, "health_check_timeout_s": 5,
                       "stall_timeout_s": 1, "graceful_shutdown_timeout_s": 0.5},
        "router": {"stats_period_s": 0.5},
    })


@pytest.fixture
def app(tiny_models):
    cloudpickle.register_pickle_by_value(stalling)  # the replica class travels by value to Serve's processes
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        cfg = config(str(tiny_models["llama"]))
        bound = serve.deployment(stalling.StallingReplica).options(**deployment_options(cfg)).bind(cfg.to_dict())
        handle = serve.run(bound, name=cfg.deployment.name, route_prefix=None)
        yield cfg, handle, PagodaClient(handle, load_tokenizer(tiny_models["llama"]))
    finally:
        serve.shutdown()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(stalling)


def running_replicas(cfg: AppConfig) -> int:
    status = serve.status().applications[cfg.deployment.name].deployments[deployment_name(cfg)]
    return status.replica_states.get("RUNNING", 0)


async def complete_with_retries(client: PagodaClient, prompt: list[int], request_id: str, timeout_s: float):
    """The completion, retried while the only replica is being replaced (its death reaches the caller)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await asyncio.wait_for(client.complete(prompt, GREEDY, request_id=request_id),
                                          max(1.0, deadline - time.monotonic()))
        except ReplicaUnavailableError:
            assert time.monotonic() < deadline, "no replica answered"
            await asyncio.sleep(0.2)


def test_a_stalled_replica_is_replaced_and_new_requests_succeed(app):
    cfg, handle, client = app

    async def main():
        before = await client.complete(list(range(100, 120)), GREEDY, request_id="before")
        await asyncio.sleep(2)  # four health checks of an idle engine: it is not replaced
        again = await client.complete(list(range(100, 120)), GREEDY, request_id="again")
        assert again.replica == before.replica
        await handle.stall.remote()
        stalled_at = time.monotonic()
        stuck = asyncio.create_task(complete_with_retries(client, list(range(200, 220)), "stuck", 60))
        await asyncio.sleep(0.5)
        after = await complete_with_retries(client, list(range(300, 320)), "after", 60)
        return before, after, time.monotonic() - stalled_at, await asyncio.wait_for(stuck, 60)

    before, after, took, stuck = asyncio.run(main())
    assert after.replica != before.replica and len(after.token_ids) == GREEDY.max_tokens
    assert stuck.replica != before.replica  # the request that sat in the stuck engine was re-sent (no token out)
    assert running_replicas(cfg) == 1
    print(f"stalled replica replaced; a new request completed {took:.1f}s after the stall")


def test_a_dead_engine_takes_its_replica_down_and_a_request_without_tokens_is_retried(app):
    """A step that raises kills the engine; the replica then ends its process instead of answering 503 until
    three health checks fail. The request in that step had no token yet, so the client re-sends it, and
    the replacement Serve starts answers it."""
    cfg, handle, client = app
    handle.fail.remote().result()
    out = asyncio.run(asyncio.wait_for(client.complete("The capital of France is", GREEDY), timeout=120))
    assert len(out.token_ids) == GREEDY.max_tokens and client.retries >= 1
