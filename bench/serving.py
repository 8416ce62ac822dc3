"""Served path against the engine: `pagoda serve` (OpenAI HTTP and gRPC) vs the offline engine and the
in-process ``AsyncLLMEngine``, on the same model and requests of the same shape (random token ids), in one run.
No prompt reaches an engine twice (``Workload.starting_at``): a repeat would be a prefix-cache hit.

    python -m bench.serving                                       # CPU: embedded model, concurrency 1 16 64
    python -m bench.serving --shape qwen3-0.6b --concurrency 1 64 256 --prompt-len 256 --max-tokens 128   # GPU
    python -m bench.serving --variant "separate-thread:RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1" \\
                            --variant "interval-2:engine.stream_interval=2"         # what each setting gives
    python -m bench.serving --replicas 1 2 4 --replica-device cpu --systems http   # scaling with replicas
    python -m bench.serving --http http://host:8000 --grpc host:50051 --model pagoda  # a running server

Systems, each in its own process so none shares a GIL with another:
- ``offline``: ``LLM.generate`` on all requests at once (throughput only);
- ``engine``: ``AsyncLLMEngine`` in the load generator's process, the same closed loop as the servers, once per
  ``--engine-cores`` (variant ``thread``: the engine on a thread of that process; ``process``: in its own);
- ``http`` / ``grpc``: a ``pagoda serve`` subprocess (one application per variant and replica count),
  streamed by ``--client-procs`` load processes so the client is not the ceiling (over gRPC each takes
  ``--grpc-channels`` connections in turn: with several API processes one connection reaches one of them).

Per system and concurrency: TTFT, inter-token latency (ITL: gaps between chunks), time per output
token, end-to-end latency (p50/p90/p99), output tokens/s and chunks per request. A variant is a label
plus overrides: ``NAME=value`` (upper case) sets an environment variable of the server process,
``section.field=value`` a field of its YAML config, ``code=DIR`` runs the server from another checkout
(a before/after comparison). Writes bench/results/<name>.json|md|png via bench/report.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bench.procs import take_results
from bench.report import environment, markdown_table, write_report
from bench.serving_load import (
    Sample,
    Workload,
    closed_loop,
    engine_sender,
    grpc_sender,
    http_sender,
    process_shares,
    summarize,
)
from bench.serving_server import Server, profile

RESULTS = Path(__file__).parent / "results"
MODEL_NAME = "bench"


@dataclass(frozen=True)
class Variant:
    label: str
    env: dict = field(default_factory=dict)  # server process environment
    config: dict = field(default_factory=dict)  # "section.field" -> value
    code: str | None = None  # another checkout to run the server from

    @classmethod
    def parse(cls, text: str) -> Variant:
        label, _, rest = text.partition(":")
        env, config, code = {}, {}, None
        for item in filter(None, rest.split(",")):
            key, _, value = item.partition("=")
            if key == "code":
                code = value
            elif key.isupper():
                env[key] = value
            else:
                config[key] = yaml.safe_load(value)
        return cls(label, env, config, code)


# ---- the model and its configs ------------------------------------------------------------------------


def model_and_engine(args) -> tuple[dict, int]:
    """(engine section, vocab size) of the run."""
    if args.shape:
        from bench.random_models import make_random_model

        path = str(make_random_model(args.shape, args.model_dir / args.shape))
        engine = {"model": path, "max_model_len": args.prompt_len + args.max_tokens + 64,
                  "max_num_seqs": max(args.concurrency), "max_num_batched_tokens": 8192}
    else:
        from pagoda.engine.loader import resolve_model

        path = str(resolve_model(args.engine_model))
        engine = {"model": path, "dtype": "float32", "device": "cpu", "max_model_len": 512, "cpu_kv_cache_gib": 1.0,
                  "max_num_seqs": max(args.concurrency), "max_num_batched_tokens": 2048}
    from transformers import AutoConfig

    return engine, AutoConfig.from_pretrained(path).vocab_size


def app_yaml(engine: dict, replicas: int, device: str | None, cpus: float, variant: Variant) -> dict:
    engine = dict(engine)
    if device == "cpu":  # CPU replicas of a GPU run's model: a scaling test of router and ingress, not of the GPU
        engine.update(device="cpu", dtype="float32", cpu_kv_cache_gib=1.0)
    app = {"engine": engine, "deployment": {"name": MODEL_NAME, "num_replicas": replicas, "cpus_per_replica": cpus,
                                            "max_ongoing_requests": 1024}}
    for key, value in variant.config.items():
        section, _, name = key.partition(".")
        app.setdefault(section, {})[name] = value
    return app


# ---- systems ------------------------------------------------------------------------------------------


def run_engine_phase(spec: dict) -> dict:
    """Offline LLM.generate and the in-process AsyncLLMEngine (run in a child process)."""
    from pagoda.engine.config import EngineConfig

    work = Workload(**spec["workload"])
    rows = []
    if "offline" in spec["systems"]:
        from pagoda import LLM, SamplingParams

        llm = LLM(**spec["engine"])
        n = spec["requests"][max(spec["concurrency"])]
        prompts = [{"prompt_token_ids": work.prompt(i)} for i in range(n)]
        params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
        warm = [{"prompt_token_ids": work.prompt(n + i)} for i in range(min(8, n))]  # not the timed prompts
        llm.generate(warm, params, use_tqdm=False)  # warm-up (graphs, allocator)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        rows.append({"system": "offline", "concurrency": max(spec["concurrency"]), "requests": n, "errors": 0,
                     "wall_s": wall, "output_tok_s": tokens / wall})
        print(json.dumps(_short(rows[-1])), flush=True)
        llm.engine.shutdown()
        del llm
    if "engine" in spec["systems"]:
        from pagoda.engine.async_engine import AsyncLLMEngine

        engine = AsyncLLMEngine(EngineConfig.from_kwargs(**spec["engine"]), core=spec["core"])

        async def levels():
            await closed_loop(engine_sender(engine, work), 1, 2)  # warm-up: prompts 0 and 1
            first = 2
            for c in spec["concurrency"]:
                n = spec["requests"][c]
                samples, wall = await closed_loop(engine_sender(engine, work.starting_at(first)), c, n, work.pause_s)
                first += n
                rows.append({**summarize("engine", c, samples, wall), "variant": spec["core"]})
                print(json.dumps(_short(rows[-1])), flush=True)

        asyncio.run(levels())
        engine.shutdown()
    return {"rows": rows}


def _client_proc(protocol: str, target: str, model: str, work: dict, concurrency: int, requests: int, start_at: float,
                 channels: int, q) -> None:
    """One load process: ``concurrency`` closed-loop streams; puts its samples (as dicts) on ``q``. gRPC streams
    take ``channels`` channels in turn (HTTP opens a connection per stream in flight)."""

    async def go():
        work_ = Workload(**work)
        while time.perf_counter() < start_at:
            await asyncio.sleep(0.001)
        async with contextlib.AsyncExitStack() as stack:
            if protocol == "http":
                import aiohttp

                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout())
                send = http_sender(await stack.enter_async_context(session), target, model, work_)
            else:  # channels with subchannel pools of their own: one connection each, not one shared
                import grpc

                from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

                opened = [await stack.enter_async_context(grpc.aio.insecure_channel(
                    target, options=[("grpc.use_local_subchannel_pool", 1)])) for _ in range(channels)]
                send = grpc_sender([pb_grpc.PagodaStub(channel) for channel in opened], model, work_)
            return await closed_loop(send, concurrency, requests, work_.pause_s)

    samples, _ = asyncio.run(go())
    q.put([asdict(s) for s in samples])


def load_level(protocol: str, target: str, work: Workload, concurrency: int, requests: int, procs: int,
               model: str = MODEL_NAME, grpc_channels: int = 1) -> dict:
    """Closed-loop load split over ``procs`` processes started together; one summary row. The processes send
    prompts ``work.first`` onwards, each its own range (``requests`` prompts in all)."""
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    start_at = time.perf_counter() + 3.0  # every process has imported and connected by then
    workers = [ctx.Process(target=_client_proc, args=(protocol, target, model, asdict(work.starting_at(f)), s, r,
                                                        start_at, min(grpc_channels, s), q))
               for s, r, f in process_shares(concurrency, requests, procs, work.first)]
    for w in workers:
        w.start()
    results: list[list[dict]] = take_results(q, len(workers), workers)
    for w in workers:
        w.join()
    samples = [Sample(**d) for batch in results for d in batch]
    ends = [s.chunk_times[-1] for s in samples if s.chunk_times] or [start_at]
    return summarize(protocol, concurrency, samples, max(ends) - min(s.start for s in samples))


def served_rows(args, engine: dict, work: Workload, variant: Variant, replicas: int) -> list[dict]:
    device = args.replica_device
    app = app_yaml(engine, replicas, device, args.cpus_per_replica, variant)
    server = Server(app, variant, args.num_cpus, args.out / "serving_logs")
    rows = []
    try:
        server.wait_ready()
        first = 0  # every request to this server gets a prompt of its own (none is a prefix-cache hit)
        for protocol in [p for p in ("http", "grpc") if p in args.systems]:
            target = server.http_url if protocol == "http" else server.grpc_target
            load_level(protocol, target, work.starting_at(first), 1, 2, 1)  # warm the path
            first += 2
            for c in args.concurrency:
                tag = f"{variant.label or 'serve'}_{protocol}_c{c}"
                spy = profile(server, args.out / "serving_profiles", args.py_spy, tag) if args.py_spy and c > 1 else []
                row = load_level(protocol, target, work.starting_at(first), c, requests_for(args, c),
                                 args.client_procs if c > 1 else 1, grpc_channels=args.grpc_channels)
                first += requests_for(args, c)
                for proc in spy:
                    proc.wait()
                row.update(variant=variant.label, replicas=replicas)
                rows.append(row)
                print(json.dumps(_short(row)), flush=True)
    finally:
        server.stop()
    return rows


def requests_for(args, concurrency: int) -> int:
    return args.c1_requests if concurrency == 1 else max(args.requests_per_slot * concurrency, 16)


def _short(row: dict) -> dict:
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}


# ---- report -------------------------------------------------------------------------------------------


COLUMNS = ["system", "variant", "replicas", "concurrency", "requests", "errors", "ttft_p50_ms", "ttft_p99_ms",
           "itl_p50_ms", "itl_p99_ms", "tpot_p50_ms", "e2e_p50_ms", "output_tok_s", "vs_offline", "chunks_per_request"]


def compare(rows: list[dict]) -> None:
    """Adds vs_offline: output tok/s over the offline engine's (the same requests, max concurrency)."""
    offline = next((r["output_tok_s"] for r in rows if r["system"] == "offline"), None)
    for r in rows:
        if offline and r["system"] != "offline" and r["concurrency"] == max(x["concurrency"] for x in rows):
            r["vs_offline"] = r["output_tok_s"] / offline


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["system"] != "offline"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    series = sorted({(r["system"], r.get("variant", ""), r.get("replicas", 1)) for r in rows})
    for system, variant, replicas in series:
        mine = sorted((r for r in rows if (r["system"], r.get("variant", ""), r.get("replicas", 1)) ==
                       (system, variant, replicas)), key=lambda r: r["concurrency"])
        label = system + (f" {variant}" if variant else "") + (f" x{replicas}" if replicas != 1 else "")
        c = [r["concurrency"] for r in mine]
        axes[0].plot(c, [r["ttft_p50_ms"] for r in mine], "o-", label=label)
        axes[1].plot(c, [r["itl_p50_ms"] for r in mine], "o-", label=label)
        axes[2].plot(c, [r["output_tok_s"] for r in mine], "o-", label=label)
    offline = next((r for r in result["rows"] if r["system"] == "offline"), None)
    if offline:
        axes[2].axhline(offline["output_tok_s"], color="k", ls="--", lw=1, label="offline engine")
    for ax, title in zip(axes, ("TTFT p50 (ms)", "inter-token latency p50 (ms)", "output tokens/s")):
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.legend(fontsize=6)
    fig.suptitle(f"pagoda serve vs engine — {result['config']['model']} on {result['environment'].get('gpu', 'CPU')}")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ---- driver -------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default=None, help="random-weight model of this shape (bench/random_models.py); "
                                                 "default: the embedded model on CPU")
    p.add_argument("--engine-model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--systems", nargs="+", default=["offline", "engine", "http", "grpc"],
                   choices=["offline", "engine", "http", "grpc"])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--engine-cores", nargs="+", choices=["thread", "process"], default=["thread", "process"],
                   help="where the engine system's AsyncLLMEngine runs its engine (one row set each)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--c1-requests", type=int, default=12, help="requests at concurrency 1")
    p.add_argument("--pause-ms", type=float, default=0.0, help="each stream's pause between requests (think time)")
    p.add_argument("--requests-per-slot", type=int, default=2, help="requests per stream slot above concurrency 1")
    p.add_argument("--variant", action="append", default=[], help="LABEL:KEY=VALUE,... (see above); default: one, "
                                                                  "the code as it is")
    p.add_argument("--replicas", type=int, nargs="+", default=[1])
    p.add_argument("--replica-device", choices=["cpu"], default=None, help="serve on CPU replicas (scaling runs)")
    p.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the server's local Ray cluster")
    p.add_argument("--client-procs", type=int, default=max(1, min(4, (os.cpu_count() or 2) // 4)),
                   help="load processes above concurrency 1")
    p.add_argument("--grpc-channels", type=int, default=1, help="gRPC channels (connections) per load process, "
                                                                 "taken in turn by its streams")
    p.add_argument("--py-spy", type=int, default=0, help="seconds of py-spy profile of the server and replica "
                                                          "processes at each level above concurrency 1")
    p.add_argument("--http", default=None, help="a running server's OpenAI base URL instead of starting one")
    p.add_argument("--grpc", default=None, help="a running server's gRPC target, host:port")
    p.add_argument("--model", default=MODEL_NAME, help="a running server: the served model name")
    p.add_argument("--vocab-size", type=int, default=32000, help="a running server: prompt ids are drawn below this")
    p.add_argument("--name", default=None)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if args.http or args.grpc:  # someone else's server: the served systems only
        work = Workload(args.prompt_len, args.max_tokens, args.vocab_size, pause_s=args.pause_ms / 1e3)
        first = 0
        for protocol, target in (("http", args.http), ("grpc", args.grpc)):
            if target:
                for c in args.concurrency:
                    rows.append(load_level(protocol, target, work.starting_at(first), c, requests_for(args, c),
                                           args.client_procs, args.model, args.grpc_channels))
                    first += requests_for(args, c)
        engine = {}
    else:
        engine, vocab = model_and_engine(args)
        work = Workload(args.prompt_len, args.max_tokens, vocab, pause_s=args.pause_ms / 1e3)
        if {"offline", "engine"} & set(args.systems):
            rows += run_child_engine_phase(args, engine, work)
        variants = [Variant.parse(v) for v in args.variant] or [Variant("")]
        for variant in variants:
            for replicas in args.replicas:
                if {"http", "grpc"} & set(args.systems):
                    rows += served_rows(args, engine, work, variant, replicas)
    compare(rows)
    name = args.name or ("serving_" + (args.shape or "cpu"))
    result = {"benchmark": name, "environment": environment(), "rows": rows,
              "config": {"model": args.shape or args.engine_model, "engine": engine, "prompt_len": args.prompt_len,
                         "max_tokens": args.max_tokens, "variants": args.variant, "client_procs": args.client_procs,
                         "grpc_channels": args.grpc_channels, "pause_ms": args.pause_ms}}
    table = (f"Served path vs engine ({result['config']['model']}, {args.prompt_len}-token prompts, "
             f"{args.max_tokens} output tokens)\n\n" + markdown_table(rows, COLUMNS))
    write_report(args.out, name, result, table, lambda png: plot(result, png))


def run_child_engine_phase(args, engine: dict, work: Workload) -> list[dict]:
    spec = {"engine": engine, "workload": asdict(work), "systems": args.systems, "concurrency": args.concurrency,
            "requests": {c: requests_for(args, c) for c in args.concurrency}}
    phases = [{"systems": ["offline"]}] if "offline" in args.systems else []
    if "engine" in args.systems:
        phases += [{"systems": ["engine"], "core": core} for core in args.engine_cores]
    rows = []
    for phase in phases:  # a process each, so GPU memory is freed; not a daemon: a process core has a child
        rows += _in_child(run_engine_phase, {**spec, **phase})["rows"]
    return rows


def _in_child(fn, spec: dict) -> dict:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child_main, args=(fn, spec, q))
    proc.start()
    while True:
        try:
            result = q.get(timeout=5)
            break
        except queue.Empty:
            if proc.exitcode is not None:
                raise RuntimeError(f"the {spec['systems']} phase exited with {proc.exitcode}") from None
    proc.join()
    return result


def _child_main(fn, spec: dict, q) -> None:
    q.put(fn(spec))


if __name__ == "__main__":
    main()
