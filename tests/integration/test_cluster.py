"""The Serve application on a real local Ray cluster: 2 CPU replicas of the embedded model.

One cluster for the module (replicas take seconds to load); the replica-kill test runs last.
Requests carry ids that say what they are, and every chunk names its replica, so the tests can
count where the router sent what.
"""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle, serve

import tests.integration.pinning_router as pinning
from pagoda import SamplingParams
from pagoda.cluster.app import deploy, deployment_name
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import ReplicaUnavailableError
from pagoda.engine.tokenizer import load_tokenizer

GREEDY = SamplingParams(temperature=0.0, max_tokens=16)
STATS_PERIOD_S = 0.25


def config(model: str) -> AppConfig:
    return AppConfig.from_dict({
        "engine": {"model": model, "dtype": "float32", "device": "cpu", "max_model_len": 512,
                   "cpu_kv_cache_gib": 0.1, "max_num_seqs": 48, "max_num_batched_tokens": 512},
        "deployment": {"name": "itest", "num_replicas": 2, "health_check_period_s": 2,
                       "graceful_shutdown_timeout_s": 2},
        "router": {"stats_period_s": STATS_PERIOD_S},
    })


@pytest.fixture(scope="module")
def cluster(embedded_path):
    cloudpickle.register_pickle_by_value(pinning)  # the router class travels by value to Serve's processes
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(proxy_location="Disabled")
        app = config(str(embedded_path))
        handle = deploy(app, router_class=pinning.PinningRouter)
        yield app, handle, PagodaClient(handle, load_tokenizer(embedded_path))
    finally:
        serve.shutdown()
        ray.shutdown()
        if pinning.__name__ in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(pinning)


def run(coro):
    return asyncio.run(coro)


async def replica_stats(handle, expected: int = 2, tries: int = 60) -> dict[str, dict]:
    """Stats of every replica (a `stats` call lands on a random one: ask until all answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        s = await handle.stats.remote()
        seen[s["replica"]] = s
        if len(seen) >= expected:
            break
    return seen


async def wait_idle(handle, timeout_s: float = 30.0) -> None:
    """Until no replica runs or queues anything, and routers have had time to see a snapshot saying so."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = (await replica_stats(handle)).values()
        if all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats):
            await asyncio.sleep(3 * STATS_PERIOD_S)
            return
        await asyncio.sleep(0.1)
    raise AssertionError("replicas did not go idle")


def test_64_concurrent_streams_match_offline_greedy(cluster, embedded_llm):
    _, _, client = cluster
    prompts = [f"Fact number {i} about {topic}:" for i, topic in enumerate(["the moon", "rivers", "tea", "owls"] * 16)]
    expected = embedded_llm.generate(prompts, GREEDY, use_tqdm=False)

    async def main():
        return await asyncio.gather(*[client.complete(p, GREEDY, request_id=f"par-{i}") for i, p in enumerate(prompts)])

    start = time.perf_counter()
    done = run(main())
    elapsed = time.perf_counter() - start
    for got, want in zip(done, expected):
        assert got.token_ids == want.outputs[0].token_ids
        assert got.text == want.outputs[0].text
        assert got.finish_reason == want.outputs[0].finish_reason
    per_replica = collections.Counter(c.replica for c in done)
    assert len(per_replica) == 2 and min(per_replica.values()) >= 24, per_replica  # no herding on a burst
    print(f"64 streams in {elapsed:.1f}s, per replica {dict(per_replica)}")


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_both_transports_stream_the_same_greedy_tokens_and_errors(cluster, embedded_llm, transport):
    """Serve's gRPC transport (the default) and a Ray actor task carry the same stream: tokens, the
    prompt ids of the first chunk, and the engine's ValueError for a bad request."""
    _, handle, default = cluster
    client = PagodaClient(handle, default.tokenizer, transport=transport)
    prompt = "The three primary colours are"
    want = embedded_llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0]

    async def main():
        chunks = [c async for c in client.generate(prompt, GREEDY, request_id=f"transport-{transport}")]
        with pytest.raises(ValueError, match="max_tokens"):
            await client.complete([1, 2, 3], SamplingParams(max_tokens=10_000))
        return chunks

    chunks = run(main())
    assert [t for c in chunks for t in c.output.outputs[0].token_ids] == want.token_ids
    assert chunks[0].output.prompt_token_ids == default.tokenizer(prompt).input_ids
    assert chunks[-1].output.finished


