"""The SLO controller (engine/slo.py) against a simulated engine: a scheduler that admits up to
max_running, spends the prefill budget on prompts and decodes one token per running request, with
step time a + b·decodes + c·prefill_tokens plus seeded noise, under more requests than it can serve."""

from __future__ import annotations

import functools
import itertools
import random
from collections import deque
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.config import SchedulerConfig
from pagoda.engine.slo import MOVE, SETPOINT, SloController, StepLimits

MAX_SEQS, MAX_TOKENS = 64, 2048


@dataclass(frozen=True)
class Cost:
    """Step time in seconds: roughly an 8B model on one H100 (decode batch of 64: 20 ms; 25k prompt tokens/s)."""

    a: float = 0.012
    b: float = 0.00012  # per decode
    c: float = 0.00004  # per prompt token
    noise: float = 0.05  # relative, gaussian
    per_context: float = 0.0  # per token of the decoding requests' contexts: attention, which the model cannot see

    def step(self, decodes: int, prefill: int, context: int, rng: random.Random) -> float:
        mean = self.a + self.b * decodes + self.c * prefill + self.per_context * context
        return mean * max(0.5, 1 + self.noise * rng.gauss(0, 1))


@dataclass(eq=False)  # compared by identity: running.remove must take this one
class Req:
    arrival: float
    prompt: int
    output: int
    prefilled: int = 0
    decoded: int = 0
    first_token: float = 0.0
    done: float = 0.0

    @property
    def tpot(self) -> float:
        return (self.done - self.first_token) / (self.output - 1)


@dataclass
class Run:
    times: list[float] = field(default_factory=list)  # per step, seconds
    tokens: list[int] = field(default_factory=list)  # output tokens per step
    limits: list[StepLimits] = field(default_factory=list)
    finished: list[Req] = field(default_factory=list)

    def throughput(self, start: int = 0, stop: int | None = None) -> float:
        """Output tokens per second over steps [start, stop)."""
        return sum(self.tokens[start:stop]) / sum(self.times[start:stop])

    def p90_tpot(self, after: float = 0.0) -> float:
        return p90([r.tpot for r in self.finished if r.first_token >= after])


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def p90_of_8_step_means(times: list[float]) -> float:
    """What the controller holds under the target: a TPOT over 8 tokens, at every point of the run."""
    return p90([sum(times[i:i + 8]) / 8 for i in range(0, len(times) - 7, 8)])


def simulate(controller: SloController | None, steps: int, cost=lambda step: Cost(), seed: int = 0,
             rate: float = 16.0) -> Run:
    """Requests arrive at ``rate`` per second (more than the ~11/s the engine serves), prompts of
    100-1500 tokens, 32-320 output tokens; first come, first served."""
    rng = random.Random(seed)
    waiting: deque[Req] = deque()
    running: list[Req] = []
    run, now, next_arrival = Run(), 0.0, 0.0
    unconstrained = StepLimits(MAX_SEQS, MAX_TOKENS)
    for step in range(steps):
        while next_arrival <= now:
            waiting.append(Req(next_arrival, rng.randint(100, 1500), rng.randint(32, 320)))
            next_arrival += rng.expovariate(rate)
        limits = controller.limits(now - waiting[0].arrival if waiting else 0.0) if controller else unconstrained
        decoding = [r for r in running if r.prefilled == r.prompt]
        prompts = limits.prefill or not decoding  # the scheduler's rule: decode-only steps, unless none decode
        budget = min(limits.prefill_budget if prompts else 0, MAX_TOKENS - len(decoding))
        chunks = {}
        for r in running:
            if r.prefilled < r.prompt and budget > 0:
                chunks[id(r)] = (r, min(budget, r.prompt - r.prefilled))
                budget -= chunks[id(r)][1]
        while waiting and budget > 0 and len(running) < limits.max_running:
            r = waiting.popleft()
            running.append(r)
            chunks[id(r)] = (r, min(budget, r.prompt))
            budget -= chunks[id(r)][1]
        prefill = sum(n for _, n in chunks.values())
        context = sum(r.prompt + r.decoded for r in decoding) if cost(step).per_context else 0
        dt = cost(step).step(len(decoding), prefill, context, rng)
        now += dt
        produced = len(decoding)
        for r in decoding:
            r.decoded += 1
        for r, n in chunks.values():
            r.prefilled += n
            if r.prefilled == r.prompt:  # the last chunk samples the first token
                r.decoded, r.first_token, produced = 1, now, produced + 1
        for r in [r for r in running if r.decoded == r.output]:
            r.done = now
            running.remove(r)
            run.finished.append(r)
        if controller:
            controller.observe(dt, len(decoding), prefill)
        run.times.append(dt)
        run.tokens.append(produced)
        run.limits.append(limits)
    return run


