"""The open-loop workload of ``bench.scheduling``: seeded Poisson request lists, the driver that feeds
them to an in-process ``LLMEngine`` as they arrive and steps it, the calibration that sets the rate and
the targets, and the per-request summaries.

Times are seconds from the run's start (``t0``, ``time.monotonic()``); a request's arrival is given to
the engine as ``t0 + arrival_s``, so FCFS order and the engine's waiting times use the true arrival,
not the moment the driver got round to adding it. A token's time is when ``step()`` handed it out.
"""

from __future__ import annotations

import itertools
import random
import statistics
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

LOW = 0  # low-priority traffic has the default priority; high-priority traffic a negative one (lower runs first)
TOKEN_LO = 100  # prompt ids are drawn from [TOKEN_LO, vocab): clear of every special token


@dataclass(frozen=True)
class Lengths:
    """Mixed prompt and output lengths around a scale: a ``long_share`` of requests is long."""

    prompt: int  # short prompts are uniform in [prompt / 4, prompt], long ones in [prompt, 2 prompt]
    output: int  # short outputs are uniform in [output / 2, output], long ones in [output, 2 output]
    long_share: float = 0.25

    def draw(self, rng: random.Random) -> tuple[int, int]:
        if rng.random() < self.long_share:
            return rng.randint(self.prompt, 2 * self.prompt), rng.randint(self.output, 2 * self.output)
        return rng.randint(max(1, self.prompt // 4), self.prompt), rng.randint(max(2, self.output // 2), self.output)

    @property
    def mean_prompt(self) -> float:
        return (1 - self.long_share) * (max(1, self.prompt // 4) + self.prompt) / 2 + self.long_share * 1.5 * self.prompt

    @property
    def mean_output(self) -> float:
        short = (max(2, self.output // 2) + self.output) / 2
        return (1 - self.long_share) * short + self.long_share * 1.5 * self.output

    @property
    def max_total(self) -> int:
        return 2 * self.prompt + 2 * self.output


@dataclass(frozen=True)
class BenchRequest:
    request_id: str
    arrival_s: float  # from the run's start
    prompt: list[int]
    max_tokens: int  # EOS is ignored: exactly this many output tokens
    priority: int  # LOW, or the high-priority value (< LOW)
    tenant: str

    @property
    def cls(self) -> str:
        return "high" if self.priority < LOW else "low"


def request_stream(rate: float, lengths: Lengths, vocab: int, seed: int, high_share: float,
                   tenants: tuple[str, ...], prefix: str = "r", high: int = -1) -> Iterator[BenchRequest]:
    """Endless arrivals of a Poisson process of ``rate`` per second; each request has priority ``high`` with
    probability ``high_share`` (else LOW) and belongs to a tenant drawn uniformly from ``tenants``."""
    rng = random.Random(seed)
    t = 0.0
    for i in itertools.count():
        t += rng.expovariate(rate)
        prompt_len, max_tokens = lengths.draw(rng)
        priority = high if rng.random() < high_share else LOW
        tenant = tenants[rng.randrange(len(tenants))]
        prompt = [rng.randrange(TOKEN_LO, vocab) for _ in range(prompt_len)]
        yield BenchRequest(f"{prefix}{i}", t, prompt, max_tokens, priority, tenant)


def poisson_requests(rate: float, duration_s: float, lengths: Lengths, vocab: int, seed: int, high_share: float,
                     tenants: tuple[str, ...], prefix: str = "r", high: int = -1) -> list[BenchRequest]:
    """The arrivals of ``request_stream`` before ``duration_s``."""
    stream = request_stream(rate, lengths, vocab, seed, high_share, tenants, prefix, high)
    return list(itertools.takewhile(lambda r: r.arrival_s < duration_s, stream))


def merge(*streams: list[BenchRequest]) -> list[BenchRequest]:
    return sorted((r for s in streams for r in s), key=lambda r: r.arrival_s)


# ---- the driver ---------------------------------------------------------------------------------------


@dataclass
class Record:
    """What one request got: token times are seconds from the run's start."""

    request: BenchRequest
    first_s: float | None = None
    last_s: float | None = None
    tokens: int = 0
    finished: bool = False


SERIES = ("t_s", "step_ms", "num_running", "num_waiting", "max_running", "prefill_budget", "preemptions",
          "kv_usage")


@dataclass
class Run:
    records: list[Record]
    series: dict  # SERIES -> per-step values, plus "queued" and "served": tenant -> per-step values
    wall_s: float  # start to the last step
    aborted: int  # requests still unfinished at the stop time (aborted there)


def add(engine, r: BenchRequest, t0: float) -> None:
    from pagoda import SamplingParams
    from pagoda.engine.output_processor import OutputKind

    params = SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0)
    engine.add_request(r.request_id, {"prompt_token_ids": r.prompt}, params, priority=r.priority,
                       arrival_time=t0 + r.arrival_s, output_kind=OutputKind.DELTA, tenant=r.tenant)


def drive(engine, requests: list[BenchRequest], stop_s: float) -> Run:
    """Add each request when its arrival time has come, step the engine while it has work, sleep while it has
    none; at ``stop_s`` abort what is unfinished. Per step: the engine's stats, per tenant the requests queued
    (arrived, no token yet) and the tokens served (prompt tokens counted at the first token)."""
    records = {r.request_id: Record(r) for r in requests}
    tenants = sorted({r.tenant for r in requests})
    queued, served = dict.fromkeys(tenants, 0), dict.fromkeys(tenants, 0)
    series: dict = {k: [] for k in SERIES} | {"queued": {t: [] for t in tenants}, "served": {t: [] for t in tenants}}
    pending = deque(sorted(requests, key=lambda r: r.arrival_s))
    t0 = time.monotonic()
    now = 0.0
    while (pending or engine.has_unfinished_requests()) and now < stop_s:
        while pending and pending[0].arrival_s <= now:
            r = pending.popleft()
            add(engine, r, t0)
            queued[r.tenant] += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, min(pending[0].arrival_s, stop_s) - now))
            now = time.monotonic() - t0
            continue
        start = time.monotonic()
        outputs = engine.step()
        now = time.monotonic() - t0
        for out in outputs:
            rec = records[out.request_id]
            n = len(out.outputs[0].token_ids)
            if n and rec.first_s is None:
                rec.first_s = now
                queued[rec.request.tenant] -= 1
                served[rec.request.tenant] += len(rec.request.prompt)
            if n:
                rec.last_s, rec.tokens = now, rec.tokens + n
                served[rec.request.tenant] += n
            rec.finished = rec.finished or out.finished
        _record_step(series, engine.stats(), now, 1000 * (time.monotonic() - start), queued, served)
    unfinished = [rid for rid, rec in records.items() if not rec.finished]
    engine.abort_request(unfinished)  # unknown (never added) ids are ignored
    while engine.has_unfinished_requests():  # take the step still in flight
        engine.step()
    return Run(list(records.values()), series, now, len(unfinished))


def _record_step(series: dict, stats, now: float, step_ms: float, queued: dict, served: dict) -> None:
    for key, value in (("t_s", round(now, 4)), ("step_ms", round(step_ms, 3)), ("num_running", stats.num_running),
                       ("num_waiting", stats.num_waiting), ("max_running", stats.max_running),
                       ("prefill_budget", stats.prefill_budget), ("preemptions", stats.num_preemptions),
                       ("kv_usage", round(stats.kv_cache_usage, 4))):
        series[key].append(value)
    for tenant, n in queued.items():
        series["queued"][tenant].append(n)
        series["served"][tenant].append(served[tenant])


def thin(series: dict, most: int) -> dict:
    """Every k-th step (and the last) so that at most about ``most`` remain: for the JSON and the plot."""
    n = len(series["t_s"])
    keep = list(range(0, n, max(1, -(-n // most))))
    if n and keep[-1] != n - 1:
        keep.append(n - 1)

    def pick(v):
        return {k: pick(x) for k, x in v.items()} if isinstance(v, dict) else [v[i] for i in keep]

    return pick(series)


# ---- calibration --------------------------------------------------------------------------------------


def make_engine(kwargs: dict):
    from pagoda.engine.llm_engine import LLMEngine

    return LLMEngine.from_kwargs(**kwargs)


def _run_to_end(engine, requests, t0: float) -> dict[str, list[float]]:
    """Add ``requests`` now and step until all finish; request id -> times of its tokens (from ``t0``)."""
    for r in requests:
        add(engine, r, t0)
    stamps: dict[str, list[float]] = {r.request_id: [] for r in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps[out.request_id] += [time.monotonic() - t0] * len(out.outputs[0].token_ids)
    return stamps


def warm_up(engine, lengths: Lengths, vocab: int) -> None:
    stream = request_stream(1.0, lengths, vocab, seed=999, high_share=0.0, tenants=("warm",), prefix="warm")
    _run_to_end(engine, list(itertools.islice(stream, 4)), time.monotonic())


def calibrate(kwargs: dict, lengths: Lengths, vocab: int, seed: int, calib_s: float) -> dict:
    """Decode step per batch size, a 2P-token prompt's idle TTFT, saturated output tokens/s (bench/scheduling.py)."""
    engine = make_engine(kwargs)
    warm_up(engine, lengths, vocab)
    rng = random.Random(seed + 1)

    def req(tag: str, prompt_len: int, max_tokens: int) -> BenchRequest:
        return BenchRequest(tag, 0.0, [rng.randrange(TOKEN_LO, vocab) for _ in range(prompt_len)], max_tokens, 0, "cal")

    step_ms = {}
    for batch in _batch_sizes(kwargs["max_num_seqs"]):
        stamps = _run_to_end(engine, [req(f"b{batch}-{i}", 16, 12) for i in range(batch)], time.monotonic())
        gaps = [b - a for s in stamps.values() for a, b in itertools.pairwise(s[2:])]  # steady decode
        step_ms[batch] = 1000 * statistics.median(gaps)
    ttft = []
    for i in range(3):
        t0 = time.monotonic()
        ttft.append(1000 * _run_to_end(engine, [req(f"long{i}", 2 * lengths.prompt, 1)], t0)[f"long{i}"][0])
    tok_s = _saturated_tok_s(engine, lengths, vocab, seed + 2, calib_s, 2 * kwargs["max_num_seqs"])
    engine.shutdown()
    ttft_ms = statistics.median(ttft)
    return {"decode_step_ms": step_ms, "longest_prompt_ttft_ms": ttft_ms,
            "prefill_ms_per_token": max(0.0, ttft_ms - step_ms[1]) / (2 * lengths.prompt),
            "saturated_output_tok_s": tok_s, "capacity_rps": tok_s / lengths.mean_output,
            "mean_output_len": lengths.mean_output}


def _batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1]
    while sizes[-1] * 2 < max_num_seqs:
        sizes.append(sizes[-1] * 2)
    return sizes + ([max_num_seqs] if max_num_seqs > 1 else [])


def _saturated_tok_s(engine, lengths: Lengths, vocab: int, seed: int, seconds: float, depth: int) -> float:
    """Output tokens/s over the last two thirds of ``seconds`` with ``depth`` requests always in the engine."""
    supply = request_stream(1.0, lengths, vocab, seed, 0.0, ("cal",), prefix="sat")
    t0, live, counted = time.monotonic(), set(), 0
    while (now := time.monotonic() - t0) < seconds:
        while len(live) < depth:
            r = next(supply)
            add(engine, r, time.monotonic())
            live.add(r.request_id)
        for out in engine.step():
            counted += len(out.outputs[0].token_ids) if now >= seconds / 3 else 0
            if out.finished:
                live.discard(out.request_id)
    engine.abort_request(list(live))
    while engine.has_unfinished_requests():
        engine.step()
    return counted / (time.monotonic() - t0 - seconds / 3)


def choose_cap(cal: dict, lengths: Lengths, step_ms_limit: float, max_num_seqs: int) -> int:
    """The largest batch whose predicted mean step at saturation is <= ``step_ms_limit``: the decode step at
    that batch (interpolated between the measured sizes) plus its share of prompt work, B x mean prompt / mean
    output tokens per step at the idle prefill cost per token."""
    step_ms = cal["decode_step_ms"]
    sizes = np.arange(1, max_num_seqs + 1)
    decode = np.interp(sizes, sorted(step_ms), [step_ms[b] for b in sorted(step_ms)])
    prefill = cal["prefill_ms_per_token"] * sizes * lengths.mean_prompt / lengths.mean_output
    fits = np.flatnonzero(decode + prefill <= step_ms_limit)
    return int(fits[-1]) + 1 if len(fits) else 1


# ---- summaries ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Targets:
    ttft_ms: float
    tpot_ms: float


def ttft_ms(rec: Record) -> float | None:
    return None if rec.first_s is None else 1000 * (rec.first_s - rec.request.arrival_s)


def tpot_ms(rec: Record) -> float | None:
    """Mean time between output tokens after the first (None with fewer than two)."""
    return None if rec.tokens < 2 else 1000 * (rec.last_s - rec.first_s) / (rec.tokens - 1)


def is_good(rec: Record, targets: Targets) -> bool:
    """Finished within both targets: TTFT and mean TPOT."""
    ttft, tpot = ttft_ms(rec), tpot_ms(rec)
    return rec.finished and ttft is not None and ttft <= targets.ttft_ms and (tpot is None or tpot <= targets.tpot_ms)


def summarize(records: list[Record], wall_s: float, targets: Targets) -> dict:
    """Latency percentiles (over requests that got tokens), goodput (share of all requests, and per second),
    output tokens per second over the run."""

    def pct(values: list[float], q: float) -> float | None:
        return float(np.percentile(values, q)) if values else None

    ttft = [v for v in map(ttft_ms, records) if v is not None]
    tpot = [v for v in map(tpot_ms, records) if v is not None]
    e2e = [1000 * (r.last_s - r.request.arrival_s) for r in records if r.finished]
    good = sum(is_good(r, targets) for r in records)
    return {"requests": len(records), "finished": sum(r.finished for r in records),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "tpot_p50_ms": pct(tpot, 50),
            "tpot_p90_ms": pct(tpot, 90), "e2e_p50_ms": pct(e2e, 50), "e2e_p99_ms": pct(e2e, 99),
            "goodput": good / len(records) if records else None, "goodput_rps": good / wall_s,
            "output_tokens": sum(r.tokens for r in records), "output_tok_s": sum(r.tokens for r in records) / wall_s}


def groups(records: list[Record]) -> dict[str, list[Record]]:
    """"all", each priority class present, each tenant ("tenant a")."""
    out = {"all": records}
    for name in ("high", "low"):
        mine = [r for r in records if r.request.cls == name]
        if mine:
            out[name] = mine
    for tenant in sorted({r.request.tenant for r in records}):
        out[f"tenant {tenant}"] = [r for r in records if r.request.tenant == tenant]
    return out


def per_request(records: list[Record]) -> dict:
    """Columns for the JSON (and the CDF plot): one entry per request, times in ms."""

    def r3(v):
        return None if v is None else round(v, 3)

    return {"id": [r.request.request_id for r in records], "class": [r.request.cls for r in records],
            "tenant": [r.request.tenant for r in records], "arrival_s": [round(r.request.arrival_s, 4) for r in records],
            "prompt_len": [len(r.request.prompt) for r in records], "max_tokens": [r.request.max_tokens for r in records],
            "tokens": [r.tokens for r in records], "finished": [r.finished for r in records],
            "ttft_ms": [r3(ttft_ms(r)) for r in records], "tpot_ms": [r3(tpot_ms(r)) for r in records]}


@dataclass
class Window:
    """Tokens served per tenant between two times of a run (from the per-step cumulative counts)."""

    start_s: float
    end_s: float
    tokens: dict[str, int] = field(default_factory=dict)
    saturated_share: float = 0.0  # share of the window's steps at which every tenant had a request queued

    @classmethod
    def of(cls, series: dict, start_s: float, end_s: float) -> Window:
        t = np.asarray(series["t_s"])
        inside = np.flatnonzero((t >= start_s) & (t <= end_s))
        if len(inside) < 2:
            return cls(start_s, end_s)
        lo, hi = inside[0], inside[-1]
        tokens = {k: v[hi] - v[lo] for k, v in series["served"].items()}
        busy = np.all([np.asarray(q)[inside] > 0 for q in series["queued"].values()], axis=0)
        return cls(float(t[lo]), float(t[hi]), tokens, float(busy.mean()))