def test_a_request_over_the_grpc_transports_limit_goes_as_a_ray_task(cluster):
    """1.5M token ids pickle to ~4.5 MB, over the replica's 4 MiB gRPC message limit: the client re-sends the
    request as a Ray task, and the caller gets the engine's own answer (a ValueError), not a transport error."""
    _, _, client = cluster
    ids = [1000 + i % 1000 for i in range(1_500_000)]
    assert len(cloudpickle.dumps(ids)) > 4 * 2**20

    with pytest.raises(ValueError, match="max_model_len"):
        run(client.complete(ids, SamplingParams(max_tokens=1)))


def test_transport_must_be_known():
    with pytest.raises(ValueError, match="transport must be one of grpc, ray"):
        PagodaClient(None, transport="http")


@pytest.mark.parametrize("transport", ["grpc", "ray"])
def test_leaving_a_stream_aborts_it_on_the_replica(cluster, transport):
    _, handle, default = cluster
    client = PagodaClient(handle, default.tokenizer, transport=transport)
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def main():
        seen, replica = 0, None
        async for chunk in client.generate("Write a very long essay about the sea.", params,
                                           request_id=f"walk-away-{transport}"):
            seen, replica = seen + 1, chunk.replica
            if seen == 3:
                break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stats = (await replica_stats(handle))[replica]
            if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    assert run(main()), "the replica kept generating after the consumer left"


def test_bad_request_fails_with_the_engines_message(cluster):
    _, _, client = cluster

    async def main():
        await client.complete([1, 2, 3], SamplingParams(max_tokens=10_000))

    with pytest.raises(ValueError, match="max_tokens"):
        run(main())


def test_prompt_ids_come_back_in_the_first_chunk_only_and_every_chunk_counts_them(cluster):
    _, _, client = cluster
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)

    async def main():
        prompt_ids = await client.token_ids("List the planets in order:")
        return prompt_ids, [chunk async for chunk in client.generate(prompt_ids, params, request_id="prompt-once")]

    prompt_ids, chunks = run(main())
    assert len(chunks) >= 2, "one chunk says nothing about later ones"
    assert chunks[0].output.prompt_token_ids == prompt_ids
    assert all(c.output.prompt_token_ids == [] and c.output.prompt is None for c in chunks[1:])
    assert {c.num_prompt_tokens for c in chunks} == {len(prompt_ids)}
    assert chunks[-1].output.finished
    assert sum(len(c.output.outputs[0].token_ids) for c in chunks) == params.max_tokens


def test_new_requests_avoid_a_preloaded_replica(cluster):
    _, handle, client = cluster
    # 4 distinct 380-token prompts (no shared prefix): ~100 of the replica's 145 KV blocks while the shorts arrive.
    long_params = SamplingParams(temperature=0.0, max_tokens=120, ignore_eos=True)

    async def main():
        await wait_idle(handle)
        started = asyncio.Event()
        loaded = []

        async def long_request(i):
            prompt = [5000 + 1000 * i + t for t in range(380)]
            async for chunk in client.generate(prompt, long_params, request_id=f"{pinning.PIN}long-{i}"):
                loaded.append(chunk.replica)
                if len(loaded) >= 4:
                    started.set()

        tasks = [asyncio.create_task(long_request(i)) for i in range(4)]
        await asyncio.wait_for(started.wait(), 60)
        await asyncio.sleep(2 * STATS_PERIOD_S)  # let a snapshot show the load too
        shorts = await asyncio.gather(*[client.complete(f"Short question {i}?", GREEDY, request_id=f"short-{i}")
                                        for i in range(8)])
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return set(loaded), collections.Counter(c.replica for c in shorts)

    loaded, shorts = run(main())
    assert len(loaded) == 1, loaded  # the pinned requests all ran on one replica
    (busy,) = loaded
    assert shorts[busy] == 0 and sum(shorts.values()) == 8, (busy, shorts)


