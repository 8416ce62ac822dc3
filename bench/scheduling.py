"""Scheduling for latency targets at saturation: FCFS, FCFS with a fixed batch cap, priority (with
preemption) and priority with the SLO controller, on the same seeded open-loop request list in one run;
then two tenants of weights 1:3 under the fair-share policy.

    python -m bench.scheduling                                  # CPU: embedded SmolLM2, ~5 minutes on 2 cores
    python -m bench.scheduling --shape llama-3.1-8b             # GPU: random-weight 8B, 512-ish prompts, ~8 min
    python -m bench.scheduling --systems fcfs priority --duration-s 20 --rate-factor 1.5

Workload. Requests arrive by a seeded Poisson process for ``--duration-s`` (30) seconds; 20%
are high priority (``--high-priority``, default -1; the rest have the default priority 0; lower runs
first) and each belongs to tenant "a" or "b" at random. Lengths are mixed around a scale P, O
(``--prompt-len``, ``--max-tokens``; CPU 32, 16; GPU 512, 128): 75% short (prompt uniform in [P/4, P],
output in [O/2, O]), 25% long ([P, 2P], [O, 2O]); EOS is ignored. One process holds the engine and the
driver: before each ``step()`` the driver adds every request whose arrival time has passed (with that
arrival time), so the load is open-loop and a step's duration delays arrivals as it would in a server.
After the arrivals a system runs until its queue drains, for at most ``--drain-s`` (default: the
duration) more; what is left then is aborted (the ``finished`` column; requests with no token are left
out of the latency percentiles and count as missed in goodput).

Calibration (the engine config of ``fcfs``, before the systems): the decode step at batch 1, 2, 4, ...
``--max-num-seqs``; the idle TTFT of a 2P-token prompt, hence the prefill cost per token; the saturated
throughput (a closed loop keeping 2 x max_num_seqs requests in the engine for ``--calib-s``). From it:
- request rate = ``--rate-factor`` x saturated output tokens/s / mean output length (1.3: the queue grows);
- TPOT target = ``--tpot-factor`` x the batch-1 decode step (CPU 3: decode there is compute-bound and every
  request in the batch adds ~5% of a batch-1 step; GPU 2); TTFT target = ``--ttft-factor`` (5) x the idle
  TTFT of the 2P-token prompt; or ``--target-tpot-ms``, ``--target-ttft-ms``;
- ``fcfs-cap``'s max_num_seqs (``--cap``): the largest batch B whose predicted mean step at saturation, the
  decode step at B plus B x mean prompt / mean output prompt tokens at the prefill cost, is <= 0.8 x the TPOT
  target: the fixed cap whose TPOT p90 lands near the target.

Systems: ``fcfs`` (max_num_seqs), ``fcfs-cap``, ``priority`` (high priority is admitted first and preempts
low priority), ``priority+slo`` (``priority`` with target_tpot_ms and target_ttft_ms: the SLO controller
moves max_running and the prefill budget), ``fair`` (the tenants run: tenants "a" and "b" of one
priority with weights 1 and 3, each offered ``--rate-factor`` x capacity on its own, so that both stay
backlogged; aborted at the end of the arrivals, no drain). ``--aging-steps`` sets the engine's aging.

Reading the result (bench/results/<name>.json|md|png):
- table: per system and class (all, high, low; per tenant for ``fair``, and for every system in the JSON):
  TTFT p50/p99, TPOT p50/p90 (a request's TPOT is its mean time between tokens), goodput (share of requests
  finished with TTFT and TPOT within the targets, and per second), output tokens/s over the run. At
  saturation FCFS's TTFT grows with the queue for everyone; priority should keep high priority's TTFT near
  the idle one while low priority takes the queue; the SLO controller should hold TPOT p90 near its target.
- checks, each a boolean with its number: high-priority TTFT p99 <= 1/3 of low priority's (same system)
  and <= 1/2 of what FCFS gives the same requests; priority+slo's TPOT p90 <= the target, over all requests
  and over those arriving after the first quarter (the controller starts at the maxima); its output tokens/s
  >= 85% of fcfs-cap's (the fixed batch cap chosen for the same target: the throughput to keep); the SLO limits do
  not oscillate (direction changes of max_running and of prefill_budget <= 5 per 100 steps while the
  arrivals last); the tenants' tokens served (prompt + output, from a quarter of the arrivals to their end;
  the share of steps with both tenants queued is printed) within 10% of 1:3.
- plot: TTFT CDF per class and system, TPOT CDF, goodput; priority+slo's max_running, prefill_budget and
  step time over time (hysteresis: flat stretches, few reversals); the tenants' cumulative tokens.
Aging: a waiting request gains a priority level every ``aging_steps`` (engine default 1000) steps, so once
the queue wait passes gap x aging_steps steps (gap: low minus high priority, 1 by default), old
low-priority requests rank with new high-priority ones: where the queue wait is that long (a system
that serves less than the offered load, e.g. one held to a tight TPOT target), high priority's lead is
bounded by those steps. ``--aging-steps`` or ``--high-priority`` tell this apart from the rest.
With few high-priority requests (CPU: ~25 in 30 s) a p99 is close to the maximum; a longer run steadies it.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from bench.report import environment, write_report
from bench.scheduling_report import plot, row, table
from bench.scheduling_workload import (
    Lengths,
    Targets,
    Window,
    calibrate,
    choose_cap,
    drive,
    groups,
    make_engine,
    merge,
    per_request,
    poisson_requests,
    summarize,
    thin,
    warm_up,
)

RESULTS = Path(__file__).parent / "results"
SYSTEMS = ("fcfs", "fcfs-cap", "priority", "priority+slo", "fair")
TENANT_WEIGHTS = {"a": 1.0, "b": 3.0}
HIGH_SHARE = 0.2
CAP_MARGIN = 0.8  # fcfs-cap: predicted mean step <= this share of the TPOT target (its p90 then lands near it)
SERIES_POINTS = 2000  # steps kept per system in the JSON
MAX_REVERSALS_PER_100 = 5.0  # SLO limits: at least 20 steps between direction changes, on average
DEFAULTS = {  # (CPU embedded model, --shape on a GPU)
    "prompt_len": (32, 512), "max_tokens": (16, 128), "max_num_seqs": (16, 128),
    "max_num_batched_tokens": (256, 2048), "duration_s": (30.0, 30.0), "calib_s": (15.0, 15.0),
    "tpot_factor": (3.0, 2.0),  # CPU decode is compute-bound: each request in the batch costs ~5% of batch 1
}


# ---- engines ------------------------------------------------------------------------------------------


def base_engine(args) -> tuple[dict, int]:
    """(engine kwargs shared by every system, vocab size)."""
    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import load_hf_config, resolve_model

    if args.shape:
        from bench.random_models import make_random_model

        path = make_random_model(args.shape, args.model_dir / args.shape)
    else:
        path = resolve_model(args.model or EMBEDDED_MODEL)
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"model": str(path), "device": device, "dtype": "bfloat16" if device == "cuda" else "float32",
              "max_model_len": args.lengths.max_total + 16, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens}
    if args.aging_steps is not None:
        kwargs["aging_steps"] = args.aging_steps
    if args.sync_scheduling:
        kwargs["async_scheduling"] = False
    return kwargs, load_hf_config(path).vocab_size


def system_engine(system: str, base: dict, cap: int, targets: Targets) -> dict:
    return base | {
        "fcfs": {"policy": "fcfs"},
        "fcfs-cap": {"policy": "fcfs", "max_num_seqs": cap},
        "priority": {"policy": "priority"},
        "priority+slo": {"policy": "priority", "target_tpot_ms": targets.tpot_ms, "target_ttft_ms": targets.ttft_ms},
        "fair": {"policy": "fair", "tenant_weights": TENANT_WEIGHTS},
    }[system]


# ---- one system ---------------------------------------------------------------------------------------


def run_system(spec: dict) -> dict:
    """Build the system's engine, warm it up, drive the request list; summaries, step series, per request."""
    lengths, targets = Lengths(**spec["lengths"]), Targets(**spec["targets"])
    requests = _requests(spec)
    engine = make_engine(spec["engine"])
    warm_up(engine, lengths, spec["vocab"])
    run = drive(engine, requests, spec["stop_s"])
    preemptions = engine.stats().num_preemptions
    slo = engine.scheduler.slo
    fit = None if slo is None else {f"{k}_ms": round(1000 * v, 5) for k, v in vars(slo.step_time_model).items()}
    engine.shutdown()
    del engine
    gc.collect()
    rows = [{"system": spec["system"], "class": name, **summarize(recs, run.wall_s, targets)}
            for name, recs in groups(run.records).items()]
    rows[0]["preemptions"] = preemptions  # the "all" row
    return {"system": spec["system"], "engine": spec["engine"], "offered": len(requests), "aborted": run.aborted,
            "wall_s": run.wall_s, "preemptions": preemptions, "step_time_model": fit, "rows": rows, "series": run.series,
            "requests": per_request(run.records)}


