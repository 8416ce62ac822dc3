"""Scheduler: token budget, decode-first order, chunked prefill, preemption, policies, no leaks."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.policy import FCFSPolicy, PriorityPolicy
from pagoda.engine.request import RequestStatus
from tests.unit.scheduler_harness import Harness


def _outputs_by_prompt(harness: Harness, requests) -> list[list[int]]:
    return [r.output_token_ids for r in requests]


def test_budget_and_seq_limits_hold_every_step():
    h = Harness(num_blocks=256, max_num_batched_tokens=24, max_num_seqs=3)
    for n in (5, 30, 7, 12, 40, 3):
        h.add(prompt_len=n, max_tokens=6)
    h.run_until_done()
    for out in h.outputs:
        assert out.total_num_scheduled_tokens <= 24
        assert len(out.num_scheduled_tokens) <= 3
        assert out.total_num_scheduled_tokens == sum(out.num_scheduled_tokens.values())


def test_decodes_are_scheduled_before_prefill_chunks():
    h = Harness(num_blocks=256, max_num_batched_tokens=16, max_num_seqs=8)
    decoders = [h.add(prompt_len=4, max_tokens=20) for _ in range(3)]
    h.step()  # the three prompts prefill together (12 tokens)
    h.add(prompt_len=100, max_tokens=2)  # a long prompt arrives
    out = h.step()
    first_three = list(out.num_scheduled_tokens)[:3]
    assert first_three == [d.request_id for d in decoders]
    assert all(out.num_scheduled_tokens[d.request_id] == 1 for d in decoders)
    assert out.total_num_scheduled_tokens == 16  # the rest of the budget went to the new prompt's first chunk


def test_chunked_prefill_splits_long_prompt_and_keeps_outputs():
    whole = Harness(num_blocks=256, max_num_batched_tokens=512)
    chunked = Harness(num_blocks=256, max_num_batched_tokens=32)
    a = whole.add(prompt_len=100, max_tokens=5)
    b = chunked.add(prompt_len=100, max_tokens=5)
    whole.run_until_done()
    chunked.run_until_done()
    assert [o.num_scheduled_tokens.get(b.request_id) for o in chunked.outputs[:4]] == [32, 32, 32, 4]
    assert a.output_token_ids == b.output_token_ids


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_step():
    h = Harness(num_blocks=256, max_num_batched_tokens=64, enable_chunked_prefill=False, prefix=False)
    h.add(prompt_len=40, max_tokens=3)
    h.add(prompt_len=40, max_tokens=3)
    out = h.step()
    assert list(out.num_scheduled_tokens.values()) == [40]


def test_preemption_by_recompute_keeps_outputs_and_frees_everything():
    def run(num_blocks):
        h = Harness(num_blocks=num_blocks, block_size=4, max_model_len=64, max_num_batched_tokens=64, prefix=False)
        reqs = [h.add(prompt_len=10 + 3 * i, max_tokens=12) for i in range(6)]
        h.run_until_done()
        return h, reqs

    roomy, reqs_a = run(256)
    tight, reqs_b = run(14)  # 56 tokens: not enough for all six at once
    assert tight.scheduler.num_preemptions > 0
    assert roomy.scheduler.num_preemptions == 0
    assert [r.output_token_ids for r in reqs_a] == [r.output_token_ids for r in reqs_b]
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs_b)
    assert tight.kv.usage() == 0 and tight.kv.num_free_blocks == 14


@pytest.mark.parametrize("num_blocks", [256, 14])
def test_async_scheduling_gives_the_same_outputs_in_fewer_waits(num_blocks):
    """One step in flight: every request gets the same tokens as with synchronous steps, a decode
    is scheduled on its pending token, no step runs past max_tokens, nothing leaks."""

    def run(async_depth):
        h = Harness(num_blocks=num_blocks, block_size=4, max_model_len=64, max_num_batched_tokens=64,
                    async_depth=async_depth)
        reqs = [h.add(prompt_len=10 + 3 * i, max_tokens=1 + 3 * i) for i in range(6)]
        h.run_until_done()
        return h, reqs

    sync, reqs_a = run(0)
    pipelined, reqs_b = run(1)
    assert [r.output_token_ids for r in reqs_a] == [r.output_token_ids for r in reqs_b]
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_pending_outputs == 0 for r in reqs_b)
    for r in reqs_b:  # tokens computed for a request: its prompt and all but its last output, never more
        assert sum(out.num_scheduled_tokens.get(r.request_id, 0) for out in pipelined.outputs) <= (
            r.num_tokens - 1 + r.num_preemptions * 64)
    assert pipelined.kv.usage() == 0 and pipelined.kv.num_free_blocks == num_blocks
    if num_blocks == 256:  # no preemption: exactly the tokens needed, and decodes overlap their previous step
        assert all(sum(o.num_scheduled_tokens.get(r.request_id, 0) for o in pipelined.outputs)
                   == r.num_tokens - 1 - r.num_cached_tokens for r in reqs_b)
        assert len(pipelined.outputs) <= len(sync.outputs) + 1


def test_preempted_request_is_sent_in_full_again():
    h = Harness(num_blocks=6, block_size=4, max_model_len=24, max_num_batched_tokens=64, prefix=False)
    reqs = {r.request_id: r for r in (h.add(prompt_len=8, max_tokens=12), h.add(prompt_len=8, max_tokens=12))}
    dropped, resent = set(), []
    while h.scheduler.has_unfinished_requests():
        out = h.step()
        dropped |= out.finished_req_ids
        for new in out.new_reqs:
            if len(new.token_ids) > new.num_prompt_tokens:  # it had generated tokens: a resumed request
                assert new.req_id in dropped, "runners must have been told to drop the preempted request first"
                assert new.token_ids[: new.num_prompt_tokens] == reqs[new.req_id].prompt_token_ids
                resent.append(new)
    assert h.scheduler.num_preemptions > 0
    assert resent, "a preempted request must come back as NewRequestData with its generated tokens"


def test_abort_returns_blocks_of_waiting_and_running_requests():
    h = Harness(num_blocks=32, max_num_seqs=1)
    running = h.add(prompt_len=10, max_tokens=50)
    waiting = h.add(prompt_len=10, max_tokens=50)
    h.step()
    assert running.status is RequestStatus.RUNNING and waiting.status is RequestStatus.WAITING
    h.scheduler.finish_request(running.request_id, RequestStatus.FINISHED_ABORTED)
    h.scheduler.finish_request(waiting.request_id, RequestStatus.FINISHED_ABORTED)
    h.kv.check_invariants()
    assert h.kv.usage() == 0
    assert running.request_id in h.scheduler.schedule().finished_req_ids


def test_fcfs_admits_in_arrival_order():
    h = Harness(num_blocks=64, max_num_seqs=1, policy="fcfs")
    reqs = [h.add(prompt_len=4, max_tokens=1, priority=p) for p in (5, 0, 3)]
    admitted = [next(iter(h.step().num_scheduled_tokens)) for _ in reqs]
    assert admitted == [r.request_id for r in reqs]


def test_priority_admits_lowest_value_first():
    h = Harness(num_blocks=64, max_num_seqs=1, policy="priority", aging_steps=1000)
    reqs = [h.add(prompt_len=4, max_tokens=1, priority=p) for p in (5, 0, 3)]
    admitted = [next(iter(h.step().num_scheduled_tokens)) for _ in reqs]
    assert admitted == [reqs[1].request_id, reqs[2].request_id, reqs[0].request_id]


def _steps_until_admitted(aging_steps: int, gap: int, backlog: int, horizon: int) -> int | None:
    """Constant high-priority load (one new request per step, one served per step) and one low one."""
    h = Harness(num_blocks=512, max_num_seqs=1, policy="priority", aging_steps=aging_steps)
    for _ in range(backlog):
        h.add(prompt_len=4, max_tokens=1, priority=0)
    low = h.add(prompt_len=4, max_tokens=1, priority=gap)
    for step in range(1, horizon + 1):
        h.add(prompt_len=4, max_tokens=1, priority=0)
        if low.request_id in h.step().num_scheduled_tokens:
            return step
    return None


def test_aging_bounds_the_wait_of_a_low_priority_request():
    aging_steps, gap, backlog = 5, 4, 3
    admitted_at = _steps_until_admitted(aging_steps, gap, backlog, horizon=500)
    bound = gap * aging_steps + backlog + 2
    assert admitted_at is not None and admitted_at <= bound, (admitted_at, bound)
    assert admitted_at > backlog, "priority must still put the high-priority backlog first"
    # without aging (huge aging_steps) the same request starves under the same load
    assert _steps_until_admitted(10**9, gap, backlog, horizon=200) is None


def test_policy_keys_are_pure_functions():
    class Fake:
        def __init__(self, priority, arrival_time):
            self.priority, self.arrival_time = priority, arrival_time

    assert FCFSPolicy().key(Fake(9, 1.0), 0) < FCFSPolicy().key(Fake(0, 2.0), 0)
    aging = PriorityPolicy(aging_steps=10)
    assert aging.key(Fake(0, 5.0), 0) < aging.key(Fake(2, 1.0), 0)
    assert aging.key(Fake(2, 1.0), 20) < aging.key(Fake(0, 5.0), 0)  # two levels earned by waiting 20 steps


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]), st.integers(1, 40),
                  st.integers(1, 12), st.integers(0, 3)),
        min_size=5, max_size=60,
    ),
    num_blocks=st.integers(12, 40),
    budget=st.integers(8, 64),
    max_seqs=st.integers(1, 6),
    policy=st.sampled_from(["fcfs", "priority"]),
    chunked=st.booleans(),
    prefix=st.booleans(),
)
@pytest.mark.parametrize("async_depth", [0, 1])
def test_random_traffic_keeps_invariants_and_leaks_nothing(ops, num_blocks, budget, max_seqs, policy, chunked, prefix,
                                                           async_depth):
    max_model_len = min(48, num_blocks * 4)
    h = Harness(num_blocks=num_blocks, block_size=4, max_model_len=max_model_len, max_num_batched_tokens=max(budget, 48 if not chunked else 1),
                max_num_seqs=max_seqs, policy=policy, aging_steps=3, enable_chunked_prefill=chunked, prefix=prefix,
                async_depth=async_depth)
    rng = random.Random(len(ops))
    shared_prefix = [3] * 16
    live = []
    for op, length, max_tokens, priority in ops:
        if op == "add":
            prompt_len = min(length, max_model_len - max_tokens)
            prompt = (shared_prefix + [rng.randrange(1, 50) for _ in range(prompt_len)])[:prompt_len] if prompt_len > 0 else [1]
            live.append(h.add(prompt=prompt, max_tokens=max(1, min(max_tokens, max_model_len - len(prompt))), priority=priority))
        elif op == "abort" and live:
            victim = live.pop(rng.randrange(len(live)))
            h.scheduler.finish_request(victim.request_id, RequestStatus.FINISHED_ABORTED)
            h.kv.check_invariants()
        else:
            out = h.step()
            assert out.total_num_scheduled_tokens <= h.scheduler.config.max_num_batched_tokens
            assert len(h.scheduler.running) <= max_seqs
            for r in h.scheduler.running:
                assert h.kv.num_tokens(r.request_id) >= r.num_computed_tokens
    h.run_until_done()
    h.kv.check_invariants()
    assert h.kv.usage() == 0
    assert h.kv.num_free_blocks == num_blocks
