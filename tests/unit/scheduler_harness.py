"""A scheduler with a real KV manager and a fake model: enough to test batching, preemption and
policies in pure Python, fast."""

from __future__ import annotations

import itertools

from engine.config import SchedulerConfig
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

EOS = 0


def fake_token(request: Request) -> int:
    """Deterministic 'model': the next token depends only on the tokens so far (never EOS)."""
    return 1 + (sum(request.all_token_ids) * 31 + request.num_tokens) % 97


class Harness:
    def __init__(self, num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256, **sched) -> None:
        self.kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=sched.pop("prefix", True))
        self.scheduler = Scheduler(SchedulerConfig(**sched), self.kv, max_model_len)
        self._ids = itertools.count()
        self.outputs: list[SchedulerOutput] = []

    def add(self, prompt_len: int = 8, max_tokens: int = 4, priority: int = 0, prompt: list[int] | None = None,
            arrival: float | None = None) -> Request:
        rid = f"r{next(self._ids)}"
        tokens = prompt if prompt is not None else [1 + (i * 7 + len(rid)) % 50 for i in range(prompt_len)]
        request = Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens, temperature=0.0), (EOS,),
                          arrival_time=float(next(self._ids)) if arrival is None else arrival, priority=priority)
        self.scheduler.add_request(request)
        return request

    def step(self) -> SchedulerOutput:
        scheduled = self.scheduler.schedule()
        self.outputs.append(scheduled)
        requests = self.scheduler.requests
        req_ids, tokens = [], []
        for req_id, n in scheduled.num_scheduled_tokens.items():
            request = requests[req_id]
            reaches_end = request.num_computed_tokens + n == request.num_tokens
            req_ids.append(req_id)
            tokens.append([fake_token(request)] if reaches_end else [])
        self.scheduler.update_from_output(scheduled, ModelRunnerOutput(req_ids, tokens, [None] * len(req_ids)))
        self.kv.check_invariants()
        return scheduled

    def run_until_done(self, max_steps: int = 10_000) -> int:
        steps = 0
        while self.scheduler.has_unfinished_requests():
            self.step()
            steps += 1
            assert steps < max_steps, "scheduler made no progress"
        return steps
