"""EngineSnapshot: what the engine thread publishes, and what readers on other threads get from it.

- fields after steps, when idle and after an abort (running ids empty, KV usage 0), the step counter;
- the prefix-hit estimate from the summary equals the KV manager's hit (random prompts on a real
  KVCacheManager, no model) and the hit a tiny model's engine reports for a shared-prefix prompt;
- the prefix summary is bounded and absent when prefix caching is off.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda import AsyncLLMEngine, SamplingParams
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.llm_engine import EngineStats
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.snapshot import EngineSnapshot, SnapshotConfig

BLOCK = 16
LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
SHORT = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def engine_kwargs(path, **extra) -> dict:
    return {"model": str(path), "dtype": "float32", "device": "cpu", "max_model_len": 512, "cpu_kv_cache_gib": 0.05,
            **extra}


def wait_for(engine: AsyncLLMEngine, condition, timeout_s: float = 10.0) -> EngineSnapshot:
    """The first snapshot that satisfies ``condition`` (AssertionError with the last one after ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = engine.snapshot()
        if condition(snapshot):
            return snapshot
        assert time.monotonic() < deadline, snapshot
        time.sleep(0.005)


def summary_of(manager: KVCacheManager, limit: int | None = None) -> EngineSnapshot:
    stats = EngineStats(0, 0, manager.usage(), manager.num_blocks, 0, 0, 0, 8, 64)
    return EngineSnapshot(stats, (), False, frozenset(manager.cached_block_hashes(limit)), manager.block_size, 0, 0.0, 0.0)


@pytest.fixture(scope="module")
def engine(tiny_models):
    engine = AsyncLLMEngine.from_kwargs(SnapshotConfig(prefix_summary_blocks=256), **engine_kwargs(tiny_models["llama"]))
    yield engine
    engine.shutdown()


# ---- published state -----------------------------------------------------------------------------------


def test_a_new_engine_publishes_an_idle_snapshot(engine):
    snapshot = wait_for(engine, lambda s: not s.has_work)
    assert snapshot.running_ids == () and snapshot.stats.kv_cache_usage == 0
    assert snapshot.stalled_for(time.monotonic() + 3600) == 0  # idle is never a stall
    assert engine.stats() == snapshot.stats  # stats() is the latest snapshot's (equal while idle)


def test_running_ids_and_steps_while_streaming_then_idle_after_abort(engine):
    seen: list[EngineSnapshot] = []

    async def walk_away():
        async for out in engine.generate([300 + t for t in range(40)], LONG, "walk", output_kind=OutputKind.DELTA):
            seen.append(engine.snapshot())
            if len(seen) == 5:
                break  # the consumer leaves: the request is aborted at the engine thread's next turn

    asyncio.run(walk_away())
    busy = seen[-1]
    assert busy.running_ids == ("walk",) and busy.has_work
    assert busy.stats.num_running == 1 and busy.stats.kv_cache_usage > 0
    assert [s.step for s in seen] == sorted(s.step for s in seen) and seen[0].step < busy.step
    assert all(a.published_at <= b.published_at for a, b in itertools.pairwise(seen))
    assert all(s.last_progress_at <= s.published_at for s in seen)

    idle = wait_for(engine, lambda s: not s.has_work)
    assert idle.running_ids == () and idle.stats.num_running == idle.stats.num_waiting == 0
    assert idle.stats.kv_cache_usage == 0  # the aborted request's blocks went back
    assert idle.step >= busy.step and idle.published_at >= busy.published_at


def test_an_idle_snapshot_stays_fresh(engine):
    first = wait_for(engine, lambda s: not s.has_work)
    later = wait_for(engine, lambda s: s.published_at > first.published_at + 0.2)  # the idle wait is 0.5 s
    assert later.step == first.step and later.last_progress_at > first.last_progress_at


def test_the_waiting_count_shows_a_request_the_engine_has_not_run(tiny_models):
    engine = AsyncLLMEngine.from_kwargs(**engine_kwargs(tiny_models["llama"], max_num_seqs=1))

    async def main():
        a = engine.generate([400 + t for t in range(20)], LONG, "a")
        await anext(a)
        b = asyncio.create_task(anext(engine.generate([500 + t for t in range(20)], LONG, "b")))
        snapshot = await asyncio.to_thread(wait_for, engine, lambda s: s.stats.num_waiting == 1)
        b.cancel()
        await a.aclose()
        return snapshot

    try:
        snapshot = asyncio.run(main())
        assert snapshot.running_ids == ("a",) and snapshot.has_work
        assert wait_for(engine, lambda s: not s.has_work).stats.kv_cache_usage == 0
    finally:
        engine.shutdown()


# ---- the prefix summary and the estimate from it ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    shared=st.integers(0, 6 * BLOCK),
    cached_tail=st.integers(0, 3 * BLOCK),
    query_tail=st.lists(st.integers(5000, 5100), min_size=0, max_size=2 * BLOCK),
)
def test_the_estimate_equals_the_managers_hit(shared, cached_tail, query_tail):
    manager = KVCacheManager(num_blocks=64, block_size=BLOCK)
    prefix = [100 + t for t in range(shared)]
    cached = prefix + [9000 + t for t in range(cached_tail)]
    if cached:
        hit = manager.get_prefix_hit(cached)
        manager.allocate("warm", cached, hit, len(cached) - hit.num_tokens)
        manager.free("warm")  # freed blocks stay cached
    query = prefix + query_tail
    assert summary_of(manager).prefix_hit_tokens(query) == manager.get_prefix_hit(query).num_tokens


