"""Continuous batching under a token budget, with the decisions a policy makes (engine/policy.py).

Each step spends at most ``max_num_batched_tokens`` tokens on at most ``max_running`` running
requests (``StepLimits``: the configured ``max_num_seqs``, or what the SLO controller sets when
latency targets are given, engine/slo.py), in this order:

0. when the policy lets the head of the queue outrank running requests (``priority``, ``fair``) and
   it finds no seat or no KV blocks, the policy's victims are preempted to make room for it;
1. running requests that decode (one token each),
2. running requests that continue a chunked prefill,
3. waiting requests, in policy order, with prefix-cache hits skipped over.

Prompt tokens (2 and 3) also stay within the step's ``prefill_budget``, and a step the SLO controller
keeps decode-only (``StepLimits.prefill`` False) takes none while any running request decodes. When the KV pool cannot grow
a running request, the policy picks a victim among the running requests not yet scheduled this
step and the request itself (blocks freed, recomputed later). Admission stops for the step once a
running request was preempted for lack of blocks, and a request preempted in a step is never
readmitted in the same step.

Steps and their results are booked in a ``StepLedger`` (engine/step_ledger.py), which is what lets
the engine schedule step n+1 while step n still runs (``SchedulerConfig.async_scheduling``).

The scheduler owns the KV cache manager: every block a request holds is granted here and
returned here (finish, abort, preemption), which ``check_invariants`` lets tests verify.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pagoda.engine.config import SchedulerConfig
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.policy import VictimCost, make_policy
from pagoda.engine.request import Request, RequestStatus
from pagoda.engine.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput
from pagoda.engine.slo import SloController, StepLimits
from pagoda.engine.step_ledger import StepLedger


@dataclass
class _Step:
    """The step being planned."""

    budget: int  # tokens left
    prefill_budget: int  # prompt tokens left
    plan: dict[str, int] = field(default_factory=dict)  # req_id -> tokens, in batch order
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)  # not readmitted this step
    short_of_blocks: bool = False  # a running request was preempted to grow: admit nobody

    def spend(self, req_id: str, num_tokens: int, prompt: bool) -> None:
        self.plan[req_id] = num_tokens
        self.budget -= num_tokens
        if prompt:
            self.prefill_budget -= num_tokens


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = make_policy(config)
        self.slo = SloController.from_config(config)  # None without latency targets
        self.limits = StepLimits(config.max_num_seqs, config.max_num_batched_tokens)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.ledger = StepLedger()
        self._cost = VictimCost(freed_blocks=lambda r: self.kv.num_freeable_blocks(r.request_id))
        self._clock = clock  # request arrival times are on this clock (the SLO controller's queue wait)
        self.step_count = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ requests in and out
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._enqueue(request)

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """End a request (stop string, abort): blocks return to the pool, runners drop it."""
        request = self.requests.pop(request_id, None)
        if request is None or request.is_finished:
            return
        if request in self.running:
            self.running.remove(request)
            self.ledger.drop(request_id)
        else:
            self.waiting.remove(request)
        self.kv.free(request_id, protect=self.policy.protects_cache(request))
        self.policy.removed(request)
        request.status = status

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ------------------------------------------------------------------ one step
    def schedule(self) -> SchedulerOutput:
        self.step_count += 1
        self.limits = self._step_limits()
        step = _Step(self.config.max_num_batched_tokens, self._prefill_budget())
        if self.waiting and self.policy.preempts_to_admit:
            self._make_room_for(self.policy.first(self.waiting, self.step_count), step)
        decodes, prefills = self._running_in_order()
        self._schedule_running(decodes, step)
        self._schedule_running(prefills, step)
        if self.waiting and len(self.running) < self.limits.max_running and not step.short_of_blocks:
            # Keys are fixed within a step: one sort, and only when someone can get in (queues run to thousands).
            self._admit(self.policy.admission_order(self.waiting, self.step_count), step)
        for req_id, num_tokens in step.plan.items():
            self.policy.charged(self.requests[req_id], num_tokens)
        self.ledger.commit(step.plan, self.requests)
        return SchedulerOutput(step.new_reqs, step.cached_reqs, step.plan, sum(step.plan.values()),
                               self.ledger.take_dropped())

    def step_done(self, scheduled: SchedulerOutput, seconds: float, device_seconds: float | None = None) -> None:
        """A step's result arrived ``seconds`` after it started running, and it ran ``device_seconds`` on a
        GPU (None: not measured); the SLO controller's measurements."""
        if self.slo is not None and not scheduled.is_empty:
            decodes = sum(1 for n in scheduled.num_scheduled_tokens.values() if n == 1)
            self.slo.observe(seconds, decodes, scheduled.total_num_scheduled_tokens - decodes, device_seconds)

    def _step_limits(self) -> StepLimits:
        if self.slo is None:
            return self.limits
        oldest = min((r.arrival_time for r in self.waiting), default=None)
        return self.slo.limits(0.0 if oldest is None else max(0.0, self._clock() - oldest))

    def _prefill_budget(self) -> int:
        """The limits' prompt tokens; none on the SLO controller's decode-only steps, unless nothing would decode."""
        if self.limits.prefill or not any(_num_unscheduled(r) == 1 for r in self.running):
            return self.limits.prefill_budget
        return 0

    def _running_in_order(self) -> tuple[list[Request], list[Request]]:
        """Decodes, then chunked-prefill continuations; each group in policy order."""
        ordered = self.policy.running_order(self.running)
        return [r for r in ordered if _num_unscheduled(r) == 1], [r for r in ordered if _num_unscheduled(r) > 1]

    def _schedule_running(self, requests: list[Request], step: _Step) -> None:
        for request in requests:
            if step.budget == 0:
                return
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step
            if request.ends_with_pending_outputs(self.max_model_len):
                continue  # its last token is being sampled
            prompt = _num_unscheduled(request) > 1
            num_new = self._num_new_tokens(request, step, request.num_computed_tokens, prompt)
            if num_new == 0 or not self._make_room(request, num_new, step):
                continue
            new_block_ids = self.kv.append(
                request.request_id, request.all_token_ids, num_new, request.num_pending_outputs
            )
            step.cached_reqs.append(CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens))
            step.spend(request.request_id, num_new, prompt)

    def _num_new_tokens(self, request: Request, step: _Step, num_computed: int, prompt: bool = True) -> int:
        remaining = request.num_tokens + request.num_pending_outputs - num_computed
        budget = min(step.budget, step.prefill_budget) if prompt else step.budget
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0  # the whole prompt must fit in one step
        return max(0, min(remaining, budget))

    def _make_room(self, request: Request, num_new: int, step: _Step) -> bool:
        """Preempt the policy's victims until running ``request`` can grow; False if it was preempted itself."""
        while not self.kv.can_append(request.request_id, num_new):
            others = [r for r in self.running if r.request_id not in step.plan and r is not request]
            need = self.kv.append_shortage(request.request_id, num_new)
            victim = self.policy.growth_victim(request, others, need, self._cost)
            self._preempt(victim, step)
            step.short_of_blocks = True
            if victim is request:
                return False
        return True

    def _make_room_for(self, head: Request, step: _Step) -> None:
        """Preempt running requests the policy lets ``head`` (first in admission order) displace, until it
        has a seat and its blocks beside the blocks this step's decodes take. One head per step: seats and
        blocks for later ones are not reserved, so a burst of important requests gets in one per step while
        the batch is full."""
        if head.num_pending_outputs:
            return
        while True:
            hit = self.kv.get_prefix_hit(head.all_token_ids, head.extra_keys)  # again: a victim's blocks may be in it
            num_new = self._num_new_tokens(head, step, hit.num_tokens)
            growth = sum(self.kv.blocks_to_append(r.request_id, 1) for r in self.running if _num_unscheduled(r) == 1)
            need = self.kv.allocate_shortage(hit, num_new, reserve=growth)
            if num_new == 0 or (need == 0 and len(self.running) < self.limits.max_running):
                return
            victim = self.policy.admission_victim(head, self.running, need, self._cost, self.step_count)
            if victim is None:
                return
            self._preempt(victim, step)

    def _preempt(self, request: Request, step: _Step) -> None:
        self.kv.free(request.request_id, protect=self.policy.protects_cache(request))
        self.running.remove(request)
        self.ledger.drop(request.request_id)
        step.preempted.add(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _admit(self, queue: list[Request], step: _Step) -> None:
        """Admit from ``queue`` (the waiting requests in policy order) while seats, budget and blocks last."""
        admitted: set[str] = set()
        for request in queue:
            if step.budget == 0 or step.prefill_budget == 0 or len(self.running) >= self.limits.max_running:
                break
            if request.request_id in step.preempted:
                continue
            if request.num_pending_outputs:
                break  # preempted while its last step ran: readmitted once that step's token is known
            hit = self.kv.get_prefix_hit(request.all_token_ids, request.extra_keys)
            num_new = self._num_new_tokens(request, step, hit.num_tokens)
            if num_new == 0 or not self.kv.can_allocate(hit, num_new):
                if self.policy.head_blocks(request):
                    break  # keep policy order: nobody overtakes the head of the queue
                continue
            self._start(request, hit, num_new, step)
            admitted.add(request.request_id)
        if admitted:
            self.waiting = [r for r in self.waiting if r.request_id not in admitted]

    def _start(self, request: Request, hit, num_new: int, step: _Step) -> None:
        tokens = request.all_token_ids
        block_ids = self.kv.allocate(request.request_id, tokens, hit, num_new, request.extra_keys)
        self.policy.admitted(request, self.step_count)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = hit.num_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = hit.num_tokens
        step.new_reqs.append(
            NewRequestData(  # a snapshot: the request's own list keeps growing
                request.request_id, list(tokens), request.num_prompt_tokens, request.sampling_params,
                block_ids, hit.num_tokens, request.mm,
            )
        )
        step.spend(request.request_id, num_new, prompt=True)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.PREEMPTED if request.num_preemptions else RequestStatus.WAITING
        self.waiting.append(request)
        self.policy.enqueued(request, self.step_count)

    # ------------------------------------------------------------------ results of a step
    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Append the sampled tokens of the oldest step not yet updated (``scheduled``), apply
        token-level stops.

        Returns the requests that got new tokens (finished ones included, with their final status).
        A request preempted after this step was scheduled still gets its token (it is waiting now).
        """
        step_requests = self.ledger.settle(scheduled)
        sampled = dict(zip(result.req_ids, zip(result.sampled_token_ids, result.logprobs)))
        updated: list[Request] = []
        for req_id, request in step_requests.items():
            if self.requests.get(req_id) is not request:
                continue  # finished or aborted while the step ran
            token_ids, logprobs = sampled.get(req_id, ([], None))
            if token_ids:
                self.ledger.take_sampled(request)
            for token_id in token_ids:
                request.append_output_token(token_id, logprobs)
                status = request.check_token_stop(self.max_model_len)
                if status is not None:
                    self.finish_request(req_id, status)
                    break
            if token_ids:
                updated.append(request)
        return updated


def _num_unscheduled(request: Request) -> int:
    """Tokens (known or pending) whose KV no scheduled step computes yet."""
    return request.num_tokens + request.num_pending_outputs - request.num_computed_tokens
