"""A step's duration as a function of what it carries, fitted online: what the SLO controller (engine/slo.py)
plans with.

    t = a + b·decodes + c·prefill_tokens + d·[prefill_tokens > 0]

``d`` is the fixed price of carrying any prompt tokens at all. On a GPU, decode-only steps replay a CUDA graph
while a step with prompt tokens runs eagerly: on an H100 with an 8B model a decode step of a large batch took
8-11 ms and any mixed step at least ~14.5 ms, however few its prompt tokens. Without ``d`` the fit spreads that
price over ``a`` and ``c``, and a controller trusting it asks every step for prompt tokens it cannot afford.

Fit: least squares with forgetting (FORGET per step, to follow a change of cost) and a ridge toward the
previous fit at each solve: when all steps have one shape the data fix only the time at that shape; the other
directions keep what varied steps taught. Features are scaled to about [0, 1] (decodes / max_num_seqs,
prompt tokens / max_num_batched_tokens), so one ridge suits all four.
"""

from __future__ import annotations

from dataclasses import dataclass

FORGET = 0.995  # per step (the model's memory: ~200 steps)
RIDGE = 1.0  # pull toward the previous fit at each solve, in steps' worth of evidence


@dataclass(frozen=True)
class StepTimeModel:
    """A step's predicted duration in seconds (all coefficients >= 0)."""

    a: float  # every step
    b: float  # per decode
    c: float  # per prompt token
    d: float = 0.0  # once, when the step carries any prompt tokens

    def predict(self, decodes: float, prefill_tokens: float) -> float:
        return self.a + self.b * decodes + self.c * prefill_tokens + (self.d if prefill_tokens > 0 else 0.0)


class StepTimeFit:
    """Accumulates (decodes, prefill_tokens, seconds) with forgetting; ``solve`` refreshes ``model``."""

    def __init__(self, max_decodes: int, max_tokens: int) -> None:
        self.scales = (1.0, float(max_decodes), float(max_tokens), 1.0)
        self.xx = [[0.0] * 4 for _ in range(4)]
        self.xt = [0.0] * 4
        self.theta = [0.0] * 4
        self.model = StepTimeModel(0.0, 0.0, 0.0, 0.0)

    def add(self, decodes: int, prefill_tokens: int, seconds: float) -> None:
        x = (1.0, decodes / self.scales[1], prefill_tokens / self.scales[2], float(prefill_tokens > 0))
        for i in range(4):
            self.xt[i] = FORGET * self.xt[i] + x[i] * seconds
            for j in range(4):
                self.xx[i][j] = FORGET * self.xx[i][j] + x[i] * x[j]

    def solve(self) -> None:
        """Call at decisions only: a step costs the host a few sums, not a solve."""
        m = [[v + RIDGE * (i == j) for j, v in enumerate(row)] for i, row in enumerate(self.xx)]
        self.theta = _solve(m, [v + RIDGE * t for v, t in zip(self.xt, self.theta)])
        self.model = StepTimeModel(*(max(v, 0.0) / s for v, s in zip(self.theta, self.scales)))


def _solve(m: list[list[float]], y: list[float]) -> list[float]:
    """Gaussian elimination; the ridge keeps ``m`` symmetric positive definite, so no pivot is ever ~0."""
    n = len(y)
    a = [row[:] + [v] for row, v in zip(m, y)]  # augmented (n, n + 1)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        a[col], a[pivot] = a[pivot], a[col]
        for r in range(col + 1, n):
            f = a[r][col] / a[col][col]
            a[r] = [x - f * p for x, p in zip(a[r], a[col])]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (a[r][n] - sum(a[r][j] * out[j] for j in range(r + 1, n))) / a[r][r]
    return out