def test_the_estimate_leaves_the_last_token_and_stops_at_the_summary():
    manager = KVCacheManager(num_blocks=64, block_size=BLOCK)
    tokens = list(range(1, 4 * BLOCK + 1))  # exactly 4 full blocks
    manager.allocate("a", tokens, manager.get_prefix_hit(tokens), len(tokens))
    assert summary_of(manager).prefix_hit_tokens(tokens) == 3 * BLOCK  # the last token is always computed
    assert summary_of(manager).prefix_hit_tokens(tokens + [7]) == 4 * BLOCK
    assert summary_of(manager).prefix_hit_tokens([]) == 0
    # most recently used first: in-use blocks newest registration first, so a limit of 2 keeps blocks 2 and 3
    assert summary_of(manager, limit=2).prefix_hit_tokens(tokens + [7]) == 0


def test_the_estimate_equals_the_hit_the_engine_reports(engine):
    prefix = [700 + t for t in range(5 * BLOCK + 3)]  # 5 full blocks, then a partial one

    async def run(prompt, rid):
        return [out async for out in engine.generate(prompt, SHORT, rid)][-1]

    asyncio.run(run(prefix + [11, 12], "warm"))
    snapshot = wait_for(engine, lambda s: not s.has_work and len(s.cached_block_hashes) >= 5)
    query = prefix + [21, 22, 23]
    estimate = snapshot.prefix_hit_tokens(query)
    assert estimate == 5 * BLOCK
    assert asyncio.run(run(query, "query")).num_cached_tokens == estimate


def test_the_summary_is_bounded_and_absent_without_prefix_caching(tiny_models):
    path = tiny_models["llama"]
    bounded = AsyncLLMEngine.from_kwargs(SnapshotConfig(prefix_summary_blocks=3), **engine_kwargs(path))
    uncached = AsyncLLMEngine.from_kwargs(SnapshotConfig(prefix_summary_blocks=256),
                                          **engine_kwargs(path, enable_prefix_caching=False))

    async def run(engine):
        return [out async for out in engine.generate([800 + t for t in range(6 * BLOCK)], SHORT, "r")]

    try:
        for engine in (bounded, uncached):
            asyncio.run(run(engine))
        assert len(wait_for(bounded, lambda s: not s.has_work and s.cached_block_hashes).cached_block_hashes) == 3
        assert wait_for(uncached, lambda s: not s.has_work).cached_block_hashes == frozenset()
    finally:
        bounded.shutdown()
        uncached.shutdown()


def test_snapshot_config_is_validated():
    with pytest.raises(ValueError, match="prefix_summary_blocks must be >= 0, got -1"):
        SnapshotConfig(prefix_summary_blocks=-1)
    with pytest.raises(ValueError, match="prefix_summary_period_s must be >= 0"):
        SnapshotConfig(prefix_summary_period_s=-0.5)
