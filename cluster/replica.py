"""``LLMReplica``: the body of one Ray Serve replica — one ``AsyncLLMEngine``, streamed out.

    generate(GenerateRequest) -> async stream of GenerateChunk   (handle.options(stream=True))
    record_routing_stats() -> ReplicaStats wire dict             (Serve polls it for the router)
    stats() -> dict                                              (EngineStats + replica id)
    tokenize(text) -> list[int]                                  (for callers without a tokenizer)
    check_health()                                               (Serve replaces a replica whose engine died
                                                                  or stalled: cluster.health)
    record_autoscaling_stats() -> dict                           (KV usage and queues for cluster.autoscaling)

Engine state: everything here that describes the engine (routing and autoscaling stats, ``stats``, the
prefix-hit estimate, health, the metrics poll) reads ``AsyncLLMEngine.snapshot()``, the frozen state the
engine thread publishes after each step — never the engine itself, which only its thread touches.

Metrics (``pagoda.cluster.metrics``): request latencies and token counts are recorded as the stream yields;
a poll thread publishes the engine's queues, KV usage and prefix-cache counters from the snapshot.

Cancellation: when the caller cancels the stream (``PagodaClient`` does as soon as its consumer
stops), Serve cancels this generator's task; the engine's own stream aborts the request and its
KV blocks go back to the pool. Engine errors reach the caller as the engine raised them
(ValueError for bad input — an undecodable image names ``multi_modal_data.image[k]`` —, QueueFullError
at ``max_waiting``), except a dead engine's (a failed step: a lost TP rank, a device error): then the
replica ends its process, so callers see the actor die — requests with no token yet are retried on
another replica — and Serve replaces it at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator

from pagoda.cluster.config import AppConfig
from pagoda.cluster.health import check_engine_health
from pagoda.cluster.metrics import EnginePoller, ReplicaMetrics
from pagoda.cluster.protocol import GenerateChunk, GenerateRequest
from pagoda.cluster.routing_stats import ReplicaStats, now
from pagoda.engine.async_engine import AsyncLLMEngine
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.snapshot import SnapshotConfig

logger = logging.getLogger("pagoda.replica")


class LLMReplica:
    def __init__(self, config: dict) -> None:
        self.config = AppConfig.from_dict(config)
        _limit_cpu_threads(self.config)
        router = self.config.router  # the routing stats carry the prefix summary: no need to rebuild it more often
        snapshots = SnapshotConfig(router.prefix_summary_blocks, prefix_summary_period_s=router.stats_period_s)
        self.engine = AsyncLLMEngine(self.config.engine, snapshots, core=self.config.engine_core)
        self.replica = _replica_name()
        self._unprefilled: dict[str, int] = {}  # request id -> uncached prompt tokens, until its first output
        tenants = [name for name, _ in self.config.engine.scheduler.tenant_weights]  # the metrics' tenant tags
        self.metrics = ReplicaMetrics(self.config.engine.model.model, self.replica, tenants)
        self._poller = EnginePoller(self.engine, self.metrics)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        prompt = {"prompt_token_ids": list(request.prompt_token_ids)}
        if request.prompt is not None:
            prompt["prompt"] = request.prompt
        if request.images:  # the engine decodes them and expands each placeholder (ValueError names image[k])
            prompt["multi_modal_data"] = {"image": list(request.images)}
        rid = request.request_id
        token_ids = request.prompt_token_ids  # a hint for the router: prefill work net of the prefix cache
        self._unprefilled[rid] = len(token_ids) - self.engine.snapshot().prefix_hit_tokens(token_ids)
        stream = self.engine.generate(prompt, request.sampling_params, rid, request.priority, OutputKind.DELTA,
                                      tenant=request.tenant)
        self.metrics.request_started(rid, request.priority, request.sampling_params.n, request.tenant)
        try:
            async with contextlib.aclosing(stream):  # closing the engine stream aborts an unfinished request
                first = True
                async for output in stream:
                    prompt_tokens = len(output.prompt_token_ids)  # image tokens expanded
                    self._unprefilled.pop(rid, None)
                    self.metrics.on_output(rid, output, prompt_tokens)
                    if not first:  # the caller has the prompt: later chunks carry only what is new
                        output = dataclasses.replace(output, prompt=None, prompt_token_ids=[])
                    first = False
                    yield GenerateChunk(output, self.replica, prompt_tokens)
        except EngineDeadError:
            _exit_replica(self.replica)  # never returns
        finally:
            self._unprefilled.pop(rid, None)
            self.metrics.request_ended(rid)

    def record_routing_stats(self) -> dict:
        snapshot = self.engine.snapshot()
        stats, sched = snapshot.stats, self.config.engine.scheduler
        return ReplicaStats(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_usage=stats.kv_cache_usage,
            num_blocks=stats.num_blocks,
            block_size=self.config.engine.cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            pending_prefill_tokens=sum(self._unprefilled.values()),
            num_preemptions=stats.num_preemptions,
            cached_block_hashes=snapshot.cached_block_hashes,
            published_at=now() - (time.monotonic() - snapshot.published_at),  # when the engine was in this state
        ).to_wire()

    def stats(self) -> dict:
        """The engine's counters plus who answers (for `pagoda status`, metrics and tests)."""
        s = self.engine.stats()  # the snapshot's
        return {"replica": self.replica, **{k: getattr(s, k) for k in s.__dataclass_fields__}}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for ``pagoda.cluster.autoscaling.kv_aware_policy`` (Serve polls this)."""
        s = self.engine.stats()
        return {"kv_cache_usage": s.kv_cache_usage, "num_waiting": s.num_waiting, "num_running": s.num_running}

    def tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenizer(text).input_ids)

    def check_health(self) -> None:
        """Raises when the engine died or has work but completed no step for ``deployment.stall_timeout_s``."""
        check_engine_health(self.engine, self.config.deployment.stall_timeout_s, self.replica)

    def __del__(self) -> None:
        poller = getattr(self, "_poller", None)
        if poller is not None:
            poller.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _exit_replica(replica: str) -> None:
    """The engine is dead (a step failed: a lost TP rank, a device error): end this replica's process now.
    Alive, it would keep taking requests — answering each at once made it look idlest to the router — until
    three health checks failed. Gone, its callers get the actor's death, which ``PagodaClient`` retries on
    another replica for every request that had no token yet, the router drops it, and Serve replaces it."""
    logger.error("engine of %s is dead: exiting the replica so that Serve replaces it", replica)
    logging.shutdown()
    os._exit(1)


def _replica_name() -> str:
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.to_full_id_str()
    except (RuntimeError, RayServeException):  # constructed outside Serve (unit use; Ray 2.60 raises the latter)
        return "local"


def _limit_cpu_threads(config: AppConfig) -> None:
    """On CPU, one replica's torch uses only the CPUs Ray gave it (replicas share the host)."""
    if config.engine.model.device == "cuda":
        return
    import torch

    torch.set_num_threads(max(1, int(config.deployment.cpus_per_replica)))