def _requests(spec: dict):
    """The seeded request list: one stream for the priority systems, one per tenant for ``fair``."""
    lengths, w = Lengths(**spec["lengths"]), spec["workload"]
    if spec["system"] != "fair":
        return poisson_requests(w["rate"], w["duration_s"], lengths, spec["vocab"], w["seed"], HIGH_SHARE, ("a", "b"),
                                high=w["high_priority"])
    return merge(*(poisson_requests(w["rate"], w["duration_s"], lengths, spec["vocab"], w["seed"] + 1 + i, 0.0,
                                    (tenant,), prefix=f"{tenant}-") for i, tenant in enumerate(TENANT_WEIGHTS)))


def _call(fn, arg, isolate: bool):
    """``fn(arg)``, in a fresh process when ``isolate`` (a GPU engine's memory goes with its process)."""
    if not isolate:
        return fn(arg)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, (arg,))


# ---- checks -------------------------------------------------------------------------------------------


def _ratio(a, b):
    return None if a is None or not b else a / b


def checks(result: dict) -> list[dict]:
    """The issue's targets, each as value <= limit (see the docstring); a check whose systems did not run is left out."""
    out = []

    def check(name: str, value, limit: float, floor: bool = False) -> None:
        """``value`` <= ``limit``; with ``floor``, ``value`` >= ``limit``."""
        if value is not None:
            out.append({"check": name, "value": value, "limit": f">= {limit}" if floor else limit,
                        "ok": bool(value >= limit if floor else value <= limit)})

    fcfs_high = row(result, "fcfs", "high")
    for system in ("priority", "priority+slo"):
        high, low = row(result, system, "high"), row(result, system, "low")
        if high and low:
            check(f"{system}: high TTFT p99 / low TTFT p99", _ratio(high["ttft_p99_ms"], low["ttft_p99_ms"]), 1 / 3)
        if high and fcfs_high:
            check(f"{system}: high TTFT p99 / fcfs high TTFT p99",
                  _ratio(high["ttft_p99_ms"], fcfs_high["ttft_p99_ms"]), 1 / 2)
    slo = result["systems"].get("priority+slo")
    if slo:
        target = result["targets"]["tpot_ms"]
        check("priority+slo: TPOT p90 / target", _ratio(row(result, "priority+slo", "all")["tpot_p90_ms"], target), 1.0)
        cap = row(result, "fcfs-cap", "all")  # the fixed batch cap chosen for the target: the throughput to keep
        if cap:
            check("priority+slo: output tok/s / fcfs-cap's", _ratio(row(result, "priority+slo", "all")["output_tok_s"],
                                                                     cap["output_tok_s"]), 0.85, floor=True)
        late = [t for t, a in zip(slo["requests"]["tpot_ms"], slo["requests"]["arrival_s"])
                if t is not None and a >= result["config"]["duration_s"] / 4]  # after the controller's first steps
        if late:
            check("priority+slo: TPOT p90 / target, arrivals after the first quarter",
                  float(np.percentile(late, 90)) / target, 1.0)
        for limit in ("max_running", "prefill_budget"):
            check(f"priority+slo: {limit} reversals per 100 steps",
                  reversals_per_100(slo["series"], limit, result["config"]["duration_s"]), MAX_REVERSALS_PER_100)
    tenants = result.get("tenants")
    if tenants and tenants["ratio"] is not None:
        check("fair: tokens b/a over 3, distance from 1", abs(tenants["ratio"] / 3 - 1), 0.1)
    return out


