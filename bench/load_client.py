"""The load generator of ``bench.load`` (and ``bench.soak``, ``bench.chaos``): one short stream per call over
HTTP (``http_once``) or gRPC (``grpc_once``), each ending as an ``Outcome``; ``burst`` starts many together,
split over load processes that begin only once every one of them has imported and connected."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import time
from dataclasses import asdict, dataclass

from bench.procs import take_results
from bench.serving import MODEL_NAME
from bench.serving_load import Workload

REFUSED_HTTP, REFUSED_GRPC = 429, "RESOURCE_EXHAUSTED"
GO_TIMEOUT_S = 300.0  # a load process that has not been told to start by then gives up (the bench failed)


@dataclass
class Outcome:
    kind: str  # ok | refused | failed | hung
    start: float
    ttft_s: float | None = None
    end_s: float | None = None  # seconds from start to the stream's end (or to the refusal)
    code: str = ""  # HTTP status or gRPC code of a refusal or failure
    error: str = ""
    retry_after: str | None = None  # a refusal's Retry-After
    # HTTP, in a session from ``http_session``: seconds from start until the request's headers were written to
    # the connection (the load process's own queueing and connecting before the server could see it)
    sent_s: float | None = None


# ---- senders --------------------------------------------------------------------------------------------


async def http_once(session, url: str, work: Workload, i: int, timeout_s: float) -> Outcome:
    body = {"model": MODEL_NAME, "prompt": work.prompt(i), "max_tokens": work.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    start = time.perf_counter()
    out = Outcome("failed", start)
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url + "/v1/completions", json=body, trace_request_ctx=out) as r:
                if r.status != 200:
                    text = (await r.text())[:2000]
                    kind = "refused" if r.status == REFUSED_HTTP else "failed"
                    return Outcome(kind, start, None, time.perf_counter() - start, str(r.status), text,
                                   r.headers.get("Retry-After"), out.sent_s)
                tokens, done = 0, False
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b"data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            out.code, out.error = str(event["error"].get("code") or "stream"), str(event["error"])[:300]
                        elif event.get("choices") and event["choices"][0].get("text") is not None:
                            tokens += 1
                            if out.ttft_s is None:
                                out.ttft_s = time.perf_counter() - start
                out.end_s = time.perf_counter() - start
                if done and not out.error and out.ttft_s is not None:
                    out.kind = "ok"
                elif not out.error:
                    out.code, out.error = "truncated", f"stream ended after {tokens} chunks without [DONE]"
    except TimeoutError:
        out.kind, out.error = "hung", f"no end after {timeout_s}s"
    except Exception as exc:  # noqa: BLE001 — a broken connection is a data point
        out.code, out.error = type(exc).__name__, str(exc)[:300]
    return out


async def grpc_once(stub, pb, work: Workload, i: int, timeout_s: float) -> Outcome:
    import grpc

    request = pb.GenerateRequest(model=MODEL_NAME, token_ids=pb.TokenIds(ids=work.prompt(i)), sampling=pb.SamplingParams(
        max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True))
    start = time.perf_counter()
    out = Outcome("failed", start)
    call = stub.Generate(request)
    try:
        async with asyncio.timeout(timeout_s):
            async for r in call:
                if r.token_ids and out.ttft_s is None:
                    out.ttft_s = time.perf_counter() - start
        out.kind, out.end_s = ("ok" if out.ttft_s is not None else "failed"), time.perf_counter() - start
    except TimeoutError:
        call.cancel()
        out.kind, out.error = "hung", f"no end after {timeout_s}s"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
        retry = dict(exc.trailing_metadata() or ()).get("retry-after")
        out = Outcome("refused" if code == REFUSED_GRPC else "failed", start, out.ttft_s,
                      time.perf_counter() - start, code, (exc.details() or "")[:300], retry)
    except Exception as exc:  # noqa: BLE001
        out.code, out.error = type(exc).__name__, str(exc)[:300]
    return out


async def _headers_sent(session, trace, params) -> None:
    out = trace.trace_request_ctx
    if isinstance(out, Outcome) and out.sent_s is None:
        out.sent_s = time.perf_counter() - out.start


def http_session(**kwargs):
    """An aiohttp session whose ``http_once`` outcomes carry ``sent_s``."""
    import aiohttp

    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_headers_sent)
    return aiohttp.ClientSession(trace_configs=[trace], **kwargs)


def _client_proc(protocol: str, target: str, work: dict, indices: list[int], ready, go, timeout_s: float,
                 q) -> None:
    """One load process: says so on ``ready`` once it has imported and connected, then starts all of
    ``indices`` together when ``go`` is set; puts its outcomes on ``q``."""
    raise_fd_limit()

    async def go_when_all_are_ready() -> bool:
        ready.put(os.getpid())
        return await asyncio.to_thread(go.wait, GO_TIMEOUT_S)  # False: the bench gave up on this burst

    async def run() -> list[Outcome]:
        work_ = Workload(**work)
        if protocol == "http":
            import aiohttp

            async with http_session(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None)) as session:
                if not await go_when_all_are_ready():
                    return []
                return await asyncio.gather(*(http_once(session, target, work_, i, timeout_s) for i in indices))
        import grpc

        from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
        from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

        async with grpc.aio.insecure_channel(target) as channel:
            await channel.channel_ready()
            stub = pb_grpc.PagodaStub(channel)
            if not await go_when_all_are_ready():
                return []
            return await asyncio.gather(*(grpc_once(stub, pb, work_, i, timeout_s) for i in indices))

    q.put([asdict(o) for o in asyncio.run(run())])


def raise_fd_limit() -> None:
    """Thousands of sockets: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def burst(protocol: str, target: str, work: Workload, concurrency: int, procs: int, timeout_s: float) -> list[Outcome]:
    """``concurrency`` streams started together, split over ``procs`` processes, once every one is ready."""
    procs = max(1, min(procs, concurrency))
    ctx = multiprocessing.get_context("spawn")
    q, ready, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    shares = [list(range(k, concurrency, procs)) for k in range(procs)]
    # daemon: a load process still waiting for ``go`` when the bench fails ends with it
    workers = [ctx.Process(target=_client_proc, args=(protocol, target, asdict(work), s, ready, go, timeout_s, q),
                           daemon=True) for s in shares]
    for w in workers:
        w.start()
    take_results(ready, len(workers), workers)  # every process has imported and connected
    go.set()
    results: list[list[dict]] = take_results(q, len(workers), workers)
    for w in workers:
        w.join()
    return [Outcome(**d) for batch in results for d in batch]