def controller(target_s: float, ttft_s: float | None = None) -> SloController:
    return SloController(target_s, ttft_s, MAX_SEQS, MAX_TOKENS)


def reversals(values: list[int]) -> int:
    """How often a sequence of limits turns around (up then down, or down then up)."""
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum((x > 0) != (y > 0) for x, y in itertools.pairwise(moves))


@functools.cache
def unconstrained(cost: Cost = Cost()) -> tuple[Run, float]:
    """The configured maxima's run, and a feasible target: 0.7 x its p90 step time (after warm-up)."""
    run = simulate(None, STEPS, cost=lambda step: cost)
    return run, 0.7 * p90(run.times[SETTLED:])


STEPS, SETTLED = 3000, 500  # steps simulated; the first SETTLED (filling an empty engine) are not judged


@functools.cache
def constrained(cost: Cost = Cost()) -> tuple[Run, SloController]:
    target = unconstrained(cost)[1]
    ctl = controller(target)
    return simulate(ctl, STEPS, cost=lambda step: cost), ctl


@pytest.mark.parametrize("cost", [Cost(), Cost(b=0.00004, per_context=1e-7), Cost(noise=0.15)],
                         ids=["linear", "hidden-attention-cost", "noisy"])
def test_feasible_target_holds_p90_tpot_and_85_percent_of_throughput(cost):
    base, target = unconstrained(cost)
    run, _ = constrained(cost)
    assert base.p90_tpot() > 0 and run.p90_tpot() <= target
    assert p90_of_8_step_means(run.times[SETTLED:]) <= target  # outputs of 8 tokens too, not only long ones
    assert run.throughput(SETTLED) >= 0.85 * base.throughput(SETTLED)
    assert len(run.finished) >= 0.85 * len(base.finished)


def test_unconstrained_baseline_misses_the_step_target():
    """The target is not met by default: the unconstrained p90 step is 1/0.7 of it (whole prompts at once)."""
    base, target = unconstrained()
    assert p90(base.times[SETTLED:]) > 1.4 * target


def test_a_target_the_unconstrained_tpot_misses_is_met_at_a_price():
    """0.9 x the unconstrained p90 TPOT: met, with a smaller batch; throughput pays (~86%) where the feasible
    target above costs nothing."""
    base, _ = unconstrained()
    target = 0.9 * base.p90_tpot()
    run = simulate(controller(target), STEPS)
    assert base.p90_tpot() > target >= run.p90_tpot()
    assert run.throughput(SETTLED) >= 0.85 * base.throughput(SETTLED)


@pytest.mark.parametrize("regime", ["prompts-bound", "decodes-bound"])
def test_limits_settle_without_oscillating(regime):
    """Over 2,000 settled steps (250 decisions) the limits turn around only a few times: prompts-bound, the
    feasible target of the test above; decodes-bound, 20 ms, where even decodes alone must be cut (64 take 19.7)."""
    if regime == "prompts-bound":
        run, _ = constrained()
    else:
        run = simulate(controller(0.020), STEPS)
    settled = run.limits[SETTLED:SETTLED + 2000]
    assert reversals([lim.max_running for lim in settled]) <= 4
    assert reversals([lim.prefill_budget for lim in settled]) <= 10
    assert p90_of_8_step_means(run.times[SETTLED:]) <= (unconstrained()[1] if regime == "prompts-bound" else 0.020)


