"""The SLO controller (engine/slo.py) when a step that carries any prompt tokens pays a fixed price d.

Regression (bench/results/scheduling_h100_8b.md): on an H100 decode-only steps replay CUDA graphs (8-11 ms)
while any step with prompt tokens runs eagerly (>= 14.5 ms). A model without d saw every mixed step overshoot
the budget, cut the prefill budget to its minimum (so each prompt needed dozens of such steps), then the batch:
priority+slo finished 71 of 651 requests, TPOT p90 7x the target. TPOT is a mean, so decode-only steps under
budget may pay for a prefill step over it: a duty cycle.

A small simulated engine (FCFS, a deep queue: saturation) drives the real controller with step time
a + b·decodes + c·prefill_tokens + d·[prefill_tokens > 0] plus seeded noise, observing each step one step late
as async scheduling does; the scheduler's rule for ``StepLimits.prefill`` is followed (decode-only steps
unless nothing decodes). The baseline is the best fixed (max_num_seqs, prefill budget) that meets the target."""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass, field

import pytest

from pagoda.engine.slo import PERIOD, SloController, StepLimits

MAX_SEQS, MAX_TOKENS = 64, 2048
STEPS, SETTLED = 3000, 600
MAX_REVERSALS_PER_100 = 5.0  # bench/scheduling.py's limit


@dataclass(frozen=True)
class Cost:
    """Step time in seconds, and the requests' lengths."""

    target: float  # the TPOT target the regime is judged against
    a: float
    b: float  # per decode
    c: float  # per prompt token
    d: float  # once per step with prompt tokens
    prompt: tuple[int, int] = (100, 1500)
    output: tuple[int, int] = (32, 320)
    noise: float = 0.05

    def step(self, decodes: int, prefill: int, rng: random.Random) -> float:
        mean = self.a + self.b * decodes + self.c * prefill + (self.d if prefill else 0.0)
        return mean * max(0.5, 1 + self.noise * rng.gauss(0, 1))


def h100(d_share: float) -> Cost:
    """An 8B model on one H100: decode steps 6 ms + 40 us per request (64: 8.6 ms), 40k prompt tokens/s."""
    return Cost(0.012, 0.006, 0.00004, 0.000025, d_share * 0.012)


def cpu(d_share: float) -> Cost:
    """A small model on a CPU: decode is compute-bound (each request adds 2.5% of a batch-1 step)."""
    return Cost(0.2, 0.06, 0.0015, 0.0002, d_share * 0.2, prompt=(20, 200), output=(16, 64))


@dataclass(eq=False)
class Req:
    prompt: int
    output: int
    prefilled: int = 0
    decoded: int = 0
    admitted: int = -1  # step
    first_token: int = -1  # step


@dataclass
class Run:
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # output tokens per step
    limits: list[StepLimits] = field(default_factory=list)
    requests: list[Req] = field(default_factory=list)

    def throughput(self) -> float:
        return sum(self.tokens[SETTLED:]) / sum(self.times[SETTLED:])

    def p90_of_period_means(self) -> float:
        t = self.times[SETTLED:]
        return p90([sum(t[i:i + PERIOD]) / PERIOD for i in range(0, len(t) - PERIOD + 1, PERIOD)])


def p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


def simulate(cost: Cost, controller: SloController | None, fixed: StepLimits | None = None, seed: int = 0,
             launch_s: float = 0.0) -> Run:
    """``launch_s``: the host time of launching a step with prompt tokens (eager kernels, where decode-only steps
    replay graphs). With async scheduling it runs while the step before it is on the device, so the host's
    clock (the time between results) charges it to that step; the step's device time is the true cost."""
    rng = random.Random(seed)
    waiting: list[Req] = []
    running: list[Req] = []
    run, in_flight, shift = Run(), None, 0.0
    for step in range(STEPS):
        while len(waiting) < 32:
            r = Req(rng.randint(*cost.prompt), rng.randint(*cost.output))
            waiting.append(r)
            run.requests.append(r)
        limits = controller.limits(1.0) if controller else fixed
        decoding = [r for r in running if r.prefilled == r.prompt]
        budget = min(limits.prefill_budget if limits.prefill or not decoding else 0, MAX_TOKENS - len(decoding))
        chunks = []
        for r in running:
            if r.prefilled < r.prompt and budget > 0:
                chunks.append((r, min(budget, r.prompt - r.prefilled)))
                budget -= chunks[-1][1]
        while waiting and budget > 0 and len(running) < limits.max_running:
            r = waiting.pop(0)
            r.admitted = step
            running.append(r)
            chunks.append((r, min(budget, r.prompt)))
            budget -= chunks[-1][1]
        prefill = sum(n for _, n in chunks)
        dt = cost.step(len(decoding), prefill, rng)
        produced = len(decoding)
        for r in decoding:
            r.decoded += 1
        for r, n in chunks:
            r.prefilled += n
            if r.prefilled == r.prompt:
                r.decoded, r.first_token, produced = 1, step, produced + 1
        running = [r for r in running if r.decoded < r.output]
        if controller:
            if in_flight:  # async scheduling: step n's time arrives after step n+1 was scheduled
                shift = min(launch_s, 0.9 * dt) if prefill else 0.0
                controller.observe(in_flight[0] + shift, *in_flight[1:])
            in_flight = (dt - shift, len(decoding), prefill, dt)
        run.times.append(dt)
        run.tokens.append(produced)
        run.limits.append(limits)
    return run


