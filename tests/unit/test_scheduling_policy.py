"""Scheduling policies end to end in the scheduler: priority that preempts (for seats and for KV
blocks), victims by cost, aging, weighted fair share between tenants, and no starvation."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.config import SchedulerConfig
from pagoda.engine.policy import POLICIES, FairSharePolicy, PriorityPolicy, VictimCost, make_policy
from pagoda.engine.request import RequestStatus
from tests.unit.scheduler_harness import Harness

HIGH, LOW = -1, 1


def _running_ids(h: Harness) -> set[str]:
    return {r.request_id for r in h.scheduler.running}


def test_registry_is_what_the_config_accepts():
    for name in POLICIES:
        assert make_policy(SchedulerConfig(policy=name)).name == name
    with pytest.raises(ValueError, match=r"policy must be one of \('fcfs', 'priority', 'fair'\), got 'lifo'"):
        SchedulerConfig(policy="lifo")


def test_high_priority_preempts_when_every_seat_is_taken():
    h = Harness(num_blocks=256, max_num_seqs=2, policy="priority")
    lows = [h.add(prompt_len=8, max_tokens=40, priority=LOW) for _ in range(2)]
    for _ in range(3):
        h.step()
    assert _running_ids(h) == {r.request_id for r in lows}
    high = h.add(prompt_len=8, max_tokens=4, priority=HIGH)
    out = h.step()
    assert high.request_id in out.num_scheduled_tokens, "admitted in the very next step"
    assert h.scheduler.num_preemptions == 1
    victim = next(r for r in lows if r.status is RequestStatus.PREEMPTED)
    assert victim is lows[1], "equal cost: the newer low-priority request gives way"
    assert victim.request_id in out.finished_req_ids
    h.run_until_done()
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in [*lows, high])


def test_high_priority_preempts_when_kv_blocks_run_out():
    h = Harness(num_blocks=12, block_size=4, max_num_seqs=8, policy="priority", prefix=False)
    lows = [h.add(prompt_len=16, max_tokens=30, priority=LOW) for _ in range(2)]
    h.step()
    assert h.kv.num_free_blocks <= 4
    high = h.add(prompt_len=16, max_tokens=2, priority=HIGH)
    out = h.step()
    assert high.request_id in out.num_scheduled_tokens
    assert sum(r.status is RequestStatus.PREEMPTED for r in lows) == 1
    h.run_until_done()
    assert h.kv.usage() == 0


def test_fcfs_and_equal_priority_never_preempt_to_admit():
    for policy, prio in (("fcfs", HIGH), ("priority", LOW)):
        h = Harness(num_blocks=256, max_num_seqs=2, policy=policy)
        for _ in range(2):
            h.add(prompt_len=8, max_tokens=20, priority=LOW)
        h.step()
        late = h.add(prompt_len=8, max_tokens=2, priority=prio)
        h.step()
        assert h.scheduler.num_preemptions == 0 and late.status is RequestStatus.WAITING


def test_aging_earned_while_waiting_protects_a_request_once_admitted():
    """A low request that waited its way to the top rank is not preempted by later high ones of that rank."""
    h = Harness(num_blocks=512, max_num_seqs=1, policy="priority", aging_steps=2)
    blocker = h.add(prompt_len=4, max_tokens=12, priority=0)
    h.step()
    low = h.add(prompt_len=4, max_tokens=30, priority=3)  # waits 11+ steps: earns >= 5 levels
    while low.status is not RequestStatus.RUNNING:
        h.step()
    assert blocker.status is RequestStatus.FINISHED_LENGTH
    h.add(prompt_len=4, max_tokens=2, priority=0)
    for _ in range(3):
        h.step()
    assert low.num_preemptions == 0


def test_victims_are_chosen_by_cost_within_the_worst_rank():
    policy = PriorityPolicy(SchedulerConfig(policy="priority"))
    req = lambda rid, prio, computed, arrival: SimpleNamespace(
        request_id=rid, priority=prio, arrival_time=arrival, tenant=None, num_computed_tokens=computed,
        num_prompt_tokens=8)
    old_long = req("a", LOW, 300, 1.0)  # frees 25 blocks, recomputes 300 tokens
    new_short = req("b", LOW, 40, 2.0)  # frees 3
    shared = req("c", LOW, 30, 3.0)  # its blocks are shared with others: frees 0
    important = req("d", HIGH, 8, 4.0)
    freed = {"a": 25, "b": 3, "c": 0, "d": 1}
    cost = VictimCost(freed_blocks=lambda r: freed[r.request_id])
    running = [old_long, new_short, shared, important]
    head = req("h", HIGH, 0, 5.0)
    assert policy.admission_victim(head, running, 0, cost, 0) is shared, "a seat: the least recompute"
    assert policy.admission_victim(head, running, 2, cost, 0) is new_short, "cheapest that frees enough"
    assert policy.admission_victim(head, running, 10, cost, 0) is old_long, "only one frees enough"
    assert policy.admission_victim(head, running, 99, cost, 0) is old_long, "none does: most blocks per token"
    assert policy.admission_victim(req("x", LOW, 0, 6.0), running, 0, cost, 0) is None, "equal rank: no right"
    assert policy.growth_victim(important, running[:3], 1, cost) is new_short


def test_high_priority_blocks_are_evicted_last():
    h = Harness(num_blocks=8, block_size=4, max_num_seqs=4, policy="priority")
    high = h.add(prompt=list(range(1, 13)), max_tokens=1, priority=HIGH)  # 3 full blocks, cached when freed
    h.run_until_done()
    low = h.add(prompt=list(range(20, 32)), max_tokens=1, priority=LOW)
    h.run_until_done()
    h.add(prompt=list(range(40, 56)), max_tokens=1, priority=LOW)  # needs 4-5 blocks: something is evicted
    h.run_until_done()
    assert h.kv.get_prefix_hit(high.prompt_token_ids + [0]).num_tokens == 12, "the high request's prefix survived"
    assert h.kv.get_prefix_hit(low.prompt_token_ids + [0]).num_tokens < 12


def test_weighted_fair_share_between_two_saturating_tenants():
    h = Harness(num_blocks=512, block_size=4, max_model_len=512, max_num_seqs=8, max_num_batched_tokens=64,
                policy="fair", tenant_weights={"a": 1.0, "b": 3.0})
    rng = random.Random(0)
    served = {"a": 0, "b": 0}
    tenant_of = {}
    for _ in range(400):
        for tenant in ("a", "b"):  # both keep a deep queue: saturation
            while sum(r.tenant == tenant for r in h.scheduler.waiting) < 8:
                r = h.add(prompt_len=rng.randint(4, 40), max_tokens=rng.randint(4, 40), tenant=tenant)
                tenant_of[r.request_id] = tenant
        out = h.step()
        for rid, n in out.num_scheduled_tokens.items():
            served[tenant_of[rid]] += n
    assert served["b"] / served["a"] == pytest.approx(3.0, rel=0.10), served


def test_fair_share_gives_an_idle_tenant_no_banked_credit():
    policy = FairSharePolicy(SchedulerConfig(policy="fair"))
    req = lambda rid, tenant: SimpleNamespace(
        request_id=rid, priority=0, arrival_time=0.0, tenant=tenant, num_computed_tokens=0, num_prompt_tokens=8)
    busy = req("a1", "a")
    policy.enqueued(busy, 0)
    policy.charged(busy, 1000)
    late = req("b1", "b")
    policy.enqueued(late, 5)
    assert policy.vtime["b"] == policy.vtime["a"] == 1000


def _strict_priority_check(h: Harness, before_waiting: dict[str, int], out) -> None:
    """Every request admitted this step outranks (or ties) every request left waiting that could have gone."""
    admitted = [n.req_id for n in out.new_reqs]
    left = [r for r in h.scheduler.waiting if r.num_pending_outputs == 0 and r.request_id in before_waiting
            and r.request_id not in out.finished_req_ids]
    for rid in admitted:
        if rid in before_waiting:
            assert all(before_waiting[rid] <= r.priority for r in left), (rid, before_waiting[rid], left)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    policy=st.sampled_from(["priority", "fair"]),
    num_blocks=st.integers(10, 48),
    max_seqs=st.integers(1, 6),
    async_depth=st.sampled_from([0, 1]),
)
def test_random_priority_workloads_finish_with_the_same_outputs(seed, policy, num_blocks, max_seqs, async_depth):
    """Strict priority at admission (no aging), preemptions that change no output, nothing starves, nothing leaks."""
    rng = random.Random(seed)
    jobs = [(rng.randint(1, 24), rng.randint(1, 10), rng.choice([HIGH, 0, LOW]), rng.choice(["a", "b", None]),
             rng.randint(0, 6)) for _ in range(rng.randint(4, 24))]

    def run(**kw):
        h = Harness(block_size=4, max_model_len=40, max_num_batched_tokens=32, async_depth=async_depth, **kw)
        reqs, steps = [], 0
        pending = sorted(jobs, key=lambda j: j[4])
        while pending or h.scheduler.has_unfinished_requests() or h._in_flight:
            while pending and pending[0][4] <= steps:
                plen, max_tokens, prio, tenant, _ = pending.pop(0)
                reqs.append(h.add(prompt=[1 + (plen * 7 + i) % 40 for i in range(plen)], max_tokens=max_tokens,
                                  priority=prio, tenant=tenant))
            before = {r.request_id: r.priority for r in h.scheduler.waiting}
            out = h.step()
            if kw.get("aging_steps", 0) >= 10**6 and kw["policy"] == "priority":
                _strict_priority_check(h, before, out)
            steps += 1
            assert steps < 5000, "starvation: the workload did not finish"
        return h, reqs

    _, ref_reqs = run(num_blocks=1024, max_num_seqs=64, policy="fcfs")
    tight, reqs = run(num_blocks=num_blocks, max_num_seqs=max_seqs, policy=policy, aging_steps=10**6,
                      tenant_weights={"a": 1.0, "b": 2.0})
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in ref_reqs]
    assert all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert tight.kv.usage() == 0 and tight.kv.num_free_blocks == num_blocks


def test_slo_limits_hold_every_step_and_bring_step_times_to_the_target():
    """The scheduler obeys the controller's limits each step, and with a step-time model fed back the limits
    settle where steps meet the target (the controller's own behaviour is tested in test_slo.py)."""
    h = Harness(num_blocks=2400, block_size=16, max_model_len=2048, max_num_seqs=48, max_num_batched_tokens=1024,
                target_tpot_ms=30)
    rng = random.Random(1)
    durations = []
    for _ in range(400):
        while h.scheduler.num_waiting < 8:  # saturation
            h.add(prompt_len=rng.randint(50, 600), max_tokens=rng.randint(20, 120))
        running_before = h.scheduler.num_running
        out = h.step()
        limits = h.scheduler.limits
        prompt_tokens = sum(n for n in out.num_scheduled_tokens.values() if n > 1)
        assert prompt_tokens <= limits.prefill_budget
        assert not out.new_reqs or running_before < limits.max_running
        decodes = sum(n == 1 for n in out.num_scheduled_tokens.values())
        seconds = 0.010 + 0.0002 * decodes + 0.00004 * (out.total_num_scheduled_tokens - decodes)  # 51 ms at most
        h.scheduler.step_done(out, seconds)
        durations.append(seconds)
    settled = sorted(durations[150:])
    assert settled[int(0.9 * len(settled))] <= 0.030
    assert h.scheduler.limits.prefill_budget < 1024, "the target binds: prompts get less than the full budget"
