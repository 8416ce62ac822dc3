"""A scheduler with a real KV manager and a fake model: enough to test batching, preemption and
policies in pure Python, fast. ``async_depth=1`` applies each step's result only after the next
step was scheduled, as the engine does with async scheduling."""

from __future__ import annotations

import itertools
from collections import deque

from pagoda.engine.config import SchedulerConfig
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.request import Request
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

EOS = 0


def fake_token(request: Request, index: int) -> int:
    """Deterministic 'model': output ``index`` of a request depends only on its prompt (never EOS),
    so results do not depend on when they are applied."""
    return 1 + (sum(request.prompt_token_ids) * 31 + index) % 97


class Harness:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, async_depth: int = 0,
                 **sched) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=sched.pop("prefix", True))
        self.scheduler = Scheduler(SchedulerConfig(**sched), self.kv, max_model_len)
        self._ids = itertools.count()
        self.outputs: list[SchedulerOutput] = []
        self.async_depth = async_depth
        self._in_flight: deque[tuple[SchedulerOutput, ModelRunnerOutput]] = deque()

    def add(self, prompt_len: int = 8, max_tokens: int = 4, priority: int = 0, prompt: list[int] | None = None,
            arrival: float | None = None, tenant: str | None = None) -> Request:
        rid = f"r{next(self._ids)}"
        tokens = prompt if prompt is not None else [1 + (i * 7 + len(rid)) % 50 for i in range(prompt_len)]
        request = Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0.0), (EOS,),
                          arrival_time=float(next(self._ids)) if arrival is None else arrival, priority=priority,
                          tenant=tenant)
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        requests = self.scheduler.requests
        pending_before = {req_id: r.num_pending_outputs for req_id, r in requests.items()}
        scheduled = self.scheduler.schedule()
        self.outputs.append(scheduled)
        req_ids, tokens = [], []
        for req_id in scheduled.num_scheduled_tokens:
            request = requests[req_id]
            pending = request.num_pending_outputs
            # this step samples iff the schedule added a pending output (the chunk reaches the end; a
            # chunk that stops one token short leaves the same counts, so they cannot tell)
            reaches_end = pending > pending_before.get(req_id, 0)
            req_ids.append(req_id)
            tokens.append([fake_token(request, request.num_output_tokens + pending - 1)] if reaches_end else [])
        self._in_flight.append((scheduled, ModelRunnerOutput(req_ids, tokens, [None] * len(req_ids))))
        keep = self.async_depth if not scheduled.is_empty else 0
        while len(self._in_flight) > keep:
            self.scheduler.update_from_output(*self._in_flight.popleft())
        self.kv.check_invariants()
        return scheduled

    def run_until_done(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.scheduler.has_unfinished_requests() or self._in_flight:
            self.step()
            steps += 1
            assert steps < max_steps, "scheduler made no progress"
        return steps