@functools.cache
def best_fixed(cost: Cost) -> tuple[StepLimits, float]:
    """The fixed limits of most throughput whose p90 PERIOD-step mean meets the target, and that throughput."""
    best = (StepLimits(1, 16), 0.0)
    for seqs, budget in itertools.product((4, 8, 16, 24, 32, 48, 64), (16, 64, 256, 1024, 2048)):
        run = simulate(cost, None, StepLimits(seqs, budget))
        if run.p90_of_period_means() <= cost.target and run.throughput() > best[1]:
            best = (StepLimits(seqs, budget), run.throughput())
    return best


def reversals(values: list[int]) -> int:
    moves = [b - a for a, b in itertools.pairwise(values) if b != a]
    return sum((x > 0) != (y > 0) for x, y in itertools.pairwise(moves))


REGIMES = {f"{name}-d{share}": make(share) for name, make in (("h100", h100), ("cpu", cpu)) for share in (0, 0.5, 1.2)}


@pytest.mark.parametrize("regime", REGIMES)
def test_duty_cycle_meets_the_target_at_85_percent_of_the_best_fixed_limits(regime):
    cost = REGIMES[regime]
    fixed, fixed_tput = best_fixed(cost)
    ctl = SloController(cost.target, None, MAX_SEQS, MAX_TOKENS)
    run = simulate(cost, ctl)
    p90_mean, tput = run.p90_of_period_means(), run.throughput()
    detail = (f"p90 {PERIOD}-step mean {p90_mean * 1e3:.2f} ms (target {cost.target * 1e3:.1f}), throughput "
              f"{tput:.0f} vs {fixed_tput:.0f} tok/s at {fixed}; model {ctl.step_time_model}; limits {ctl.base_limits}")
    assert p90_mean <= cost.target, detail
    assert tput >= 0.85 * fixed_tput, detail
    admitted = [r for r in run.requests if 0 <= r.admitted < STEPS - 400]
    assert admitted and all(r.first_token >= 0 for r in admitted), "a prompt starved"
    settled = run.limits[SETTLED:]
    assert reversals([lim.max_running for lim in settled]) <= 4, detail
    # bench/scheduling.py's check: at most MAX_REVERSALS_PER_100 direction changes per 100 steps (the prefill budget
    # follows the decode batch, which the cycle's admissions move in steps)
    assert 100 * reversals([lim.prefill_budget for lim in settled]) / len(settled) <= MAX_REVERSALS_PER_100, detail
    if cost.d:
        assert ctl.step_time_model.d >= 0.5 * cost.d, detail  # the fit sees the fixed cost (not spread over a, c)


@pytest.mark.parametrize("share", [0.5, 1.2])
def test_the_fit_prices_decodes_from_device_time_when_the_host_clock_misplaces_a_launch(share):
    """Regression (bench/results/scheduling_h100_8b.md, priority+slo at 1,322 tok/s against 2,435 for a fixed cap):
    fitted to the host's intervals, the decode-only step before each prefill step carries that step's 12 ms launch,
    the fit puts it in a with b = 0, and max_running flips between 1 and the maximum. Fitted to device time it
    keeps b, d and the batch."""
    cost = h100(share)
    fixed, fixed_tput = best_fixed(cost)
    ctl = SloController(cost.target, None, MAX_SEQS, MAX_TOKENS)
    run = simulate(cost, ctl, launch_s=0.012)
    detail = f"throughput {run.throughput():.0f} vs {fixed_tput:.0f} tok/s at {fixed}; model {ctl.step_time_model}"
    assert run.p90_of_period_means() <= cost.target, detail
    assert run.throughput() >= 0.85 * fixed_tput, detail
    assert reversals([lim.max_running for lim in run.limits[SETTLED:]]) <= 4, detail
    assert ctl.step_time_model.b >= 0.5 * cost.b and ctl.step_time_model.d >= 0.5 * cost.d, detail
