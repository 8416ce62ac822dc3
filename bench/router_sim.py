"""Discrete-event simulation of N engine replicas behind a router, for comparing routing policies.

Each simulated replica runs pagoda's *real* ``Scheduler`` and ``KVCacheManager`` (continuous
batching, chunked prefill, prefix caching, preemption by recompute) on synthetic token ids; only
the forward pass is replaced by a step-time model. Routers:

- ``round_robin``;
- ``pow2``: Ray Serve's default — two random replicas, the one with fewer ongoing requests. It is
  given exact, instant queue lengths (its best case: no probe latency, no stale cache);
- ``pagoda``: ``pagoda.cluster.routing_policy.rank`` — the same function the Serve router calls — over
  stats each replica publishes every ``stats_period_s`` (prefix summary included) blended with an
  ``InFlightLedger`` of the router's own requests, as in ``pagoda.cluster.router``.

Events: request arrivals, step completions, stats publications. A replica steps back to back
while it has work; a step's tokens appear when the step ends.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from pagoda.cluster.config import RouterWeights
from pagoda.cluster.inflight import InFlightLedger
from pagoda.cluster.routing_policy import EngineLimits, ReplicaView, RoutingRequest, rank
from pagoda.cluster.routing_stats import ReplicaStats
from pagoda.engine.config import SchedulerConfig
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.request import Request
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

_OUTPUT_TOKEN = 7  # every simulated sampled token (no EOS: requests run to max_tokens)


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_s: float
    token_ids: list[int]
    max_tokens: int
    kind: str  # workload class, for per-class reporting


@dataclass(frozen=True)
class StepTimeModel:
    """Seconds per engine step: fixed + per scheduled token + per running sequence + per context token read."""

    base_s: float = 0.006
    per_token_s: float = 0.00006  # ~16k prefill tokens/s
    per_seq_s: float = 0.0001
    per_context_token_s: float = 2e-8  # attention reads the whole context of every scheduled request

    def step_s(self, scheduled: SchedulerOutput, context_tokens: int) -> float:
        return (self.base_s + self.per_token_s * scheduled.total_num_scheduled_tokens
                + self.per_seq_s * len(scheduled.num_scheduled_tokens) + self.per_context_token_s * context_tokens)


@dataclass(frozen=True)
class ReplicaSpec:
    num_blocks: int = 2048
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 16384
    prefix_summary_blocks: int = 4096


class SimReplica:
    def __init__(self, replica_id: str, spec: ReplicaSpec, model: StepTimeModel) -> None:
        self.replica_id = replica_id
        self.spec = spec
        self.model = model
        self.kv = KVCacheManager(spec.num_blocks, spec.block_size)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens),
            self.kv, spec.max_model_len,
        )
        self.busy = False
        self.unprefilled: dict[str, int] = {}  # request id -> uncached prompt tokens until its first token

    def add(self, req: SimRequest, now: float) -> None:
        params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
        self.unprefilled[req.request_id] = len(req.token_ids) - self.kv.get_prefix_hit(req.token_ids).num_tokens
        self.scheduler.add_request(Request(req.request_id, list(req.token_ids), params, (), arrival_time=now))

    def step(self) -> tuple[float, SchedulerOutput, ModelRunnerOutput]:
        """Plan one step; returns its duration and what to apply when it ends."""
        scheduled = self.scheduler.schedule()
        ids, sampled, context = [], [], 0
        for req_id in scheduled.num_scheduled_tokens:
            request = self.scheduler.requests[req_id]
            context += request.num_computed_tokens  # schedule() counted this step's tokens as computed
            ids.append(req_id)
            reaches_end = request.num_computed_tokens + 1 == request.num_tokens + request.num_pending_outputs
            sampled.append([_OUTPUT_TOKEN] if reaches_end else [])
        return self.model.step_s(scheduled, context), scheduled, ModelRunnerOutput(ids, sampled, [None] * len(ids))

    def finish_step(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> tuple[list[str], list[str]]:
        """Apply a step's tokens; returns (requests that got their first token, requests that finished)."""
        updated = self.scheduler.update_from_output(scheduled, result)
        first = [r.request_id for r in updated if r.request_id in self.unprefilled]
        for rid in first:
            self.unprefilled.pop(rid, None)
        return first, [r.request_id for r in updated if r.is_finished]

    def stats(self, now: float) -> ReplicaStats:
        s = self.spec
        return ReplicaStats(
            self.scheduler.num_running, self.scheduler.num_waiting, self.kv.usage(), s.num_blocks, s.block_size,
            s.max_num_seqs, s.max_num_batched_tokens, sum(self.unprefilled.values()), self.scheduler.num_preemptions,
            frozenset(self.kv.cached_block_hashes(s.prefix_summary_blocks)), published_at=now,
        )

    @property
    def ongoing(self) -> int:
        return self.scheduler.num_running + self.scheduler.num_waiting


# ---- routers ---------------------------------------------------------------------------------------


class RoundRobin:
    name = "round_robin"

    def __init__(self, replicas: list[SimReplica], rng: random.Random) -> None:
        self._next = itertools.cycle(range(len(replicas)))
        self.replicas = replicas

    def route(self, req: SimRequest, now: float) -> SimReplica:
        return self.replicas[next(self._next)]

    def on_stats(self, replica: SimReplica, stats: ReplicaStats) -> None:
        pass

    def on_finished(self, request_id: str) -> None:
        pass