def test_a_step_change_of_prompt_cost_is_followed_to_a_new_steady_state():
    _, target = unconstrained()
    ctl = controller(target)
    run = simulate(ctl, 2 * STEPS, cost=lambda step: Cost(c=0.00008) if step >= STEPS else Cost())
    before, after = run.limits[STEPS - 1000:STEPS], run.limits[STEPS + 1000:]
    budget_before = sum(lim.prefill_budget for lim in before) / len(before)
    budget_after = sum(lim.prefill_budget for lim in after) / len(after)
    assert budget_after < 0.75 * budget_before  # prompt tokens cost twice as much: about half as many
    assert p90_of_8_step_means(run.times[STEPS + 1000:]) <= target
    assert reversals([lim.prefill_budget for lim in after]) <= 8
    assert reversals([lim.max_running for lim in after]) <= 4
    assert ctl.step_time_model.c == pytest.approx(0.00008, rel=0.25)


def test_tighter_targets_take_prompt_tokens_first_then_decodes():
    """A full batch (as many decodes as allowed) with prompt chunks of every size the budget allows."""
    previous = StepLimits(MAX_SEQS, MAX_TOKENS)
    for target_ms in (60, 40, 30, 25, 22, 20, 18, 16, 14):
        ctl, rng, cost = controller(target_ms / 1000), random.Random(0), Cost(noise=0.0)
        for _ in range(400):
            lim = ctl.limits(0.0)
            d, p = lim.max_running, rng.randint(0, lim.prefill_budget) if lim.prefill else 0
            ctl.observe(cost.step(d, p, 0, rng), d, p)
        lim = ctl.limits(0.0)
        assert lim.max_running <= previous.max_running
        assert lim.prefill_budget <= previous.prefill_budget * (1 + MOVE) + ctl.min_prefill_budget  # hysteresis band
        if lim.max_running < MAX_SEQS:  # decodes give way only once prompts are down to (the dead band of) their minimum
            assert lim.prefill_budget <= 2 * ctl.min_prefill_budget
        previous = lim
    # 14 ms: the fixed cost (12 ms) leaves almost nothing: prompts at their minimum, and the few decodes whose
    # decode-only steps earn one minimum prefill step per PERIOD steps (before the duty cycle: 1 decode)
    assert previous.prefill_budget == ctl.min_prefill_budget and previous.max_running <= (SETPOINT * 0.014 - cost.a) / cost.b


def test_model_recovers_the_step_cost_and_survives_one_shape():
    ctl, rng, cost = controller(0.05), random.Random(1), Cost(noise=0.0)
    for _ in range(300):  # half of the steps decode-only: they separate the fixed cost of prompts from a
        d, p = rng.randint(0, MAX_SEQS), rng.randint(0, MAX_TOKENS) * rng.randint(0, 1)
        ctl.observe(cost.step(d, p, 0, rng), d, p)
    model = ctl.step_time_model
    assert (model.a, model.b, model.c) == pytest.approx((cost.a, cost.b, cost.c), rel=0.05)
    assert model.d == pytest.approx(0.0, abs=0.02 * cost.a)
    for _ in range(2000):  # then one shape only: the data no longer separate a, b and c
        ctl.observe(0.03, 32, 256)
    model = ctl.step_time_model
    assert model.predict(32, 256) == pytest.approx(0.03, rel=0.01)
    assert model.b > 0 and model.c > 0


def test_the_model_is_fitted_to_device_time_and_the_feedback_reads_the_host_clock():
    """With async scheduling the host's clock charges a step's launch to the step before it; the device's does not.
    The fit takes device time; the TPOT signal (and the slack) the host's intervals, which requests see."""
    ctl, rng, cost = controller(0.05), random.Random(1), Cost(noise=0.0)
    device_only = controller(0.05)
    for i in range(300):
        d, p = rng.randint(0, MAX_SEQS), rng.randint(0, MAX_TOKENS) * rng.randint(0, 1)
        device = cost.step(d, p, 0, rng)
        late = 0.01 * (i % 2)  # every other step ends 10 ms later on the host's clock
        ctl.observe(device + late, d, p, device)
        device_only.observe(device, d, p)
    model = ctl.step_time_model
    assert (model.a, model.b, model.c) == pytest.approx((cost.a, cost.b, cost.c), rel=0.05)
    assert model == device_only.step_time_model
    assert ctl.tpot_signal() > device_only.tpot_signal() + 0.004  # PERIOD-step means 5 ms longer


