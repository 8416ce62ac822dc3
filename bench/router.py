"""Routing policies compared: pagoda's KV-occupancy router vs power-of-two-choices vs round robin.

Two modes, one workload shape (seeded, skewed): a Poisson stream of
- *long* requests (15%): long unique prompts and long outputs — they fill a replica's KV cache;
- *shared* requests (~60%): one of many system prompts (Zipf popularity) + a short user turn;
- *short* requests (the rest): short unique prompts.

``sim`` (default) runs ``bench.router_sim`` — N replicas with pagoda's real scheduler and KV cache
manager and a GPU-like step-time model — over a sweep of arrival rates, and reports p50/p99 TTFT,
preemptions and prefix-cache hit rate per policy. The pagoda router there is the same
``pagoda.cluster.routing_policy.rank`` the Serve router calls.

``real`` runs a small version of the workload against a local Ray cluster with 2 CPU replicas of
the embedded model, once with ``router.policy: pagoda`` and once with ``pow2`` (Ray Serve's
default router), and reports the same numbers measured by the client.

    python -m bench.router                 # sim: bench/results/router_sim.{json,md,png}
    python -m bench.router --mode real     # real: bench/results/router_real.{json,md,png}
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from bench.report import environment, markdown_table, write_report
from bench.router_sim import ReplicaSpec, SimRequest, StepTimeModel, simulate

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("pagoda", "pow2", "round_robin")


def skewed_workload(n: int, rate: float, seed: int, *, vocab: tuple[int, int] = (1000, 30000),
                    long_frac: float = 0.15, shared_frac: float = 0.7, num_prefixes: int = 32,
                    prefix_len: tuple[int, int] = (512, 2048), long_prompt: tuple[int, int] = (2000, 4000),
                    long_output: tuple[int, int] = (300, 600), user_len: tuple[int, int] = (50, 300),
                    short_output: tuple[int, int] = (20, 150)) -> list[SimRequest]:
    rng = random.Random(seed)

    def tokens(length_range):
        return [rng.randrange(*vocab) for _ in range(rng.randint(*length_range))]

    prefixes = [tokens(prefix_len) for _ in range(num_prefixes)]
    popularity = [1 / (k + 1) for k in range(num_prefixes)]  # Zipf: a few hot system prompts, a long tail
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        if rng.random() < long_frac:
            out.append(SimRequest(f"r{i}", t, tokens(long_prompt), rng.randint(*long_output), "long"))
        elif rng.random() < shared_frac:
            prompt = rng.choices(prefixes, popularity)[0] + tokens(user_len)
            out.append(SimRequest(f"r{i}", t, prompt, rng.randint(*short_output), "shared"))
        else:
            out.append(SimRequest(f"r{i}", t, tokens(user_len), rng.randint(*short_output), "short"))
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def summarize(policy: str, ttfts: list[float], preemptions: int, hit_tokens: int, prompt_tokens: int, **extra) -> dict:
    return {
        "policy": policy, "requests": len(ttfts),
        "ttft_p50_ms": 1000 * percentile(ttfts, 0.50), "ttft_p99_ms": 1000 * percentile(ttfts, 0.99),
        "ttft_mean_ms": 1000 * statistics.fmean(ttfts) if ttfts else float("nan"),
        "preemptions": preemptions, "prefix_hit_rate": hit_tokens / prompt_tokens if prompt_tokens else 0.0, **extra,
    }


# ---- sim mode --------------------------------------------------------------------------------------


def run_sim(args) -> None:
    spec = ReplicaSpec(num_blocks=args.num_blocks)
    model = StepTimeModel()
    rows = []
    for rate in args.rates:
        for policy in POLICIES:
            ttfts, preempt, hits, prompts = [], 0, 0, 0
            for seed in range(args.seeds):
                workload = skewed_workload(args.requests, rate, seed)
                res = simulate(workload, policy, args.replicas, spec, model, args.stats_period, seed=seed)
                ttfts += list(res.ttft_s.values())
                preempt, hits, prompts = preempt + res.preemptions, hits + res.prefix_hit_tokens, prompts + res.prompt_tokens
            rows.append(summarize(policy, ttfts, preempt, hits, prompts, rate_rps=rate))
            print(f"rate {rate:5.1f}/s {policy:12s} p50 {rows[-1]['ttft_p50_ms']:.0f}ms p99 {rows[-1]['ttft_p99_ms']:.0f}ms "
                  f"preemptions {preempt} hit {rows[-1]['prefix_hit_rate']:.2f}", flush=True)
    headline = _headline(rows, args.headline_rate)
    result = {
        "benchmark": "router_sim", "environment": environment(), "replicas": args.replicas, "requests_per_run": args.requests,
        "seeds": args.seeds, "stats_period_s": args.stats_period, "replica_spec": vars(spec), "step_time_model": vars(model),
        "rows": rows, "headline": headline,
    }
    table = (f"Simulated {args.replicas} replicas ({spec.num_blocks} KV blocks x {spec.block_size} tokens, "
             f"max_num_seqs {spec.max_num_seqs}), skewed workload, {args.requests} requests x {args.seeds} seeds per cell.\n\n"
             + markdown_table(rows, ["rate_rps", "policy", "ttft_p50_ms", "ttft_p99_ms", "preemptions", "prefix_hit_rate"])
             + f"\n\nAt {headline['rate_rps']} req/s: pagoda p99 TTFT is {headline['p99_speedup_vs_pow2']:.2f}x better "
               f"than pow2 ({headline['pow2_p99_ms']:.0f} ms -> {headline['pagoda_p99_ms']:.0f} ms), "
               f"p50 {headline['p50_speedup_vs_pow2']:.2f}x.")
    write_report(args.out, "router_sim", result, table, lambda png: plot(result, png))


def _headline(rows: list[dict], rate: float) -> dict:
    cell = {r["policy"]: r for r in rows if r["rate_rps"] == rate}
    pagoda, pow2 = cell["pagoda"], cell["pow2"]
    return {
        "rate_rps": rate, "pagoda_p99_ms": pagoda["ttft_p99_ms"], "pow2_p99_ms": pow2["ttft_p99_ms"],
        "p99_speedup_vs_pow2": pow2["ttft_p99_ms"] / pagoda["ttft_p99_ms"],
        "p50_speedup_vs_pow2": pow2["ttft_p50_ms"] / pagoda["ttft_p50_ms"],
        "preemptions": {p: cell[p]["preemptions"] for p in cell},
    }


def plot(result: dict, png: Path) -> None:
    (_plot_sweep if result["benchmark"] == "router_sim" else _plot_real)(result["rows"], png)


def _plot_sweep(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for policy in POLICIES:
        mine = [r for r in rows if r["policy"] == policy]
        rates = [r["rate_rps"] for r in mine]
        axes[0].plot(rates, [r["ttft_p99_ms"] for r in mine], marker="o", label=policy)
        axes[1].plot(rates, [r["ttft_p50_ms"] for r in mine], marker="o", label=policy)
        axes[2].plot(rates, [r["preemptions"] for r in mine], marker="o", label=policy)
    for ax, title in zip(axes, ("p99 TTFT (ms)", "p50 TTFT (ms)", "preemptions")):
        ax.set_title(title)
        ax.set_xlabel("arrival rate (req/s)")
        ax.set_yscale("log" if "TTFT" in title else "linear")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Routing policies on a skewed workload (simulated replicas, pagoda scheduler + KV manager)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---- real mode -------------------------------------------------------------------------------------


def run_real(args) -> None:
    import asyncio

    import ray
    from ray import serve

    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import resolve_model

    model = str(resolve_model(EMBEDDED_MODEL))
    workload = skewed_workload(
        args.requests, args.rate, seed=0, vocab=(1000, 40000), num_prefixes=16, prefix_len=(160, 320),
        long_prompt=(400, 600), long_output=(32, 64), user_len=(8, 32), short_output=(8, 24),
    )
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        serve.start(proxy_location="Disabled")
        for rep in range(args.repeats):  # ABBA order: drift on a shared machine hits both policies alike
            for policy in ("pagoda", "pow2") if rep % 2 == 0 else ("pow2", "pagoda"):
                runs.append(asyncio.run(_real_run(policy, model, workload)) | {"repeat": rep})
                r = runs[-1]
                print(f"run {rep} {policy:8s} p50 {percentile(r['ttft_s'], .5) * 1000:.0f}ms "
                      f"p99 {percentile(r['ttft_s'], .99) * 1000:.0f}ms preemptions {r['preemptions']} "
                      f"per replica {r['per_replica']}", flush=True)
                serve.delete("bench")
    finally:
        serve.shutdown()
        ray.shutdown()
    rows = []
    for policy in ("pagoda", "pow2"):
        mine = [r for r in runs if r["policy"] == policy]
        rows.append(summarize(
            policy, [t for r in mine for t in r["ttft_s"]], sum(r["preemptions"] for r in mine),
            sum(r["hits"] for r in mine), sum(r["queries"] for r in mine),
            wall_s=statistics.fmean(r["wall_s"] for r in mine),
        ))
    result = {"benchmark": "router_real", "environment": environment(), "model": "SmolLM2-135M-Instruct (embedded), CPU float32",
              "replicas": 2, "requests": args.requests, "rate_rps": args.rate, "repeats": args.repeats,
              "config": real_config("pagoda", "<embedded>"), "rows": rows, "runs": runs}
    table = (f"Real cluster: 2 CPU replicas of the embedded model, {args.requests} requests at {args.rate}/s "
             f"(skewed: long / shared-prefix / short), {args.repeats} runs per policy in ABBA order, pooled.\n\n"
             + markdown_table(rows, ["policy", "requests", "ttft_p50_ms", "ttft_p99_ms", "preemptions", "prefix_hit_rate",
                                     "wall_s"]))
    write_report(args.out, "router_real", result, table, lambda png: plot(result, png))


def _plot_real(rows: list[dict], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [r["policy"] for r in rows]
    for ax, key, title in ((axes[0], "ttft_p50_ms", "p50 TTFT (ms)"), (axes[1], "ttft_p99_ms", "p99 TTFT (ms)")):
        ax.bar(names, [r[key] for r in rows], color=["tab:blue", "tab:orange"][: len(rows)])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("2 CPU replicas of the embedded model, skewed workload")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def real_config(policy: str, model: str) -> dict:
    return {
        "engine": {"model": model, "dtype": "float32", "device": "cpu", "max_model_len": 1024,
                   "cpu_kv_cache_gib": 0.1, "max_num_seqs": 16, "max_num_batched_tokens": 512},
        "deployment": {"name": "bench", "num_replicas": 2},
        "router": {"policy": policy, "stats_period_s": 0.5},
    }


async def _real_run(policy: str, model: str, workload: list[SimRequest]) -> dict:
    import asyncio

    from pagoda.cluster.app import deploy
    from pagoda.cluster.client import PagodaClient
    from pagoda.cluster.config import AppConfig
    from pagoda.engine.sampling_params import SamplingParams

    handle = deploy(AppConfig.from_dict(real_config(policy, model)))
    client = PagodaClient(handle)
    start = time.perf_counter()

    async def one(req: SimRequest):
        await asyncio.sleep(max(0.0, req.arrival_s - (time.perf_counter() - start)))
        params = SamplingParams(temperature=0.0, max_tokens=req.max_tokens, ignore_eos=True)
        return await client.complete(req.token_ids, params)

    done = await asyncio.gather(*[one(r) for r in workload])
    wall = time.perf_counter() - start
    stats = await _all_replica_stats(handle, expected=2)
    per_replica: dict[str, int] = {}
    for c in done:
        per_replica[c.replica[-8:]] = per_replica.get(c.replica[-8:], 0) + 1
    return {
        "policy": policy, "ttft_s": [c.ttft_s for c in done], "wall_s": wall, "per_replica": per_replica,
        "preemptions": sum(s["num_preemptions"] for s in stats),
        "hits": sum(s["prefix_cache_hits"] for s in stats), "queries": sum(s["prefix_cache_queries"] for s in stats),
    }


async def _all_replica_stats(handle, expected: int, tries: int = 40) -> list[dict]:
    """Each replica's stats (calls land on a random replica: ask until every one answered)."""
    seen: dict[str, dict] = {}
    for _ in range(tries):
        s = await handle.stats.remote()
        seen[s["replica"]] = s
        if len(seen) == expected:
            break
    return list(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["sim", "real"], default="sim")
    p.add_argument("--requests", type=int, default=None, help="requests per run (sim: 2000, real: 48)")
    p.add_argument("--seeds", type=int, default=2, help="sim: workloads per cell, pooled")
    p.add_argument("--replicas", type=int, default=4, help="sim: replicas")
    p.add_argument("--num-blocks", type=int, default=4096, help="sim: KV blocks per replica")
    p.add_argument("--stats-period", type=float, default=0.5, help="sim: seconds between published stats")
    p.add_argument("--rates", type=float, nargs="+", default=[20, 25, 30, 35, 40], help="sim: arrival rates (req/s)")
    p.add_argument("--headline-rate", type=float, default=35, help="sim: the rate the summary quotes")
    p.add_argument("--rate", type=float, default=1.5, help="real: arrival rate (req/s)")
    p.add_argument("--repeats", type=int, default=2, help="real: runs per policy (ABBA order), pooled")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: %(default)s)")
    args = p.parse_args(argv)
    if args.mode == "sim":
        args.requests = args.requests or 2000
        run_sim(args)
    else:
        args.requests = args.requests or 48
        run_real(args)


if __name__ == "__main__":
    main()