def reversals_per_100(series: dict, key: str, until_s: float) -> float | None:
    """Direction changes of a limit per 100 steps, over the steps while arrivals last."""
    values = [v for t, v in zip(series["t_s"], series[key]) if t <= until_s]
    moves = np.sign(np.diff(values))
    moves = moves[moves != 0]
    return 100 * int(np.sum(moves[1:] != moves[:-1])) / len(values) if values else None


def tenant_summary(fair: dict, duration_s: float) -> dict:
    window = Window.of(fair["series"], duration_s / 4, duration_s)
    a, b = (window.tokens.get(t) for t in TENANT_WEIGHTS)
    return {"weights": TENANT_WEIGHTS, "window_s": [window.start_s, window.end_s], "tokens": window.tokens,
            "ratio": _ratio(b, a), "target_ratio": TENANT_WEIGHTS["b"] / TENANT_WEIGHTS["a"],
            "saturated_share": window.saturated_share}


# ---- report -------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help="random-weight model of this shape (bench/random_models.py); "
                                                 "default: the embedded model on CPU")
    p.add_argument("--model", default=None, help="a model folder instead (default: the embedded model)")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--duration-s", type=float, default=None, help="arrivals last this long (30)")
    p.add_argument("--drain-s", type=float, default=None, help="most time after the arrivals (default: the duration)")
    p.add_argument("--rate-factor", type=float, default=1.3, help="offered request rate over the calibrated capacity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--high-priority", type=int, default=-1, help="priority of high-priority requests (low: 0)")
    p.add_argument("--aging-steps", type=int, default=None, help="the engine's aging_steps (default: its default)")
    p.add_argument("--sync-scheduling", action="store_true", help="every system with async_scheduling off (a step's "
                   "result is taken before the next is launched, so each step's measured time is its own)")
    p.add_argument("--prompt-len", type=int, default=None, help="length scale P (CPU 32, GPU 512)")
    p.add_argument("--max-tokens", type=int, default=None, help="output scale O (CPU 16, GPU 128)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="CPU 16, GPU 128")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="CPU 256, GPU 2048")
    p.add_argument("--calib-s", type=float, default=None, help="saturated-throughput calibration (15)")
    p.add_argument("--tpot-factor", type=float, default=None, help="TPOT target over the batch-1 decode step "
                                                                   "(CPU 3, GPU 2)")
    p.add_argument("--ttft-factor", type=float, default=5.0, help="TTFT target over a 2P-token prompt's idle TTFT")
    p.add_argument("--target-tpot-ms", type=float, default=None)
    p.add_argument("--target-ttft-ms", type=float, default=None)
    p.add_argument("--cap", type=int, default=None, help="fcfs-cap's max_num_seqs (default: from calibration)")
    p.add_argument("--isolate", choices=["auto", "on", "off"], default="auto",
                   help="each system in its own process (auto: on with --shape, so GPU memory is freed)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--name", default=None)
    args = p.parse_args(argv)
    gpu = int(args.shape is not None)
    for key, values in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, values[gpu])
    args.drain_s = args.duration_s if args.drain_s is None else args.drain_s
    args.lengths = Lengths(args.prompt_len, args.max_tokens)
    return args