def test_before_any_observation_the_configured_maxima():
    ctl = SloController(0.02, 1.0, 16, 512)
    assert ctl.limits(0.0) == ctl.limits(100.0) == StepLimits(16, 512)


def steady(ttft_s: float | None) -> SloController:
    """A controller that has seen a full decode batch with prompt chunks, requests queued."""
    ctl, rng, cost = controller(0.04, ttft_s), random.Random(2), Cost()
    for _ in range(500):
        d, p = MAX_SEQS - rng.randint(0, 4), rng.randint(0, 600)
        ctl.limits(0.1)
        ctl.observe(cost.step(d, p, 0, rng), d, p)
    return ctl


def test_ttft_target_grows_the_prefill_budget_as_the_oldest_wait_nears_it():
    ctl = steady(ttft_s=2.0)
    base = ctl.limits(0.0)
    budgets = [ctl.limits(wait).prefill_budget for wait in (0.5, 1.0, 1.25, 1.5, 1.75, 2.0, 5.0)]
    assert budgets[:2] == [base.prefill_budget] * 2  # up to half the target: the TPOT rule alone
    assert budgets[1] < budgets[2] < budgets[3] < budgets[4] < budgets[5] == budgets[6]
    # at the target, a step may take 1 + TTFT_SLACK times the time budget, no more
    assert ctl.step_time_model.predict(MAX_SEQS, budgets[-1]) <= 1.3 * ctl.time_budget_s
    assert all(ctl.limits(wait).max_running == base.max_running for wait in (0.0, 1.5, 5.0))
    assert steady(ttft_s=None).limits(5.0) == steady(ttft_s=None).limits(0.0)


def test_ttft_target_in_the_simulation_gives_queued_prompts_a_larger_budget():
    _, target = unconstrained()
    with_ttft = controller(target, ttft_s=1.0)
    run = simulate(with_ttft, 1000)  # saturated: the queue's oldest request soon waits > 1 s
    assert run.limits[-1].prefill_budget > with_ttft.base_limits.prefill_budget


def test_from_config():
    assert SloController.from_config(SchedulerConfig()) is None
    ctl = SloController.from_config(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, target_tpot_ms=40,
                                                    target_ttft_ms=500))
    assert (ctl.target_tpot_s, ctl.target_ttft_s) == (0.04, 0.5)
    assert ctl.limits(0.0) == StepLimits(8, 256)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="target_tpot_s"):
        SloController(0.0, None, 8, 256)
    with pytest.raises(ValueError, match="target_ttft_s"):
        SloController(0.05, -1.0, 8, 256)


observations = st.tuples(st.floats(0, 10, allow_nan=False), st.floats(0, 1), st.floats(0, 1), st.floats(0, 100))


@settings(max_examples=60, deadline=None)
@given(target=st.floats(1e-4, 2.0), ttft=st.none() | st.floats(1e-3, 60), max_seqs=st.integers(1, 512),
       max_tokens=st.integers(1, 16384), min_budget=st.integers(1, 4096),
       steps=st.lists(observations, max_size=120))
def test_limits_stay_in_bounds(target, ttft, max_seqs, max_tokens, min_budget, steps):
    ctl = SloController(target, ttft, max_seqs, max_tokens, min_budget)
    for seconds, decodes, prefill, wait in steps + [(float("nan"), 0, 0, 0), (float("inf"), 1, 1, 1)]:
        lim = ctl.limits(wait)
        assert 1 <= lim.max_running <= max_seqs
        assert min(min_budget, max_tokens) <= lim.prefill_budget <= max_tokens
        ctl.observe(seconds, int(decodes * max_seqs), int(prefill * max_tokens))
    model = ctl.step_time_model
    assert min(model.a, model.b, model.c) >= 0
