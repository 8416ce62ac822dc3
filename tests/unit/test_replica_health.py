"""Progress-based health: ``LLMReplica.check_health`` fails when the engine has work but completes no step
for ``deployment.stall_timeout_s``, and keeps passing through a prefill that takes longer than that but
completes step after step (chunked prefill).

A real LLMReplica on a tiny model, outside Serve (no Ray cluster; ``ray.util.metrics`` replaced by
no-ops). The stall is injected by the test: the engine's ``step`` is wrapped to wait on a
``threading.Event``, as a hung device or collective would.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

pytest.importorskip("ray")
import ray.util.metrics as ray_metrics

from pagoda import SamplingParams
from pagoda.cluster.config import AppConfig
from pagoda.cluster.health import EngineUnhealthyError, check_engine_health
from pagoda.cluster.protocol import GenerateRequest
from pagoda.cluster.replica import LLMReplica

STALL_TIMEOUT_S = 1.0
PARAMS = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class _NoMetric:
    def __init__(self, *args, **kwargs) -> None:
        pass

    inc = set = observe = lambda self, value=1.0, tags=None: None


@pytest.fixture
def make_replica(monkeypatch, tiny_models):
    for kind in ("Gauge", "Counter", "Histogram"):
        monkeypatch.setattr(ray_metrics, kind, _NoMetric)
    replicas = []

    def make(**engine) -> LLMReplica:
        config = AppConfig.from_dict({
            "engine": {"model": str(tiny_models["llama"]), "dtype": "float32", "device": "cpu", "max_model_len": 512,
                       "cpu_kv_cache_gib": 0.05, **engine},
            "deployment": {"stall_timeout_s": STALL_TIMEOUT_S, "cpus_per_replica": 2, "engine_core": "thread"},
        })
        replicas.append(LLMReplica(config.to_dict()))
        return replicas[-1]

    yield make
    for replica in replicas:
        replica.__del__()


def wrap_step(replica: LLMReplica, before_step) -> None:
    """Make the engine call ``before_step()`` at the start of every step (the test's injection point)."""
    step = replica.engine.engine.step_core

    def wrapped():
        before_step()
        return step()

    replica.engine.engine.step_core = wrapped


async def first_chunk(replica: LLMReplica, request_id: str, prompt: list[int]):
    stream = replica.generate(GenerateRequest(request_id, prompt, PARAMS))
    try:
        return await anext(stream)
    finally:
        await stream.aclose()


def test_a_stalled_engine_fails_the_check_and_recovers_when_it_moves_again(make_replica):
    replica = make_replica()
    replica.check_health()  # idle: healthy
    release, entered = threading.Event(), threading.Event()

    def hang():
        entered.set()
        release.wait()  # the engine thread is stuck here until the test lets go

    wrap_step(replica, hang)

    async def until_unhealthy() -> tuple[float, str]:
        assert await asyncio.to_thread(entered.wait, 10)
        stuck_at = time.monotonic()
        replica.check_health()  # work, but not stalled for long yet
        while time.monotonic() - stuck_at < STALL_TIMEOUT_S + 5:
            try:
                replica.check_health()
            except EngineUnhealthyError as exc:
                return time.monotonic() - stuck_at, str(exc)
            await asyncio.sleep(0.05)
        raise AssertionError("check_health never failed")

    async def main():
        request = asyncio.create_task(first_chunk(replica, "stuck", [100 + t for t in range(20)]))
        try:
            failed_after, message = await until_unhealthy()
            snapshot = replica.engine.snapshot()
        finally:
            release.set()  # the device comes back: steps complete again
        return failed_after, message, snapshot, await asyncio.wait_for(request, 30)

    failed_after, message, snapshot, chunk = asyncio.run(main())
    assert failed_after >= STALL_TIMEOUT_S - 0.1, failed_after  # not before the timeout (from the last progress)
    assert "made no progress" in message and "stall_timeout_s=1.0" in message and "1 waiting" in message
    assert snapshot.has_work and snapshot.stats.num_waiting == 1
    assert chunk.output.outputs[0].token_ids
    replica.check_health()  # progress again: healthy


def test_a_prefill_longer_than_the_timeout_passes_while_its_chunks_complete(make_replica):
    # 480 prompt tokens in chunks of 16: 30 steps of >= 0.1 s each, three times the stall timeout in all.
    replica = make_replica(max_num_batched_tokens=16, max_num_seqs=4)
    wrap_step(replica, lambda: time.sleep(0.1))  # a slow device, but every step completes

    async def main():
        request = asyncio.create_task(first_chunk(replica, "long", [1000 + t for t in range(480)]))
        start, checks = time.monotonic(), 0
        while not request.done():
            replica.check_health()  # raises on a false stall
            checks += 1
            await asyncio.sleep(0.05)
        return time.monotonic() - start, checks, request.result()

    took, checks, chunk = asyncio.run(main())
    assert took > 2 * STALL_TIMEOUT_S and checks > 20, (took, checks)
    assert chunk.num_prompt_tokens == 480 and chunk.output.outputs[0].token_ids
    assert replica.engine.snapshot().step >= 30


def test_a_dead_engine_fails_the_check(make_replica):
    replica = make_replica()
    replica.engine.shutdown()
    with pytest.raises(EngineUnhealthyError, match="is not running"):
        replica.check_health()


def test_the_check_reads_only_the_snapshot():
    """check_engine_health on a stand-in engine: stalled means work and an old last_progress_at."""
    from types import SimpleNamespace

    from pagoda.engine.llm_engine import EngineStats
    from pagoda.engine.snapshot import EngineSnapshot

    def engine(has_work: bool, progress_at: float):
        stats = EngineStats(1 if has_work else 0, 0, 0.5, 10, 0, 0, 0, 8, 64)
        snapshot = EngineSnapshot(stats, (), has_work, frozenset(), 16, 7, progress_at, progress_at)
        return SimpleNamespace(is_running=True, snapshot=lambda: snapshot)

    check_engine_health(engine(True, 100.0), 60.0, "r", now=159.0)
    check_engine_health(engine(False, 100.0), 60.0, "r", now=1e6)  # idle for ages: fine
    with pytest.raises(EngineUnhealthyError, match=r"no progress for 61.0s .* last step #7"):
        check_engine_health(engine(True, 100.0), 60.0, "r", now=161.0)


def test_the_health_settings_are_validated_and_reach_serve():
    from pagoda.cluster.app import deployment_options

    for field in ("stall_timeout_s", "health_check_timeout_s"):
        with pytest.raises(ValueError, match=rf"deployment.{field} must be > 0, got 0"):
            AppConfig.from_dict({"deployment": {field: 0}})
    config = AppConfig.from_dict({"deployment": {"health_check_period_s": 0.5, "health_check_timeout_s": 3}})
    options = deployment_options(config)
    assert (options["health_check_period_s"], options["health_check_timeout_s"]) == (0.5, 3.0)
    assert AppConfig().deployment.stall_timeout_s == 60.0
