"""TP=2 with Ray actors as ranks (gloo on CPU), on a real local Ray cluster.

- greedy tokens equal TP=1 and the local MultiprocExecutor's TP=2;
- shutdown leaves no placement group and no rank actor;
- a rank killed with ``ray.kill`` mid-generation, a hung rank and a rank that raises all surface as
  EngineDeadError naming the rank, the group is torn down, and a new engine starts afterwards;
- a Serve replica with tensor_parallel_size=2 puts its rank actors in its own placement group
  (bundles 1 and 2) and streams the offline engine's greedy output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")
import ray._private.state as ray_state  # the GCS actor table (the public state API needs the dashboard)
from ray import serve

from pagoda import LLM, SamplingParams
from pagoda.cluster.app import deploy
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.cluster.ray_executor import RayExecutor
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.tokenizer import load_tokenizer
from pagoda.engine.worker.multiproc_executor import MultiprocExecutor

NUM_CPUS = 4
MAX_NEW = 12
PROMPT_LENGTHS = (3, 17, 40, 70)
DETECT_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=NUM_CPUS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def llama(tiny_models):
    return tiny_models["llama"]


@pytest.fixture(scope="module")
def prompts(llama) -> list[list[int]]:
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(llama).vocab_size
    rng = random.Random(7)
    return [[rng.randrange(100, vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def expected(llama, prompts) -> list[list[int]]:
    """Greedy tokens of the single-rank engine."""
    tokens = _greedy(_llm(llama, 1), prompts)
    assert sum(map(len, tokens)) > 2 * MAX_NEW  # not a trivial all-EOS comparison
    return tokens


def _llm(path, tp: int, backend: str = "mp", **kwargs) -> LLM:
    return LLM(model=str(path), tensor_parallel_size=tp, distributed_executor_backend=backend, device="cpu",
               dtype="float32", max_model_len=256, cpu_kv_cache_gib=0.05, **kwargs)


def _greedy(llm: LLM, prompts) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs]


def _alive_rank_actors() -> list[str]:
    return [a["ActorID"] for a in ray_state.actors().values()
            if a["ActorClassName"] == "RankActor" and a["State"] != "DEAD"]


def _live_placement_groups() -> list[dict]:
    return [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]


def _assert_torn_down(handles: list, timeout_s: float = 10.0) -> None:
    """No rank actor answers or is alive in the GCS, and no placement group is left."""
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.call.remote("ping"), timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (_alive_rank_actors() or _live_placement_groups()):
        time.sleep(0.1)
    assert _alive_rank_actors() == []
    assert _live_placement_groups() == []


def _generate_until_dead(llm: LLM) -> float:
    """Step (adding work whenever it runs out) until the engine raises; returns when it raised."""
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    added = 0
    while True:
        if not llm.engine.has_unfinished_requests():
            for _ in range(2):
                llm.engine.add_request(f"r{added}", {"prompt_token_ids": list(range(100, 140))}, params)
                added += 1
        try:
            llm.engine.step()
        except EngineDeadError:
            return time.monotonic()


def _assert_a_new_engine_works(path, prompts, expected) -> None:
    llm = _llm(path, 2, "ray")
    try:
        assert _greedy(llm, prompts[:2]) == expected[:2]
    finally:
        llm.engine.shutdown()


# ---------------------------------------------------------------- parity and clean shutdown


def test_ray_tp2_matches_tp1_and_multiproc_tp2(local_ray, llama, prompts, expected):
    multiproc = _llm(llama, 2, "mp")
    try:
        assert isinstance(multiproc.engine.executor, MultiprocExecutor)
        assert _greedy(multiproc, prompts) == expected
    finally:
        multiproc.engine.shutdown()

    llm = _llm(llama, 2, "ray")
    executor = llm.engine.executor
    assert isinstance(executor, RayExecutor)
    assert executor.owns_placement_group  # the test driver is in no placement group: it reserved one
    (group,) = _live_placement_groups()
    assert group["strategy"] == "STRICT_PACK" and list(group["bundles"].values()) == [{"CPU": 1.0}] * 2
    assert len(_alive_rank_actors()) == 2 and len({i.pid for i in executor.rank_infos}) == 2
    handles = list(executor.actors)
    try:
        executor.check_health()
        assert _greedy(llm, prompts) == expected
        llm.engine.kv.check_invariants()
        assert llm.engine.kv.usage() == 0
    finally:
        llm.engine.shutdown()
    _assert_torn_down(handles)
    llm.engine.shutdown()  # safe twice


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_ray_tp2_steps_through_launch_with_async_scheduling(local_ray, llama, prompts, expected, async_scheduling):
    """Async scheduling sends each step as a launch (the ranks reply with the step before it; a flush
    only where the engine drains), synchronous scheduling as execute_model: the same tokens either way."""
    llm = _llm(llama, 2, "ray", async_scheduling=async_scheduling)
    executor, sent = llm.engine.executor, []
    send_all = executor._send_all
    executor._send_all = lambda method, args: sent.append(method) or send_all(method, args)
    try:
        assert _greedy(llm, prompts) == expected
        assert llm.engine.kv.usage() == 0
    finally:
        llm.engine.shutdown()
    launches, flushes = sent.count("launch"), sent.count("flush")
    if async_scheduling:
        assert launches >= MAX_NEW and "execute_model" not in sent and 1 <= flushes < launches / 4
    else:
        assert sent.count("execute_model") >= MAX_NEW and launches == flushes == 0


# ---------------------------------------------------------------- failures


def test_killed_rank_actor_surfaces_within_30s_and_a_new_engine_starts(local_ray, llama, prompts, expected):
    llm = _llm(llama, 2, "ray")
    executor = llm.engine.executor
    handles, victim = list(executor.actors), executor.rank_infos[1]
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        ray.kill(handles[1])

    timer = threading.Timer(0.5, kill)  # lands mid-generation: inside a step or between two
    timer.start()
    raised_at = _generate_until_dead(llm)
    timer.join()
    assert raised_at - killed_at[0] < DETECT_WITHIN_S
    assert f"tensor-parallel rank 1 (pid {victim.pid}, node {victim.node_ip}) died" in executor._dead
    assert "killed by `ray.kill`" in executor._dead
    _assert_torn_down(handles)
    with pytest.raises(EngineDeadError, match="tensor-parallel group failed"):
        llm.engine.step()  # stays dead, answers at once
    with pytest.raises(EngineDeadError, match="killed by `ray.kill`"):
        executor.check_health()
    llm.engine.shutdown()  # safe after a failure
    _assert_a_new_engine_works(llama, prompts, expected)


def test_hung_rank_is_detected_by_the_step_timeout(local_ray, llama, monkeypatch):
    monkeypatch.setenv("PAGODA_STEP_TIMEOUT_S", "3")
    llm = _llm(llama, 2, "ray")
    executor = llm.engine.executor
    handles = list(executor.actors)
    llm.engine.add_request("a", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=50, ignore_eos=True))
    llm.engine.step()
    stuck = executor.rank_infos[1].pid  # a local cluster: the actor's process is on this machine
    os.kill(stuck, signal.SIGSTOP)  # rank 1 stops answering, as if stuck in a driver call; rank 0 waits in a collective
    try:
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"no reply to 'execute_model' from rank\(s\) \[0, 1\] within 3.0 s"):
            while True:  # the next step that needs rank 1 times out
                llm.engine.step()
        assert time.monotonic() - start < DETECT_WITHIN_S
        _assert_torn_down(handles)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)


def test_a_rank_that_raises_fails_the_start_naming_it(local_ray, llama, tmp_path):
    """The driver reads only the config and tokenizer; the ranks find no weights to load."""
    broken = tmp_path / "no-weights"
    shutil.copytree(llama, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    with pytest.raises(EngineDeadError, match=r"rank \d raised in 'load_model'"):
        _llm(broken, 2, "ray")
    _assert_torn_down([])


def test_missing_gpus_are_refused_before_any_actor_starts(local_ray, llama):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(2\) needs 2 GPUs in the Ray cluster, which has 0"):
        LLM(model=str(llama), tensor_parallel_size=2, distributed_executor_backend="ray", device="cuda")
    assert _alive_rank_actors() == [] and _live_placement_groups() == []


# ---------------------------------------------------------------- through Serve


def test_serve_replica_with_tp2_streams_the_offline_greedy_output(local_ray, llama, prompts, expected):
    app = AppConfig.from_dict({
        "engine": {"model": str(llama), "dtype": "float32", "device": "cpu", "tensor_parallel_size": 2,
                   "max_model_len": 256, "cpu_kv_cache_gib": 0.05},
        "deployment": {"name": "raytp", "num_replicas": 1, "health_check_period_s": 2,
                       "graceful_shutdown_timeout_s": 2},
    })
    assert app.engine.parallel.distributed_executor_backend == "ray"
    serve.start(proxy_location="Disabled")
    try:
        handle = deploy(app)
        # One group: bundle 0 holds the replica, bundles 1 and 2 the rank actors — nothing outside it.
        (group,) = _live_placement_groups()
        assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 3
        assert len(_alive_rank_actors()) == 2
        assert ray.available_resources().get("CPU", 0) == NUM_CPUS - 3
        client = PagodaClient(handle, load_tokenizer(llama))
        params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)

        async def main():
            requests = [client.complete(p, params, request_id=f"tp{i}") for i, p in enumerate(prompts)]
            return await asyncio.gather(*requests)

        done = asyncio.run(main())
        assert [c.token_ids for c in done] == expected
    finally:
        serve.delete(app.deployment.name)
    _assert_torn_down([])  # the replica's group went with it, and its rank actors with the group
