"""What scheduled steps owe their requests, until their results come back (async scheduling).

A step's tokens count as computed once it is scheduled (``num_computed_tokens`` advances at
``commit``), and a row that reaches the end of its known tokens adds one pending output
(``num_pending_outputs``) until ``settle`` hands its result back. That is what lets the engine
schedule step n+1 while step n still runs: a decode is scheduled on its pending token, whose id only
the ranks know yet. Results must come back in scheduling order; each is applied to the Request
objects that were scheduled, so a request that finished, was aborted or whose id was reused in
between gets nothing.

The ledger also collects the ids runners must drop at the next step (finished, aborted,
preempted): their copies of those requests' tokens and block tables are stale.
"""

from __future__ import annotations

from collections import deque

from pagoda.engine.request import Request
from pagoda.engine.scheduler_output import SchedulerOutput


class StepLedger:
    def __init__(self) -> None:
        self._in_flight: deque[dict[str, Request]] = deque()  # per scheduled step, its requests, until settled
        self._dropped: set[str] = set()

    def commit(self, plan: dict[str, int], requests: dict[str, Request]) -> None:
        """A step that computes ``plan[req_id]`` tokens of each request is scheduled."""
        scheduled = {req_id: requests[req_id] for req_id in plan}
        for req_id, request in scheduled.items():
            request.num_computed_tokens += plan[req_id]
            if request.num_computed_tokens == request.num_tokens + request.num_pending_outputs:
                request.num_pending_outputs += 1  # the chunk reaches the end: this step samples a token
        self._in_flight.append(scheduled)

    def settle(self, scheduled: SchedulerOutput) -> dict[str, Request]:
        """The oldest unsettled step's requests, as they were scheduled; ``scheduled`` must be that step."""
        step_requests = self._in_flight.popleft()
        if list(step_requests) != list(scheduled.num_scheduled_tokens):
            raise ValueError("update_from_output must get the steps' results in the order they were scheduled")
        return step_requests

    def drop(self, request_id: str) -> None:
        self._dropped.add(request_id)

    def take_dropped(self) -> frozenset[str]:
        dropped, self._dropped = frozenset(self._dropped), set()
        return dropped

    @staticmethod
    def take_sampled(request: Request) -> None:
        """One pending output of ``request`` arrived."""
        if request.num_pending_outputs <= 0:  # a runner bug: this step's chunk did not reach the end
            raise ValueError(f"request {request.request_id!r} got a token from a step that samples none for it")
        request.num_pending_outputs -= 1
