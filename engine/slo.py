"""Per-step limits of the scheduler, and the controller that moves them to meet latency targets.

A request's TPOT is the mean duration of the steps it decodes in. The controller holds the p90 of
the mean step time over runs of PERIOD steps (a TPOT over 8 tokens: a single long step among short
ones is not a miss, a run of them is) under ``target_tpot_s``, and gives the rest to throughput.

1. Model (engine/step_model.py): t = a + b·decodes + c·prefill_tokens + d·[prefill_tokens > 0]. ``d``
   is the fixed price of a step that carries any prompt tokens (on a GPU, decode-only steps replay
   CUDA graphs and mixed steps run eagerly: 8-11 ms against >= 14.5 ms for an 8B model on an H100).
2. Duty cycle: since TPOT is a mean, decode-only steps that run under the time budget B
   (SETPOINT·target·feedback factor) earn slack, and a step with prompt tokens spends it. The slack is
   the sum of (B - measured time) over past steps, capped at what one prefill step spends plus
   BANK·B (idle time is not hoarded into a burst); a step may carry prompt tokens (``StepLimits.prefill``)
   when the slack, less what the steps still in flight are predicted to spend, covers the predicted
   overshoot of a full prefill step, and k - 1 steps (below) have passed since the last one: steps a
   little faster than predicted must not bring two prefill steps into one PERIOD-step window. So the mean step time stays at B whatever d is, and prompts keep
   progressing: with d = 0 nearly every step carries prompts, as without the cycle; with a large d,
   one step in up to PERIOD does, and it carries the prompts of all of them.
3. Limits, from the model and B: max_running R is the most decodes whose decode-only steps earn, over
   PERIOD steps, one prefill step of min_prefill_budget tokens; prefill_budget P (the tokens of a step
   that carries prompts) is what a cycle of k steps earns beside the recent decode batch, less d:
   (k·(B - a - b·decodes) - d) / c, with k the fewest steps (<= PERIOD) over which d costs at most
   FIXED_SHARE of the slack spent. A tightening target so takes prompt tokens first, decodes only
   once P is at its minimum (prompts always progress). If prompts cannot refill the batch, fewer
   decodes leave them more room: the batch settles where refill fits the budget.
   The model is fitted to each step's own time on the device where there is one (``DeviceSpan``): with
   async scheduling step n + 1 is launched before step n's result is taken, so on the host's clock an
   eager prefill step's launch (10-15 ms for an 8B model) lands on the decode-only step before it, and
   the fit would price decodes for what prompts cost. The slack and the feedback keep the host's
   intervals between results: that is what a request's TPOT is made of.
4. Feedback fixes what the model misses (attention over long contexts, noise). Every PERIOD steps the
   p90 of the last WINDOW steps' PERIOD-step means is read: over the target at two decisions running,
   the factor shrinks in proportion; under target·(1 - BAND) at three, while requests were queued (so
   the limits, not the load, kept steps short), it grows by RAISE. In the band it holds; after a
   move the window refills first, so one error is corrected once.
5. Hysteresis: a limit moves only to a proposal beyond its dead band (MOVE, plus 1 request or
   min_prefill_budget / 2 tokens) the same way at two decisions running.

The first WARMUP steps run at the configured maxima, every step free to carry prompts: the engine
starts empty, and those steps' varied shapes (whole prompts, then mixed batches) are what separate
a, b and c; the decode-only steps of the duty cycle then separate a and d.

TTFT: once the oldest queued request has waited half of ``target_ttft_s``, P gets
urgency·TTFT_SLACK·B seconds' worth more, urgency rising linearly from 0 there to 1 at the target; the
slack pays for it (the steps after a larger prefill step stay decode-only longer), so TPOT stays on
target and the mix leans to prompts. R is left alone: a running request is never cut, so a raised
cap would outlast the wait it was raised for.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pagoda.engine.config import require
from pagoda.engine.step_model import StepTimeFit, StepTimeModel

if TYPE_CHECKING:
    from pagoda.engine.config import SchedulerConfig

SETPOINT = 0.95  # time budget / target: the steps' spread takes the rest (the slack holds the mean at the budget)
PERIOD = 8  # steps between decisions; the longest duty cycle
WARMUP = 2 * PERIOD  # observations before the first decision
WINDOW = 64  # recent step times the p90 is read from
BAND = 0.15  # feedback's dead band: a p90 in [target·(1 - BAND), target] moves nothing
RAISE = 1.1  # the factor's step up; its steps down are proportional to the overshoot
MOVE = 0.08  # limits' dead band, relative
TTFT_SLACK = 0.25  # how much more than its usual overshoot a late prompt may add to a prefill step, in budgets
FIXED_SHARE = 0.1  # the most of a duty cycle's slack that a prefill step's fixed cost may take (sets k)
BANK = 0.5  # slack kept beyond one prefill step's need, in budgets: noise does not cost a cycle; no hoarding


@dataclass(frozen=True)
class StepLimits:
    """What one step may schedule: the running batch's size and the tokens spent on prompts."""

    max_running: int  # running requests (admission stops at this many; running ones are never cut)
    prefill_budget: int  # prompt tokens (new and continued prefill chunks) of a step that carries prompts
    prefill: bool = True  # False: a decode-only step (it earns slack), unless nothing decodes


