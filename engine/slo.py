"""Per-step limits of the scheduler, and the controller that moves them to meet latency targets.

A request's TPOT is the mean duration of the steps it decodes in. The controller holds the p90 of
the mean step time over runs of PERIOD steps (a TPOT over 8 tokens: a single long step among short
ones is not a miss, a run of them is) under ``target_tpot_s``, and gives the rest to throughput.

1. Model: t = a + b·decodes + c·prefill_tokens, least squares with forgetting (FORGET per step, to
   follow a change of cost) and a ridge toward the previous fit: when all steps have one shape the
   data fix only the time at that shape; the other directions keep what varied steps taught.
2. Limits, from the model and the time budget (SETPOINT·target·feedback factor): max_running R is
   the most decodes that fit beside min_prefill_budget prompt tokens; prefill_budget P is what the
   recent decode batch leaves, (budget - a - b·decodes) / c. A tightening target so takes prompt
   tokens first, decodes only once P is at its minimum (prompts always progress). If prompts cannot
   refill the batch, fewer decodes leave them more room: the batch settles where refill fits the
   budget, with no estimate of prompt tokens per output token (one burst skews that for long).
3. Feedback fixes what the model misses (attention over long contexts, noise) and lets steps run
   longer than the budget while their means stay under the target. Every PERIOD steps the p90 of
   the last WINDOW steps' PERIOD-step means is read: over the target at two decisions running, the
   factor shrinks in proportion; under target·(1 - BAND) at three, while requests were queued (so
   the limits, not the load, kept steps short), it grows by RAISE. In the band it holds; after a
   move the window refills first, so one error is corrected once.
4. Hysteresis: a limit moves only to a proposal beyond its dead band (MOVE, plus 1 request or
   min_prefill_budget / 2 tokens) the same way at two decisions running.

The first WARMUP steps run at the configured maxima: the engine starts empty, and those steps'
varied shapes (whole prompts, then mixed batches) are what separate a, b and c.

TTFT: once the oldest queued request has waited half of ``target_ttft_s``, P gets
urgency·TTFT_SLACK·budget seconds more, urgency rising linearly from 0 there to 1 at the target: a
step may take (1 + TTFT_SLACK) times the budget while a prompt is late; if that lasts, the feedback
takes it back out of the budget (TPOT stays on target, the mix leans to prompts). R is left alone:
a running request is never cut, so a raised cap would outlast the wait it was raised for.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.engine.config import require

if TYPE_CHECKING:
    from pagoda.engine.config import SchedulerConfig

SETPOINT = 0.9  # time budget / target: the fit's error and the steps' spread take the rest
PERIOD = 8  # steps between decisions
WARMUP = 2 * PERIOD  # observations before the first decision
WINDOW = 64  # recent step times the p90 is read from
BAND = 0.15  # feedback's dead band: a p90 in [target·(1 - BAND), target] moves nothing
RAISE = 1.1  # the factor's step up; its steps down are proportional to the overshoot
MOVE = 0.08  # limits' dead band, relative
TTFT_SLACK = 0.25  # how far past the time budget a late prompt may push a step
FORGET = 0.995  # per step (the model's memory: ~200 steps)
RIDGE = 1.0  # pull toward the previous fit at each solve, in steps' worth of evidence


@dataclass(frozen=True)
class StepLimits:
    """What one step may schedule: the running batch's size and the tokens spent on prompts."""

    max_running: int  # running requests (admission stops at this many; running ones are never cut)
    prefill_budget: int  # prompt tokens (new and continued prefill chunks) per step; decodes come on top


@dataclass(frozen=True)
class StepTimeModel:
    """A step's predicted duration in seconds: a + b·decodes + c·prefill_tokens (a, b, c >= 0)."""

    a: float
    b: float  # per decode
    c: float  # per prompt token

    def predict(self, decodes: int, prefill_tokens: int) -> float:
        return self.a + self.b * decodes + self.c * prefill_tokens


