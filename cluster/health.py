"""Replica health: a dead engine, or one that stopped making progress, fails Serve's health check.

Serve calls ``LLMReplica.check_health`` every ``deployment.health_check_period_s`` on the replica's
event loop and replaces the replica after three failures in a row (Serve's threshold), or when a
call takes longer than ``deployment.health_check_timeout_s``. The check is therefore cheap and reads
only the engine's flags and its last ``EngineSnapshot`` (``pagoda.engine.snapshot``), never the engine.
It fails when

- the engine is not running: a step raised (``EngineDeadError``), it was shut down, its thread is gone;
- the engine has had requests for more than ``deployment.stall_timeout_s`` without completing a step.
  An engine thread stuck inside ``step()`` (a hung device, a collective that never returns) publishes
  nothing, so its snapshot's ``last_progress_at`` goes stale. Progress, not latency: a long prompt is
  many chunked-prefill steps, each completing, and an idle engine is never stalled.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagoda.engine.async_engine import AsyncLLMEngine


class EngineUnhealthyError(RuntimeError):
    """What ``check_health`` raises; the message says which replica and why."""


def check_engine_health(engine: AsyncLLMEngine, stall_timeout_s: float, replica: str, now: float | None = None) -> None:
    """Raise EngineUnhealthyError when ``engine`` is dead or stalled; ``now`` is ``time.monotonic()`` by default."""
    if not engine.is_running:
        raise EngineUnhealthyError(f"engine of {replica} is not running")
    snapshot = engine.snapshot()
    stalled = snapshot.stalled_for(time.monotonic() if now is None else now)
    if stalled > stall_timeout_s:
        stats = snapshot.stats
        raise EngineUnhealthyError(
            f"engine of {replica} made no progress for {stalled:.1f}s (stall_timeout_s={stall_timeout_s}) with "
            f"{stats.num_running} running and {stats.num_waiting} waiting requests; last step #{snapshot.step}"
        )
