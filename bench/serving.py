"""Online serving benchmark: an asyncio load generator against the gRPC and OpenAI HTTP APIs.

    python -m bench.serving                                   # local CPU app, concurrency 1 16 64, both protocols
    python -m bench.serving --concurrency 8 --requests 64
    python -m bench.serving --rate 4 --requests 100           # Poisson arrivals at 4 req/s instead
    python -m bench.serving --http http://host:8000 --grpc host:50051 --model pagoda   # a running server

Each request streams; the client stamps every chunk. Reported per protocol and load level:
TTFT (request sent -> first token), ITL (gap between consecutive chunks; one engine step each),
end-to-end latency, p50/p90/p99 of each; throughput (output tokens/s, requests/s) and goodput
(requests/s that met the SLO: TTFT <= --slo-ttft and mean time per output token <= --slo-tpot).
Writes bench/results/serving*.json|md|png via bench/report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import environment, markdown_table, write_report

RESULTS = Path(__file__).parent / "results"
TOPICS = ["tea", "rivers", "the moon", "bicycles", "bread", "glaciers", "chess", "owls", "copper", "lighthouses",
          "volcanoes", "jazz", "maps", "salt", "bees", "trains"]


@dataclass
class Sample:
    ok: bool
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival time of each chunk with tokens
    tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(1, self.tokens - 1)


def prompt(i: int) -> str:
    return f"Request {i}. Write a short paragraph about {TOPICS[i % len(TOPICS)]} for a curious child."


# ---- one request per protocol -------------------------------------------------------------------------


async def http_request(client, url: str, model: str, i: int, max_tokens: int) -> Sample:
    body = {"model": model, "prompt": prompt(i), "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    s = Sample(True, time.perf_counter())
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return Sample(False, s.start, error=f"HTTP {r.status_code}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("choices"):  # one event per engine step with news, like a gRPC response
                    s.chunk_times.append(time.perf_counter())
                if event.get("usage"):
                    s.tokens = event["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 — a failed request is a data point, not a crash
        return Sample(False, s.start, error=f"{type(exc).__name__}: {exc}")
    s.ok = bool(s.chunk_times)
    return s


async def grpc_request(stub, model: str, i: int, max_tokens: int) -> Sample:
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb

    request = pb.GenerateRequest(model=model, text=prompt(i), sampling=pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    s = Sample(True, time.perf_counter())
    try:
        async for r in stub.Generate(request):
            if r.token_ids:
                s.chunk_times.append(time.perf_counter())
                s.tokens += len(r.token_ids)
    except Exception as exc:  # noqa: BLE001
        return Sample(False, s.start, error=f"{type(exc).__name__}: {exc}")
    s.ok = bool(s.chunk_times)
    return s


# ---- load shapes --------------------------------------------------------------------------------------


async def closed_loop(send, concurrency: int, requests: int) -> list[Sample]:
    """``concurrency`` workers, each sending its next request as soon as the last one finished."""
    counter = iter(range(requests))
    samples: list[Sample] = []

    async def worker():
        for i in counter:
            samples.append(await send(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples


async def poisson(send, rate: float, requests: int, seed: int = 0) -> list[Sample]:
    """Open loop: requests arrive at exponential gaps (mean 1/rate), whatever the server does."""
    rng = random.Random(seed)
    tasks = []
    for i in range(requests):
        tasks.append(asyncio.ensure_future(send(i)))
        await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


# ---- summary ------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, round(q * (len(v) - 1)))]
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def summarize(protocol: str, load: str, samples: list[Sample], wall_s: float, slo_ttft: float, slo_tpot: float) -> dict:
    ok = [s for s in samples if s.ok]
    good = [s for s in ok if s.ttft <= slo_ttft and s.tpot <= slo_tpot]
    row = {"protocol": protocol, "load": load, "requests": len(samples), "errors": len(samples) - len(ok),
           "wall_s": wall_s, "output_tok_s": sum(s.tokens for s in ok) / wall_s, "req_s": len(ok) / wall_s,
           "goodput_req_s": len(good) / wall_s, "slo_met": len(good) / max(1, len(samples))}
    for name, values in (("ttft", [s.ttft for s in ok]), ("itl", [x for s in ok for x in s.itls]),
                         ("e2e", [s.e2e for s in ok])):
        for q, v in percentiles(values).items():
            row[f"{name}_{q}_ms"] = 1000 * v
    row["first_error"] = next((s.error for s in samples if not s.ok), "")
    return row


COLUMNS = ["protocol", "load", "requests", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms",
           "itl_p90_ms", "itl_p99_ms", "e2e_p50_ms", "e2e_p99_ms", "output_tok_s", "req_s", "goodput_req_s"]


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for protocol in sorted({r["protocol"] for r in rows}):
        mine = [r for r in rows if r["protocol"] == protocol]
        x = list(range(len(mine)))
        labels = [r["load"] for r in mine]
        axes[0].plot(x, [r["ttft_p50_ms"] for r in mine], "o-", label=f"{protocol} p50")
        axes[0].plot(x, [r["ttft_p99_ms"] for r in mine], "x--", label=f"{protocol} p99")
        axes[1].plot(x, [r["itl_p50_ms"] for r in mine], "o-", label=f"{protocol} p50")
        axes[1].plot(x, [r["itl_p99_ms"] for r in mine], "x--", label=f"{protocol} p99")
        axes[2].plot(x, [r["output_tok_s"] for r in mine], "o-", label=f"{protocol} throughput")
        axes[2].plot(x, [r["goodput_req_s"] * result["config"]["max_tokens"] for r in mine], "x--",
                     label=f"{protocol} goodput (tok/s in SLO)")
        for ax in axes:
            ax.set_xticks(x, labels)
    for ax, title in zip(axes, ("TTFT (ms)", "inter-token latency (ms)", "output tokens/s")):
        ax.set_title(title)
        ax.set_xlabel("load")
        ax.legend(fontsize=7)
    fig.suptitle(f"pagoda serving — {result['config']['model']} on {result['environment'].get('gpu', 'CPU')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---- driver -------------------------------------------------------------------------------------------


async def run_levels(args, http_url: str | None, grpc_target: str | None) -> list[dict]:
    import grpc

    try:
        import httpx
    except ImportError:  # some environments ship the same client as httpx2
        import httpx2 as httpx
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

    rows = []
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http, grpc.aio.insecure_channel(grpc_target or "x") as ch:
        stub = pb_grpc.PagodaStub(ch)
        senders = {"http": lambda i: http_request(http, http_url, args.model, i, args.max_tokens),
                   "grpc": lambda i: grpc_request(stub, args.model, i, args.max_tokens)}
        levels = [("rate", r) for r in args.rate] if args.rate else [("concurrency", c) for c in args.concurrency]
        for kind, level in levels:
            for protocol in args.protocols:
                if (protocol == "http" and not http_url) or (protocol == "grpc" and not grpc_target):
                    continue
                n = args.requests or max(8, 2 * int(level)) if kind == "concurrency" else args.requests or 32
                await closed_loop(senders[protocol], 1, 1)  # warm the path (connection, prefix of the template)
                start = time.perf_counter()
                if kind == "concurrency":
                    samples = await closed_loop(senders[protocol], int(level), n)
                else:
                    samples = await poisson(senders[protocol], level, n)
                row = summarize(protocol, f"{'c' if kind == 'concurrency' else 'rate'}={level:g}", samples,
                                time.perf_counter() - start, args.slo_ttft, args.slo_tpot)
                print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
                rows.append(row)
    return rows


@contextlib.contextmanager
def local_app(args):
    """A local Ray cluster with the Serve app on the embedded model and the API servers on loopback."""
    import ray
    from ray import serve

    from pagoda.cluster.api.config import ApiConfig
    from pagoda.cluster.api.server import ApiServers
    from pagoda.cluster.app import deploy
    from pagoda.cluster.config import AppConfig

    app = AppConfig.from_dict({
        "engine": {"model": args.engine_model, "dtype": "float32", "device": "cpu", "max_model_len": 512,
                   "cpu_kv_cache_gib": 0.5, "max_num_seqs": 64, "max_num_batched_tokens": 1024},
        "deployment": {"name": args.model, "num_replicas": 1, "cpus_per_replica": args.cpus,
                       "max_ongoing_requests": 256},
    })
    ray.init(address="local", num_cpus=max(2, int(args.cpus)), include_dashboard=False, log_to_driver=False)
    servers = None
    try:
        serve.start(proxy_location="Disabled")
        servers = ApiServers.start(deploy(app), app, ApiConfig(http_port=0, grpc_port=0))
        yield servers.http_url, servers.grpc_target, app
    finally:
        if servers is not None:
            servers.stop()
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--http", default=None, help="OpenAI HTTP base URL of a running server (default: start one)")
    p.add_argument("--grpc", default=None, help="gRPC target of a running server, host:port")
    p.add_argument("--model", default="pagoda", help="served model name")
    p.add_argument("--engine-model", default="embedded:smollm2-135m-instruct", help="local app: engine model")
    p.add_argument("--cpus", type=float, default=1.0, help="local app: CPUs of the replica (torch threads)")
    p.add_argument("--protocols", nargs="+", default=["grpc", "http"], choices=["grpc", "http"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--rate", type=float, nargs="+", default=None, help="Poisson arrival rates (req/s) instead")
    p.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x concurrency))")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput SLO: time to first token, seconds")
    p.add_argument("--slo-tpot", type=float, default=0.25, help="goodput SLO: mean time per output token, seconds")
    p.add_argument("--name", default="serving_cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    if args.http or args.grpc:
        rows = asyncio.run(run_levels(args, args.http, args.grpc))
        engine = {}
    else:
        with local_app(args) as (http_url, grpc_target, app):
            rows = asyncio.run(run_levels(args, http_url, grpc_target))
            engine = app.to_dict()["engine"]
    result = {"benchmark": args.name, "environment": environment(), "rows": rows,
              "config": {"model": args.engine_model if engine else args.model, "max_tokens": args.max_tokens,
                         "slo_ttft_s": args.slo_ttft, "slo_tpot_s": args.slo_tpot, "engine": engine}}
    table = (f"Serving ({result['config']['model']}, {args.max_tokens} output tokens, SLO: TTFT <= "
             f"{args.slo_ttft}s, TPOT <= {args.slo_tpot}s)\n\n" + markdown_table(rows, COLUMNS))
    write_report(args.out, args.name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