class PowerOfTwo(RoundRobin):
    name = "pow2"

    def __init__(self, replicas: list[SimReplica], rng: random.Random) -> None:
        super().__init__(replicas, rng)
        self.rng = rng

    def route(self, req: SimRequest, now: float) -> SimReplica:
        a, b = self.rng.sample(self.replicas, 2) if len(self.replicas) > 1 else (self.replicas[0],) * 2
        return a if a.ongoing <= b.ongoing else b


class Pagoda(RoundRobin):
    name = "pagoda"

    def __init__(self, replicas: list[SimReplica], rng: random.Random, weights: RouterWeights | None = None,
                 clock=None) -> None:
        super().__init__(replicas, rng)
        self.rng = rng
        self.weights = weights or RouterWeights()
        spec = replicas[0].spec
        self.limits = EngineLimits(spec.max_num_seqs, spec.max_num_batched_tokens, spec.block_size)
        self.clock = clock
        self.ledger = InFlightLedger(clock=lambda: self.clock.now)
        self.stats: dict[str, ReplicaStats] = {}
        self.by_id = {r.replica_id: r for r in replicas}

    def route(self, req: SimRequest, now: float) -> SimReplica:
        request = RoutingRequest.from_token_ids(req.token_ids, self.limits.block_size)
        order = list(self.by_id)
        self.rng.shuffle(order)
        views = []
        for rid in order:
            stats = self.stats.get(rid)
            views.append(ReplicaView(rid, stats, self.ledger.view(rid, stats.published_at if stats else None)))
        best = rank(request, views, self.weights, self.limits)[0]
        self.ledger.assign(req.request_id, best.replica_id, best.new_tokens, best.new_blocks,
                           request.block_hashes)
        self.ledger.confirm(req.request_id, best.replica_id)
        return self.by_id[best.replica_id]

    def on_stats(self, replica: SimReplica, stats: ReplicaStats) -> None:
        self.stats[replica.replica_id] = stats

    def on_finished(self, request_id: str) -> None:
        self.ledger.complete(request_id)


ROUTERS = {"pagoda": Pagoda, "pow2": PowerOfTwo, "round_robin": RoundRobin}


# ---- the event loop --------------------------------------------------------------------------------


@dataclass
class _Clock:
    now: float = 0.0


@dataclass
class SimResult:
    router: str
    ttft_s: dict[str, float] = field(default_factory=dict)  # request id -> time to first token
    latency_s: dict[str, float] = field(default_factory=dict)  # request id -> time to last token
    served_by: dict[str, str] = field(default_factory=dict)
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    end_s: float = 0.0


def simulate(workload: list[SimRequest], router: str, num_replicas: int = 4, spec: ReplicaSpec = ReplicaSpec(),
             model: StepTimeModel = StepTimeModel(), stats_period_s: float = 0.5, seed: int = 0,
             weights: RouterWeights | None = None) -> SimResult:
    rng = random.Random(seed)
    clock = _Clock()
    replicas = [SimReplica(f"replica-{i}", spec, model) for i in range(num_replicas)]
    kwargs = {"weights": weights, "clock": clock} if router == "pagoda" else {}
    policy = ROUTERS[router](replicas, rng, **kwargs)
    result = SimResult(router)
    arrivals = {r.request_id: r for r in workload}
    events: list = []
    seq = itertools.count()

    def push(t: float, kind: str, payload) -> None:
        heapq.heappush(events, (t, next(seq), kind, payload))

    def start_step(replica: SimReplica, now: float) -> None:
        if replica.busy or not replica.scheduler.has_unfinished_requests():
            return
        duration, scheduled, output = replica.step()
        replica.busy = True
        push(now + duration, "step", (replica, scheduled, output))

    for req in workload:
        push(req.arrival_s, "arrive", req)
    for i, replica in enumerate(replicas):  # staggered, like independent replicas
        push(stats_period_s * (i + 1) / num_replicas, "stats", replica)
    remaining = len(workload)
    while events and remaining:
        now, _, kind, payload = heapq.heappop(events)
        clock.now = now
        if kind == "arrive":
            replica = policy.route(payload, now)
            result.served_by[payload.request_id] = replica.replica_id
            replica.add(payload, now)
            start_step(replica, now)
        elif kind == "step":
            replica, scheduled, output = payload
            replica.busy = False
            first, finished = replica.finish_step(scheduled, output)
            for rid in first:
                result.ttft_s.setdefault(rid, now - arrivals[rid].arrival_s)
            for rid in finished:
                result.latency_s[rid] = now - arrivals[rid].arrival_s
                policy.on_finished(rid)
                remaining -= 1
            start_step(replica, now)
        else:  # stats
            policy.on_stats(payload, payload.stats(now))
            push(now + stats_period_s, "stats", payload)
    result.end_s = clock.now
    for replica in replicas:  # every request finished: the pools must be whole again
        replica.kv.check_invariants()
        assert replica.kv.usage() == 0 and not replica.scheduler.has_unfinished_requests(), replica.replica_id
    result.preemptions = sum(r.scheduler.num_preemptions for r in replicas)
    queries_hits = [r.kv.prefix_cache_stats for r in replicas]
    result.prompt_tokens = sum(q for q, _ in queries_hits)
    result.prefix_hit_tokens = sum(h for _, h in queries_hits)
    return result