def main(argv=None) -> None:
    args = parse(argv)
    isolate = args.isolate == "on" or (args.isolate == "auto" and args.shape is not None)
    started = time.monotonic()
    base, vocab = base_engine(args)
    cal = _call(_calibrate_spec, {"engine": base | {"policy": "fcfs"}, "lengths": vars(args.lengths), "vocab": vocab,
                                  "seed": args.seed, "calib_s": args.calib_s}, isolate)
    cal["decode_step_ms"] = {int(k): v for k, v in cal["decode_step_ms"].items()}
    targets = Targets(args.target_ttft_ms or args.ttft_factor * cal["longest_prompt_ttft_ms"],
                      args.target_tpot_ms or args.tpot_factor * cal["decode_step_ms"][1])
    cap = args.cap or choose_cap(cal, args.lengths, CAP_MARGIN * targets.tpot_ms, args.max_num_seqs)
    rate = args.rate_factor * cal["capacity_rps"]
    print(json.dumps({"calibration": cal, "targets": vars(targets), "fcfs_cap": cap, "rate_rps": rate}), flush=True)
    systems = {}
    for system in args.systems:
        spec = {"system": system, "engine": system_engine(system, base, cap, targets), "vocab": vocab,
                "lengths": vars(args.lengths), "targets": vars(targets),
                "stop_s": args.duration_s + (0.0 if system == "fair" else args.drain_s),
                "workload": {"rate": rate, "duration_s": args.duration_s, "seed": args.seed,
                             "high_priority": args.high_priority}}
        systems[system] = _call(run_system, spec, isolate)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in systems[system]["rows"][0].items()}
                         | {"step_time_model": systems[system]["step_time_model"]}), flush=True)
    name = args.name or f"scheduling_{args.shape or 'cpu'}"
    result = {
        "benchmark": name, "environment": environment(),
        "config": {"model_name": model_name(args), "engine": base, "lengths": vars(args.lengths),
                   "high_share": HIGH_SHARE, "priorities": {"high": args.high_priority, "low": 0}, "duration_s": args.duration_s,
                   "drain_s": args.drain_s, "rate_factor": args.rate_factor, "seed": args.seed, "systems": args.systems,
                   "tpot_factor": args.tpot_factor, "ttft_factor": args.ttft_factor, "cap_margin": CAP_MARGIN},
        "calibration": cal, "targets": vars(targets) | {
            "rule": "TPOT = tpot_factor x batch-1 decode step; TTFT = ttft_factor x idle TTFT of a 2P-token prompt"},
        "fcfs_cap": cap, "rate_rps": rate, "systems": systems,
        "rows": [r for s in systems.values() for r in s["rows"]],
    }
    if "fair" in systems:
        result["tenants"] = tenant_summary(systems["fair"], args.duration_s)
    result["checks"] = checks(result)  # from every step; the JSON keeps fewer
    for system in systems.values():
        system["series"] = thin(system["series"], SERIES_POINTS)
    result["runtime_s"] = time.monotonic() - started
    write_report(args.out, name, result, table(result), lambda png: plot(result, png))
    print(f"runtime {result['runtime_s']:.0f} s")


def model_name(args) -> str:
    return args.shape or (Path(args.model).name if args.model else "SmolLM2-135M-Instruct (embedded, float32)")


def _calibrate_spec(spec: dict) -> dict:
    return calibrate(spec["engine"], Lengths(**spec["lengths"]), spec["vocab"], spec["seed"], spec["calib_s"])


if __name__ == "__main__":
    main()