class _Fit:
    """Least squares with forgetting over (1, d/D, p/T): scaled alike, so one ridge suits all three."""

    def __init__(self, max_decodes: int, max_tokens: int) -> None:
        self.scales = (1.0, float(max_decodes), float(max_tokens))
        self.xx = [[0.0] * 3 for _ in range(3)]
        self.xt = [0.0] * 3
        self.theta = [0.0] * 3
        self.model = StepTimeModel(0.0, 0.0, 0.0)

    def add(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        x = (1.0, decodes / self.scales[1], prefill_tokens / self.scales[2])
        for i in range(3):
            self.xt[i] = FORGET * self.xt[i] + x[i] * seconds
            for j in range(3):
                self.xx[i][j] = FORGET * self.xx[i][j] + x[i] * x[j]

    def solve(self) -> None:
        """At decisions only: a step costs the host a few sums, not a solve."""
        m = [[v + RIDGE * (i == j) for j, v in enumerate(row)] for i, row in enumerate(self.xx)]
        self.theta = _solve3(m, [v + RIDGE * t for v, t in zip(self.xt, self.theta)])
        self.model = StepTimeModel(*(max(v, 0.0) / s for v, s in zip(self.theta, self.scales)))


def _det3(m: list[list[float]]) -> float:
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def _solve3(m: list[list[float]], y: list[float]) -> list[float]:
    """Cramer's rule; the ridge keeps m positive definite, so det >= RIDGE³."""
    det = _det3(m)
    return [_det3([[y[i] if j == col else m[i][j] for j in range(3)] for i in range(3)]) / det for col in range(3)]


class SloController:
    """Moves StepLimits so that the p90 step time, and with it the TPOT, stays under target_tpot_s.

    ``limits`` before each step, ``observe`` after it; times come in as arguments (deterministic).
    """

    def __init__(self, target_tpot_s: float, target_ttft_s: float | None, max_num_seqs: int,
                 max_num_batched_tokens: int, min_prefill_budget: int = 16) -> None:
        require(target_tpot_s > 0, f"target_tpot_s must be > 0, got {target_tpot_s}")
        require(target_ttft_s is None or target_ttft_s > 0, f"target_ttft_s must be > 0, got {target_ttft_s}")
        require(min(max_num_seqs, max_num_batched_tokens, min_prefill_budget) >= 1,
                "max_num_seqs, max_num_batched_tokens and min_prefill_budget must be >= 1")
        self.target_tpot_s, self.target_ttft_s = target_tpot_s, target_ttft_s
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.min_prefill_budget = min(min_prefill_budget, max_num_batched_tokens)  # 16: one KV block by default
        self._fit = _Fit(max_num_seqs, max_num_batched_tokens)
        self._decodes = 0.0  # per step, smoothed over ~PERIOD steps: one finishing request is no news
        self._times: deque[tuple[float, bool]] = deque(maxlen=WINDOW)  # (seconds, requests were queued)
        self._queued = False
        self._steps = 0
        self._factor = 1.0  # the feedback's correction of the time budget
        self._streak = 0  # > 0: decisions in a row under the band; < 0: over the target
        self._pending: tuple[tuple[int, int], int] = ((0, 0), 0)  # proposed moves of (R, P), decisions in a row
        self._limits = StepLimits(max_num_seqs, max_num_batched_tokens)

    @classmethod
    def from_config(cls, config: SchedulerConfig) -> SloController | None:
        """The controller for ``config``'s targets; None when it sets no target_tpot_ms."""
        if config.target_tpot_ms is None:
            return None
        ttft = None if config.target_ttft_ms is None else config.target_ttft_ms / 1000
        return cls(config.target_tpot_ms / 1000, ttft, config.max_num_seqs, config.max_num_batched_tokens)

    @property
    def step_time_model(self) -> StepTimeModel:
        """The fit as of the last decision."""
        return self._fit.model

    @property
    def base_limits(self) -> StepLimits:
        """The limits before the TTFT rule adds to the prefill budget."""
        return self._limits

    @property
    def time_budget_s(self) -> float:
        return SETPOINT * self.target_tpot_s * self._factor

    def limits(self, oldest_wait_s: float) -> StepLimits:
        """This step's limits; ``oldest_wait_s``: how long the oldest queued request has waited (0: none)."""
        self._queued = oldest_wait_s > 0
        base = self._limits
        if self.target_ttft_s is None or self._steps < WARMUP:
            return base
        urgency = min(1.0, max(0.0, 2 * oldest_wait_s / self.target_ttft_s - 1))
        extra = urgency * TTFT_SLACK * self.time_budget_s / max(self.step_time_model.c, 1e-12)
        return StepLimits(base.max_running, int(min(self.max_num_batched_tokens, base.prefill_budget + extra)))

    def observe(self, seconds: float, num_decodes: int, num_prefill_tokens: int) -> None:
        """A step ran ``num_decodes`` decodes and ``num_prefill_tokens`` prompt tokens in ``seconds``."""
        if not 0 <= seconds < float("inf"):
            return  # a broken clock must not poison the fit
        self._fit.add(num_decodes, num_prefill_tokens, seconds)
        self._decodes += (num_decodes - self._decodes) / PERIOD
        self._times.append((seconds, self._queued))
        self._steps += 1
        if self._steps == WARMUP:  # the maxima were no decision: leave them at once, judge only what follows
            self._fit.solve()
            self._limits = self._split(self.time_budget_s)
            self._times.clear()
        elif self._steps > WARMUP and self._steps % PERIOD == 0:
            self._fit.solve()
            self._feedback()
            self._settle(self._split(self.time_budget_s))

    def _feedback(self) -> None:
        if len(self._times) < WINDOW // 2:
            return
        p90 = self.tpot_signal()
        if p90 > self.target_tpot_s:
            self._streak = min(self._streak, 0) - 1
        elif p90 < self.target_tpot_s * (1 - BAND) and 2 * sum(q for _, q in self._times) > len(self._times):
            self._streak = max(self._streak, 0) + 1
        else:
            self._streak = 0
        if self._streak <= -2 or self._streak >= 3:
            step = RAISE if self._streak > 0 else max(0.8, (1 - BAND / 2) * self.target_tpot_s / p90)
            self._factor = min(2.0, max(0.25, self._factor * step))  # bounded: bad clocks cannot run away
            self._streak = 0
            self._times.clear()

    def tpot_signal(self) -> float:
        """What the feedback holds under the target: the p90 of the window's mean step times over runs of PERIOD
        steps. A request's TPOT is a mean over its decode steps, so one long prefill step among short ones is
        not a TPOT miss; a run of them is."""
        times = [t for t, _ in self._times]
        means = sorted(sum(times[i:i + PERIOD]) / len(times[i:i + PERIOD]) for i in range(0, len(times), PERIOD))
        return means[int(0.9 * (len(means) - 1))]

    def _split(self, budget_s: float) -> StepLimits:
        """R: the most decodes that fit beside min_prefill_budget; P: what the recent decodes leave."""
        model = self.step_time_model
        avail = budget_s - model.a
        b, c = max(model.b, 1e-12), max(model.c, 1e-12)
        running = min(self.max_num_seqs, max(1, int((avail - c * self.min_prefill_budget) / b)))
        decodes = min(running, self._decodes)
        budget = min(self.max_num_batched_tokens, max(self.min_prefill_budget, int((avail - b * decodes) / c)))
        return StepLimits(running, budget)

    def _settle(self, want: StepLimits) -> None:
        """Hysteresis: move a limit only to a proposal beyond its dead band the same way at two decisions running."""
        have = self._limits
        moves = (_direction(have.max_running, want.max_running, 1, (1, self.max_num_seqs)),
                 _direction(have.prefill_budget, want.prefill_budget, self.min_prefill_budget // 2,
                            (self.min_prefill_budget, self.max_num_batched_tokens)))
        count = self._pending[1] + 1 if moves == self._pending[0] else 1
        self._pending = (moves, count)
        if moves != (0, 0) and count >= 2:
            self._limits = StepLimits(want.max_running if moves[0] else have.max_running,
                                      want.prefill_budget if moves[1] else have.prefill_budget)
            self._pending = ((0, 0), 0)


def _direction(have: int, want: int, slack: int, bounds: tuple[int, int]) -> int:
    """-1, 0 or 1: which way ``want`` lies beyond the dead band (MOVE, plus ``slack`` units) around ``have``.
    A bound is always worth reaching: three short of max_num_seqs for no reason is a loss, not stability."""
    if want == have or (abs(want - have) <= MOVE * have + slack and want not in bounds):
        return 0
    return 1 if want > have else -1