class SloController:
    """Moves StepLimits so that the p90 step time, and with it the TPOT, stays under target_tpot_s.

    ``limits`` before each step, ``observe`` after it; times come in as arguments (deterministic). With
    async scheduling ``limits`` of step n+1 comes before ``observe`` of step n: one step may be in flight.
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
        self._fit = StepTimeFit(max_num_seqs, max_num_batched_tokens)
        self._decodes = 0.0  # per step, smoothed over ~PERIOD steps: one finishing request is no news
        self._times: deque[tuple[float, bool]] = deque(maxlen=WINDOW)  # (seconds, requests were queued)
        self._queued = False
        self._steps = 0
        self._factor = 1.0  # the feedback's correction of the time budget
        self._streak = 0  # > 0: decisions in a row under the band; < 0: over the target
        self._pending: tuple[tuple[int, int], int] = ((0, 0), 0)  # proposed moves of (R, P), decisions in a row
        self._limits = StepLimits(max_num_seqs, max_num_batched_tokens)
        self._slack = 0.0  # seconds: sum of (budget - step time), at most _slack_cap
        self._slack_cap = 0.0
        self._in_flight: deque[float] = deque(maxlen=2)  # predicted (step time - budget) of steps not yet observed
        self._since_prefill = 0  # decode-only steps decided since the last step allowed prompts

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
        if self._steps < WARMUP:
            return base
        overshoot = self._overshoot(base.prefill_budget)
        spaced = self._since_prefill + 1 >= self._cycle(self._recent_decodes())  # one per cycle: no two in a window
        prefill = spaced and self._slack - sum(self._in_flight) >= overshoot
        self._in_flight.append(overshoot if prefill else self._overshoot(0))
        self._since_prefill = 0 if prefill else self._since_prefill + 1
        budget = base.prefill_budget
        if self.target_ttft_s is not None:
            urgency = min(1.0, max(0.0, 2 * oldest_wait_s / self.target_ttft_s - 1))
            extra = urgency * TTFT_SLACK * self.time_budget_s / max(self.step_time_model.c, 1e-12)
            budget = int(min(self.max_num_batched_tokens, budget + extra))
        return StepLimits(base.max_running, budget, prefill)

    def observe(self, seconds: float, num_decodes: int, num_prefill_tokens: int,
                device_seconds: float | None = None) -> None:
        """A step ran ``num_decodes`` decodes and ``num_prefill_tokens`` prompt tokens in ``seconds`` (between
        results, on the host: what the slack and the feedback count) and ``device_seconds`` on a GPU (what
        the model is fitted to when given: section 1 of the module docstring)."""
        if self._in_flight:
            self._in_flight.popleft()
        fit_seconds = seconds if device_seconds is None else device_seconds
        if not (0 <= seconds < float("inf") and 0 <= fit_seconds < float("inf")):
            return  # a broken clock must not poison the fit
        self._fit.add(num_decodes, num_prefill_tokens, fit_seconds)
        self._decodes += (num_decodes - self._decodes) / PERIOD
        self._times.append((seconds, self._queued))
        self._slack = min(self._slack_cap, self._slack + self.time_budget_s - seconds)
        self._steps += 1
        if self._steps == WARMUP:  # the maxima were no decision: leave them at once, judge only what follows
            self._fit.solve()
            self._limits = self._split(self.time_budget_s)
            self._times.clear()
            self._slack = 0.0  # the maxima's overshoot is no debt of what follows
        elif self._steps > WARMUP and self._steps % PERIOD == 0:
            self._fit.solve()
            self._feedback()
            self._settle(self._split(self.time_budget_s))
        if self._steps >= WARMUP:
            self._slack_cap = max(0.0, self._overshoot(self._limits.prefill_budget)) + BANK * self.time_budget_s

    def _recent_decodes(self) -> float:
        return min(self._limits.max_running, self._decodes)

    def _overshoot(self, prefill_tokens: int) -> float:
        """Predicted seconds over the budget of a step with the recent decodes and ``prefill_tokens``."""
        return self.step_time_model.predict(self._recent_decodes(), prefill_tokens) - self.time_budget_s

    def _cycle(self, decodes: float) -> int:
        """k: the fewest steps (<= PERIOD) whose earnings beside ``decodes`` pay the fixed cost d with at most
        FIXED_SHARE of them."""
        model = self.step_time_model
        room = self.time_budget_s - model.predict(decodes, 0)
        return PERIOD if room <= 0 else min(PERIOD, max(1, math.ceil(model.d / (FIXED_SHARE * room))))

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
        """R: the most decodes whose decode-only steps earn one smallest prefill step in PERIOD steps; P: what a
        cycle of k steps earns beside the recent decodes, less the fixed cost (section 3 of the docstring)."""
        model = self.step_time_model
        b, c = max(model.b, 1e-12), max(model.c, 1e-12)
        smallest = model.d + c * self.min_prefill_budget
        running = min(self.max_num_seqs, max(1, int((budget_s - model.a - smallest / PERIOD) / b)))
        decodes = min(running, self._decodes)
        room = budget_s - model.predict(decodes, 0)  # what one decode-only step leaves
        budget = min(self.max_num_batched_tokens,
                     max(self.min_prefill_budget, int((self._cycle(decodes) * room - model.d) / c)))
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


def _direction(have: int, want: int, units: int, bounds: tuple[int, int]) -> int:
    """-1, 0 or 1: which way ``want`` lies beyond the dead band (MOVE, plus ``units``) around ``have``.
    A bound is always worth reaching: three short of max_num_seqs for no reason is a loss, not stability."""
    if want == have or (abs(want - have) <= MOVE * have + units and want not in bounds):
        return 0
    return 1 if want > have else -1