def test_shared_prefixes_follow_their_holder_and_stay_balanced(cluster):
    _, handle, client = cluster
    prefix_p = list(range(2000, 2160))  # 160 tokens = 10 full blocks
    prefix_q = list(range(3000, 3160))

    async def main():
        await wait_idle(handle)
        warm = await asyncio.gather(client.complete(prefix_p + [1], GREEDY, request_id="warm-p"),
                                    client.complete(prefix_q + [1], GREEDY, request_id="warm-q"))
        holder = {"p": warm[0].replica, "q": warm[1].replica}
        await asyncio.sleep(2 * STATS_PERIOD_S)
        requests = []
        for i in range(8):
            requests.append(("p", client.complete(prefix_p + [10 + i, 5], GREEDY, request_id=f"p-{i}")))
            requests.append(("q", client.complete(prefix_q + [10 + i, 5], GREEDY, request_id=f"q-{i}")))
        done = await asyncio.gather(*[coro for _, coro in requests])
        return holder, [(group, c) for (group, _), c in zip(requests, done)]

    holder, done = run(main())
    assert holder["p"] != holder["q"]  # two concurrent cold requests were spread
    for group, completion in done:
        assert completion.replica == holder[group], (group, completion.replica, holder)
        assert completion.num_cached_tokens >= 160
    assert collections.Counter(c.replica for _, c in done).most_common()[0][1] == 8  # 8 and 8


def test_killed_replica_fails_its_streams_and_is_replaced(cluster):
    app, handle, client = cluster
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def stream(i, first):
        try:
            async for chunk in client.generate(f"Tell a long story number {i}.", params, request_id=f"doomed-{i}"):
                first.setdefault(i, chunk.replica)
            return "finished", time.monotonic()
        except ReplicaUnavailableError as exc:
            return exc, time.monotonic()

    async def new_request_after(killed_at):
        while time.monotonic() - killed_at < 60:
            try:
                done = await asyncio.wait_for(client.complete("After the crash, say hi.", GREEDY), 30)
                return done, time.monotonic()
            except (TimeoutError, ReplicaUnavailableError):
                await asyncio.sleep(0.5)
        return None, time.monotonic()

    async def main():
        await wait_idle(handle)
        first: dict[int, str] = {}
        tasks = [asyncio.create_task(stream(i, first)) for i in range(4)]
        while len(first) < 4:
            await asyncio.sleep(0.05)
        victim = first[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        probe = asyncio.create_task(new_request_after(killed_at))
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=90)
        new, new_at = await probe
        return victim, first, results, killed_at, new, new_at

    victim, first, results, killed_at, new, new_at = run(main())
    failed_after = []
    for i, (result, at) in enumerate(results):
        if first[i] == victim:
            assert isinstance(result, ReplicaUnavailableError) and result.tokens_sent, result
            assert "died" in str(result)
            failed_after.append(at - killed_at)
        else:
            assert result == "finished"
    assert failed_after and max(failed_after) < 30, failed_after  # an error, not a hang
    assert new is not None and new.finish_reason is not None and new_at - killed_at < 60
    print(f"{len(failed_after)} stream(s) failed {max(failed_after):.1f}s after the kill; "
          f"a new request completed after {new_at - killed_at:.1f}s on {new.replica}")

    deadline = time.monotonic() + 90
    replaced = False
    while time.monotonic() < deadline and not replaced:
        status = serve.status().applications[app.deployment.name].deployments[deployment_name(app)]
        replicas = run(replica_stats(handle)) if status.replica_states.get("RUNNING", 0) == 2 else {}
        replaced = len(replicas) == 2 and victim not in replicas
        time.sleep(0.5)
    assert replaced, "Serve did not start a replacement replica"
