"""Continuous batching under a token budget.

Each step spends at most ``max_num_batched_tokens`` tokens on at most ``max_num_seqs`` running
requests, in this order:

1. running requests that decode (one token each),
2. running requests that continue a chunked prefill,
3. waiting requests, in policy order, with prefix-cache hits skipped over.

When the KV pool cannot grow a running request, the lowest-ranked running request that has not
been scheduled this step is preempted (blocks freed, recomputed later); if there is none, the
request itself is. Admission stops for the step once anything was preempted, so a request is
never preempted and readmitted in the same step.

A step's tokens count as computed once it is scheduled (``num_computed_tokens`` advances in
``schedule``), and a row that reaches the end of its known tokens adds one pending output until
``update_from_output`` delivers the sampled id. That is what lets the engine schedule step n+1
while step n still runs (``SchedulerConfig.async_scheduling``): a decode is scheduled on its
pending token, whose id only the ranks know yet. Results must come back in scheduling order;
each is applied to the Request objects that were scheduled, so a request that finished, was
aborted or whose id was reused in between gets nothing.

The scheduler owns the KV cache manager: every block a request holds is granted here and
returned here (finish, abort, preemption), which ``check_invariants`` lets tests verify.
"""

from __future__ import annotations

from collections import deque

from pagoda.engine.config import SchedulerConfig
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.policy import make_policy
from pagoda.engine.request import Request, RequestStatus
from pagoda.engine.scheduler_output import CachedRequestData, ModelRunnerOutput, NewRequestData, SchedulerOutput


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self.policy = make_policy(config.policy, config.aging_steps)
        self.requests: dict[str, Request] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._enqueued_at: dict[str, int] = {}  # step at which a waiting request (re)entered the queue
        self._dropped: set[str] = set()  # runners must drop these at the next step
        self._in_flight: deque[dict[str, Request]] = deque()  # per scheduled step, its requests, until its result
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
            self._dropped.add(request_id)
        else:
            self.waiting.remove(request)
            self._enqueued_at.pop(request_id, None)
        self.kv.free(request_id)
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
        budget = self.config.max_num_batched_tokens
        plan: dict[str, int] = {}
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preemptions_before = self.num_preemptions

        for request in self._running_in_order():
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            if request.ends_with_pending_outputs(self.max_model_len):
                continue  # its last token is being sampled
            num_new = self._num_new_tokens(request, budget, request.num_computed_tokens)
            if num_new == 0:
                continue
            if not self._make_room(request, num_new, plan):
                continue
            new_block_ids = self.kv.append(
                request.request_id, request.all_token_ids, num_new, request.num_pending_outputs
            )
            cached_reqs.append(CachedRequestData(request.request_id, new_block_ids, request.num_computed_tokens))
            plan[request.request_id] = num_new
            budget -= num_new

        if self.num_preemptions == preemptions_before:
            budget = self._admit_waiting(budget, plan, new_reqs)

        scheduled = {req_id: self.requests[req_id] for req_id in plan}
        for request in scheduled.values():
            request.num_computed_tokens += plan[request.request_id]
            if request.num_computed_tokens == request.num_tokens + request.num_pending_outputs:
                request.num_pending_outputs += 1  # the chunk reaches the end: this step samples a token
        self._in_flight.append(scheduled)
        dropped, self._dropped = frozenset(self._dropped), set()
        return SchedulerOutput(new_reqs, cached_reqs, plan, sum(plan.values()), dropped)

    def _running_in_order(self) -> list[Request]:
        """Decodes first, then chunked-prefill continuations; each group in policy order."""
        ordered = sorted(self.running, key=lambda r: self.policy.key(r, 0))
        decodes = [r for r in ordered if _num_unscheduled(r) == 1]
        prefills = [r for r in ordered if _num_unscheduled(r) > 1]
        return decodes + prefills

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int) -> int:
        remaining = request.num_tokens + request.num_pending_outputs - num_computed
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0  # the whole prompt must fit in one step
        return min(remaining, budget)

    def _make_room(self, request: Request, num_new: int, plan: dict[str, int]) -> bool:
        """Preempt lower-ranked running requests until ``request`` can grow; False if it was preempted itself."""
        while not self.kv.can_append(request.request_id, num_new):
            victims = [r for r in self.running if r.request_id not in plan and r is not request]
            victim = max(victims, key=lambda r: self.policy.key(r, 0), default=request)
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv.free(request.request_id)
        self.running.remove(request)
        self._dropped.add(request.request_id)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._enqueue(request)

    def _admit_waiting(self, budget: int, plan: dict[str, int], new_reqs: list[NewRequestData]) -> int:
        if not self.waiting or budget == 0 or len(self.running) >= self.config.max_num_seqs:
            return budget
        # Keys are fixed within a step: one sort instead of a min() per admission (queues run to thousands).
        admitted: set[str] = set()
        for request in sorted(self.waiting, key=self._waiting_key):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if request.num_pending_outputs:
                break  # preempted while its last step ran: readmitted once that step's token is known
            tokens = request.all_token_ids
            hit = self.kv.get_prefix_hit(tokens, request.extra_keys)
            num_new = self._num_new_tokens(request, budget, hit.num_tokens)
            if num_new == 0 or not self.kv.can_allocate(hit, num_new):
                break  # keep policy order: nobody overtakes the head of the queue
            block_ids = self.kv.allocate(request.request_id, tokens, hit, num_new, request.extra_keys)
            admitted.add(request.request_id)
            self._enqueued_at.pop(request.request_id, None)
            self.running.append(request)
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = hit.num_tokens
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = hit.num_tokens
            new_reqs.append(
                NewRequestData(  # a snapshot: the request's own list keeps growing
                    request.request_id, list(tokens), request.num_prompt_tokens, request.sampling_params,
                    block_ids, hit.num_tokens, request.mm,
                )
            )
            plan[request.request_id] = num_new
            budget -= num_new
        if admitted:
            self.waiting = [r for r in self.waiting if r.request_id not in admitted]
        return budget

    def _waiting_key(self, request: Request) -> tuple:
        return self.policy.key(request, self.step_count - self._enqueued_at[request.request_id])

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.PREEMPTED if request.num_preemptions else RequestStatus.WAITING
        self.waiting.append(request)
        self._enqueued_at.setdefault(request.request_id, self.step_count)

    # ------------------------------------------------------------------ results of a step
    def update_from_output(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Append the sampled tokens of the oldest step not yet updated (``scheduled``), apply
        token-level stops.

        Returns the requests that got new tokens (finished ones included, with their final status).
        A request preempted after this step was scheduled still gets its token (it is waiting now).
        """
        step_requests = self._in_flight.popleft()
        if list(step_requests) != list(scheduled.num_scheduled_tokens):
            raise ValueError("update_from_output must get the steps' results in the order they were scheduled")
        sampled = dict(zip(result.req_ids, zip(result.sampled_token_ids, result.logprobs)))
        updated: list[Request] = []
        for req_id, request in step_requests.items():
            if self.requests.get(req_id) is not request:
                continue  # finished or aborted while the step ran
            token_ids, logprobs = sampled.get(req_id, ([], None))
            if token_ids:
                if request.num_pending_outputs <= 0:  # a runner bug: this step's chunk did not reach the end
                    raise ValueError(f"request {req_id!r} got a token from a step that samples none for it")
                request.num_pending_outputs -= 1
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
