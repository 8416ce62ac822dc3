"""Scheduling policies: the four decisions ``Scheduler`` leaves to a policy object.

1. **Running order** — which running requests get the step's tokens first (``running_order``).
2. **Admission order** — which waiting request is admitted next (``admission_order``).
3. **Head of the queue** — when the next request in admission order cannot be admitted (no KV
   blocks, no seat, no budget), whether admission stops for the step or later ones may overtake it
   (``head_blocks``).
4. **Preemption victims** — whom to preempt when a running request cannot grow
   (``growth_victim``), and whether a waiting request may preempt running ones to get in
   (``admission_victim``).

Order is one sort key (``key``): smaller runs first and is preempted last. Policies:

- ``fcfs``: arrival order. Growth preemption takes the newest request; admission never preempts.
- ``priority``: lower ``priority`` first (vLLM convention), ties by arrival. Aging: a waiting request
  earns one level every ``aging_steps`` steps it waits, and keeps what it earned once admitted, so its
  rank never gets worse. A waiting request preempts running ones whose rank (priority minus earned
  levels) is worse than its own *base* priority when the batch is full (seats or KV blocks): waiting
  alone never buys the right to preempt, so aging cannot make requests preempt each other in turn.
  Victims: the worst rank first; within it, by cost (below). Requests of priority < 0 (more important
  than the default) have their prefix-cache blocks evicted last.
- ``fair``: weighted fair share between tenants by tokens served (start-time fair queuing over
  virtual time = tokens / weight): the tenant with the least weighted service goes first, and within
  a tenant ``priority``'s rules (order, aging, preemption). Priority does not cross tenants: a tenant
  cannot take another's share by marking its requests important. Only waiting tenants compete: a
  tenant whose queue was empty re-enters at the least virtual time of the tenants waiting (level with
  the most served when nobody waits), so neither idle time nor service got while nobody waited (an
  engine filling its free seats) is banked as credit or owed as debt. Growth preemption takes from the
  tenant furthest ahead.

Victim cost: a preempted request frees the blocks it alone holds and must recompute its computed
tokens. For a shortage of ``need`` blocks, the cheapest victim that frees enough on its own is
taken (fewest tokens to recompute); when none does, the one freeing the most blocks per recomputed
token. A shortage of seats (``need`` 0) takes the cheapest.

Policies keep per-request bookkeeping (steps waited, levels earned, tenants' service) through the
hooks ``enqueued``, ``admitted``, ``charged`` and ``removed``, which only ``Scheduler`` calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from pagoda.engine.config import SchedulerConfig


class Schedulable(Protocol):
    """What a policy reads of a request (``engine.request.Request`` has it all)."""

    request_id: str
    priority: int
    arrival_time: float
    tenant: str | None
    num_computed_tokens: int
    num_prompt_tokens: int


@dataclass(frozen=True)
class VictimCost:
    """How much preempting a request costs and gives: what ``Scheduler`` tells the policy."""

    freed_blocks: Callable[[Schedulable], int]  # blocks it holds alone (returned to the pool)

    @staticmethod
    def recompute_tokens(request: Schedulable) -> int:
        return request.num_computed_tokens


class SchedulingPolicy(ABC):
    """The four decisions, over a sort key. Subclasses define ``key`` and may override any decision."""

    name: str = ""
    preempts_to_admit: bool = False  # whether admission_victim can return anyone

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self._enqueued_at: dict[str, int] = {}  # step at which a waiting request (re)entered the queue
        self._waited: dict[str, int] = {}  # steps waited in earlier waits (a preempted request's past)

    @abstractmethod
    def key(self, request: Schedulable, waited_steps: int) -> tuple:
        """Sort key; smaller runs first. ``waited_steps``: steps the request has waited in all."""

    # ---- bookkeeping (called by Scheduler only)
    def enqueued(self, request: Schedulable, step: int) -> None:
        """``request`` joined the waiting queue (new, or preempted) at ``step``."""
        self._enqueued_at[request.request_id] = step

    def admitted(self, request: Schedulable, step: int) -> None:
        rid = request.request_id
        self._waited[rid] = self.waited_steps(request, step)
        self._enqueued_at.pop(rid, None)

    def charged(self, request: Schedulable, num_tokens: int) -> None:
        """The step being scheduled spends ``num_tokens`` on ``request``."""

    def removed(self, request: Schedulable) -> None:
        """``request`` finished or was aborted."""
        self._enqueued_at.pop(request.request_id, None)
        self._waited.pop(request.request_id, None)

    def waited_steps(self, request: Schedulable, step: int) -> int:
        rid = request.request_id
        since = self._enqueued_at.get(rid)
        return self._waited.get(rid, 0) + (step - since if since is not None else 0)

    # ---- 1. and 2.: order
    def running_order(self, running: Sequence[Schedulable]) -> list:
        return sorted(running, key=lambda r: self.key(r, self._waited.get(r.request_id, 0)))

    def admission_order(self, waiting: Sequence[Schedulable], step: int) -> list:
        return sorted(waiting, key=lambda r: self.key(r, self.waited_steps(r, step)))

    def first(self, waiting: Sequence[Schedulable], step: int) -> Schedulable:
        """``admission_order(waiting, step)[0]``, in linear time."""
        return min(waiting, key=lambda r: self.key(r, self.waited_steps(r, step)))

    # ---- 3.: the head of the queue
    def head_blocks(self, head: Schedulable) -> bool:
        """Whether a head that cannot be admitted stops admission for the step (True: nobody overtakes it,
        so large requests are not starved by small ones behind them)."""
        return True

    # ---- 4.: victims
    def growth_victim(self, grower: Schedulable, others: Sequence[Schedulable], need_blocks: int,
                      cost: VictimCost) -> Schedulable:
        """Whom to preempt so that running ``grower`` can take ``need_blocks`` more blocks: one of
        ``others`` (running, not yet scheduled this step) or ``grower`` itself."""
        return max([*others, grower], key=lambda r: self.key(r, self._waited.get(r.request_id, 0)))

    def admission_victim(self, head: Schedulable, running: Sequence[Schedulable], need_blocks: int,
                         cost: VictimCost, step: int) -> Schedulable | None:
        """Whom to preempt so that waiting ``head`` gets a seat and ``need_blocks`` blocks; None: nobody."""
        return None

    def protects_cache(self, request: Schedulable) -> bool:
        """Whether ``request``'s prefix-cache blocks are evicted only after everyone else's."""
        return False


class FCFSPolicy(SchedulingPolicy):
    """First come, first served: arrival time alone."""

    name = "fcfs"

    def __init__(self, config: SchedulerConfig | None = None) -> None:
        super().__init__(config)

    def key(self, request: Schedulable, waited_steps: int) -> tuple:
        return (request.arrival_time,)


class PriorityPolicy(SchedulingPolicy):
    """Lower ``priority`` first, ties by arrival, with aging; preempts for more important waiting requests."""

    name = "priority"
    preempts_to_admit = True

    def __init__(self, config: SchedulerConfig | None = None, aging_steps: int | None = None) -> None:
        super().__init__(config)
        self.aging_steps = aging_steps if aging_steps is not None else config.aging_steps

    def rank(self, request: Schedulable, waited_steps: int) -> int:
        """Priority minus the levels earned by waiting."""
        return request.priority - waited_steps // self.aging_steps

    def key(self, request: Schedulable, waited_steps: int) -> tuple:
        return (self.rank(request, waited_steps), request.arrival_time)

    def running_rank(self, request: Schedulable) -> int:
        return self.rank(request, self._waited.get(request.request_id, 0))

    def growth_victim(self, grower, others, need_blocks, cost):
        return self._cheapest_of_worst([*others, grower], need_blocks, cost)

    def admission_victim(self, head, running, need_blocks, cost, step):
        outranked = [r for r in running if self.running_rank(r) > head.priority]
        return self._cheapest_of_worst(outranked, need_blocks, cost) if outranked else None

    def protects_cache(self, request: Schedulable) -> bool:
        return request.priority < 0

    def _cheapest_of_worst(self, candidates: Sequence[Schedulable], need_blocks: int, cost: VictimCost) -> Schedulable:
        worst = max(self._victim_class(r) for r in candidates)
        pool = [r for r in candidates if self._victim_class(r) == worst]
        freed = {r.request_id: cost.freed_blocks(r) for r in pool}
        enough = [r for r in pool if freed[r.request_id] >= need_blocks]
        if enough:  # ties: the newest (it has waited least for its tokens)
            return min(enough, key=lambda r: (cost.recompute_tokens(r), -r.arrival_time))
        return max(pool, key=lambda r: (freed[r.request_id] / max(1, cost.recompute_tokens(r)), r.arrival_time))

    def _victim_class(self, request: Schedulable) -> tuple:
        return (self.running_rank(request),)


class FairSharePolicy(PriorityPolicy):
    """Weighted fair share between tenants (virtual time = tokens served / weight), ``priority`` within one."""

    name = "fair"

    def __init__(self, config: SchedulerConfig) -> None:
        super().__init__(config)
        self.weights = dict(config.tenant_weights)
        self.vtime: dict[str | None, float] = {}  # per tenant: tokens served / weight
        self._waiting: Counter[str | None] = Counter()  # per tenant: requests waiting

    def key(self, request: Schedulable, waited_steps: int) -> tuple:
        return (self.vtime.get(request.tenant, 0.0), self.rank(request, waited_steps), request.arrival_time)

    def weight(self, tenant: str | None) -> float:
        return self.weights.get(tenant, 1.0) if tenant is not None else 1.0

    def admission_order(self, waiting: Sequence[Schedulable], step: int) -> list:
        """Each tenant's queue in ``priority`` order, merged by virtual time as if each admission were charged
        its prompt now (so one step's admissions are shared out too, not all given to the tenant behind)."""
        queues: dict[str | None, list] = {}
        for r in super().admission_order(waiting, step):
            queues.setdefault(r.tenant, []).append(r)
        vtime = {t: self.vtime.get(t, 0.0) for t in queues}
        order, heads = [], {t: 0 for t in queues}
        while queues:
            tenant = min(queues, key=lambda t: vtime[t])
            request = queues[tenant][heads[tenant]]
            order.append(request)
            vtime[tenant] += request.num_prompt_tokens / self.weight(tenant)
            heads[tenant] += 1
            if heads[tenant] == len(queues[tenant]):
                del queues[tenant]
        return order

    def first(self, waiting: Sequence[Schedulable], step: int) -> Schedulable:
        tenant = min({r.tenant for r in waiting}, key=lambda t: self.vtime.get(t, 0.0))
        return PriorityPolicy.first(self, [r for r in waiting if r.tenant == tenant], step)

    def enqueued(self, request: Schedulable, step: int) -> None:
        if not self._waiting[request.tenant]:
            self._catch_up(request.tenant)
        self._waiting[request.tenant] += 1
        super().enqueued(request, step)

    def admitted(self, request: Schedulable, step: int) -> None:
        self._waiting[request.tenant] -= 1
        super().admitted(request, step)

    def charged(self, request: Schedulable, num_tokens: int) -> None:
        self.vtime[request.tenant] = self.vtime.get(request.tenant, 0.0) + num_tokens / self.weight(request.tenant)

    def removed(self, request: Schedulable) -> None:
        if request.request_id in self._enqueued_at:  # aborted while waiting
            self._waiting[request.tenant] -= 1
        super().removed(request)

    def admission_victim(self, head, running, need_blocks, cost, step):
        """Priority preempts within a tenant only: marking requests important never takes another's share."""
        return super().admission_victim(head, [r for r in running if r.tenant == head.tenant], need_blocks, cost, step)

    def _catch_up(self, tenant: str | None) -> None:
        """``tenant``'s queue was empty: it asked for no more than it got, so it starts level with the tenants that
        wait (the least of them: the one served next), or with the most served when nobody waits. Without this, a
        tenant that got fewer tokens while there was room for all (an engine filling 128 free seats from two
        streams gives both the same, i.e. the lighter-weight one 3x its share) is paid that back once seats run
        out: on an H100 the payback lasted seconds and skewed the share to 1:3.8."""
        waiting = [v for t, v in self.vtime.items() if self._waiting[t] and t != tenant]
        floor = min(waiting) if waiting else max(self.vtime.values(), default=0.0)
        self.vtime[tenant] = max(self.vtime.get(tenant, 0.0), floor)

    def _victim_class(self, request: Schedulable) -> tuple:
        return (self.vtime.get(request.tenant, 0.0), self.running_rank(request))


POLICIES: dict[str, Callable[[SchedulerConfig], SchedulingPolicy]] = {
    FCFSPolicy.name: FCFSPolicy,
    PriorityPolicy.name: PriorityPolicy,
    FairSharePolicy.name: FairSharePolicy,
}


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    return POLICIES[config.policy](config)
