"""EngineSnapshot: the engine's state as other threads may read it, published after every step.

The engine thread alone touches an ``LLMEngine`` (scheduler queues, KV pool, counters). Readers on
other threads — a Serve replica's event loop (routing stats, ``check_health``, ``stats``), the metrics
poll thread — read the last ``EngineSnapshot`` instead: a frozen object that the engine thread builds
and swaps in with one attribute assignment (atomic in CPython). A reader never sees a half-updated
pool, never takes a lock, never retries.

Freshness: ``SnapshotPublisher`` publishes after every step and after every batch of commands (add,
abort) or idle wait, so an idle engine's snapshot is at most one idle wait old (0.5 s). Times are
``time.monotonic()`` of the engine's process.

Progress: ``last_progress_at`` moves when a step completes and while the engine waits for work. A
snapshot whose engine has work and whose ``last_progress_at`` is old says the engine thread is stuck:
inside a ``step()`` that never returns nothing is published, so the timestamps simply go stale. A long
prefill is not a stall — with chunked prefill it is many steps, each completing.

Cost per step: the stats and the running ids, under 10 us on CPU at batch 64. The prefix summary walks
the block pool (the cached blocks in use, then the free list, up to ``prefix_summary_blocks``): about
0.7-1 ms on CPU for a 6,553-block pool, more for a large GPU pool. So it is rebuilt only when steps
ran since the last one, and then at most every ``prefix_summary_period_s`` while the engine is busy
(the replica uses its routing-stats period: nobody reads it more often) and at once when it goes idle.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.engine.config import require
from pagoda.engine.kv_cache.block_hash import hash_block

if TYPE_CHECKING:
    from pagoda.engine.llm_engine import EngineStats, LLMEngine


@dataclass(frozen=True)
class SnapshotConfig:
    """What the published snapshots carry beyond stats and running ids."""

    prefix_summary_blocks: int = 0  # most recently used prefix-cache keys kept (0: none; none either without caching)
    prefix_summary_period_s: float = 0.25  # while busy, the summary is rebuilt at most this often

    def __post_init__(self) -> None:
        require(self.prefix_summary_blocks >= 0,
                f"prefix_summary_blocks must be >= 0, got {self.prefix_summary_blocks}")
        require(self.prefix_summary_period_s >= 0,
                f"prefix_summary_period_s must be >= 0, got {self.prefix_summary_period_s}")


@dataclass(frozen=True)
class EngineSnapshot:
    """One published state of an engine, every field read at ``published_at`` by the thread that owns it."""

    stats: EngineStats  # queues (num_waiting is the waiting count), KV usage, cumulative counters
    running_ids: tuple[str, ...]  # engine ids in the running batch (one per completion when n > 1)
    has_work: bool  # requests running or waiting, or a step in flight: the engine thread keeps stepping
    cached_block_hashes: frozenset[int]  # up to prefix_summary_blocks prefix-cache keys, most recently used
    block_size: int  # tokens per KV block, the unit of cached_block_hashes
    step: int  # engine steps completed since start
    published_at: float  # monotonic time this snapshot was built
    last_progress_at: float  # monotonic time of the last completed step, or of the last wait for work

    def stalled_for(self, now: float) -> float:
        """Seconds the engine has had work without completing a step, as of monotonic ``now``; 0 when idle."""
        return max(0.0, now - self.last_progress_at) if self.has_work else 0.0

    def prefix_hit_tokens(self, token_ids: Sequence[int]) -> int:
        """Estimate of ``KVCacheManager.get_prefix_hit(token_ids).num_tokens`` from the summary alone.

        Same keys and rule as the engine: the leading run of full blocks inside the first n - 1 tokens
        (the last token is always computed) whose chained keys are cached. Text keys only (a prompt's
        images are not hashed in), and blind to cached blocks beyond the summary's limit.
        """
        summary, bs, parent = self.cached_block_hashes, self.block_size, None
        if not summary:
            return 0
        num_blocks = (len(token_ids) - 1) // bs
        for i in range(num_blocks):
            parent = hash_block(token_ids, bs, i, parent)
            if parent not in summary:
                return i * bs
        return max(0, num_blocks) * bs


class SnapshotPublisher:
    """Builds an ``LLMEngine``'s snapshots on its thread; ``latest`` is what other threads read."""

    def __init__(self, engine: LLMEngine, config: SnapshotConfig | None = None) -> None:
        config = config or SnapshotConfig()
        self._engine = engine
        self._limit = config.prefix_summary_blocks if engine.config.cache.enable_prefix_caching else 0
        self._period = config.prefix_summary_period_s
        self._steps = 0
        self._summary: frozenset[int] = frozenset()
        self._summary_step = 0  # self._steps when the summary was built
        self._summary_at = float("-inf")
        self._progress_at = time.monotonic()
        self.latest = self._build(self._progress_at)

    def after_step(self) -> None:
        """A step completed: that is progress."""
        self._steps += 1
        self._progress_at = time.monotonic()
        self.latest = self._build(self._progress_at)

    def after_commands(self, waited: bool) -> None:
        """Commands were applied, or the engine waited for some (``waited``: it had no work until now,
        which counts as progress, so a request that arrives at an idle engine starts a fresh clock)."""
        now = time.monotonic()
        if waited:
            self._progress_at = now
        self.latest = self._build(now)

    def _build(self, now: float) -> EngineSnapshot:
        engine = self._engine
        has_work = engine.has_unfinished_requests()
        if self._limit and self._summary_step != self._steps and (not has_work or now - self._summary_at >= self._period):
            self._summary = frozenset(engine.kv.cached_block_hashes(self._limit))
            self._summary_step, self._summary_at = self._steps, now
        return EngineSnapshot(
            stats=engine.stats(),
            running_ids=tuple(r.request_id for r in engine.scheduler.running),
            has_work=has_work,
            cached_block_hashes=self._summary,
            block_size=engine.config.cache.block_size,
            step=self._steps,
            published_at=now,
            last_progress_at=self._progress_at,
        )
