"""The clients of a fuzz run: send a case as it is, time it, check the answer (``tests.fuzz.contract``).

HTTP through ``aiohttp`` (the raw body and headers of an HttpCase, streams read to their end), gRPC through
a ``grpc.aio`` channel with identity serializers (a GrpcCase's payload bytes, whatever they are); both under
a hang guard, so that an answer that never comes is a violation and not a stuck run.
"""

from __future__ import annotations

import asyncio
import time

import grpc

from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from tests.fuzz.cases import MODEL, GrpcCase, HttpCase
from tests.fuzz.contract import DETAIL_CHARS, Outcome, check_grpc, check_http


async def send_http(session, base_url: str, case: HttpCase, hang_s: float = 60.0) -> Outcome:
    """POSTs ``case`` with an ``aiohttp.ClientSession`` and checks the whole answer (streams read to the end)."""
    import aiohttp

    start = time.perf_counter()
    headers = dict(case.headers)
    skip = () if "Content-Type" in headers else ("Content-Type",)  # aiohttp would add application/octet-stream
    try:
        async with asyncio.timeout(hang_s):
            async with session.post(base_url + case.path, data=case.body, headers=headers,
                                    skip_auto_headers=skip) as response:
                body = await response.read()
                status, response_headers = response.status, response.headers
    except TimeoutError:
        return Outcome(case, "hang", time.perf_counter() - start, [f"no complete answer within {hang_s:g}s"])
    except aiohttp.ClientError as exc:
        return Outcome(case, "transport error", time.perf_counter() - start, [f"transport error {type(exc).__name__}"],
                       repr(exc)[:DETAIL_CHARS])
    seconds = time.perf_counter() - start
    violations, detail = check_http(case, status, response_headers, body)
    return Outcome(case, str(status), seconds, violations, detail)


async def send_grpc(channel: grpc.aio.Channel, case: GrpcCase, hang_s: float = 60.0) -> Outcome:
    """Sends ``case.payload`` as it is (identity serializers) on a ``grpc.aio`` channel and checks the answer."""
    start = time.perf_counter()
    timeout = case.timeout_s if case.timeout_s is not None else hang_s
    responses: list[bytes] = []
    call = None
    try:
        async with asyncio.timeout(hang_s + 5):
            if case.method == "Generate":
                call = channel.unary_stream(case.path)(case.payload, timeout=timeout)
                if case.cancel_after == 0:
                    call.cancel()
                else:
                    async for response in call:
                        responses.append(response)
                        if case.cancel_after is not None and len(responses) >= case.cancel_after:
                            call.cancel()
                            break
                code, details, trailers = await call.code(), await call.details(), await call.trailing_metadata()
            else:
                responses.append(await channel.unary_unary(case.path)(case.payload, timeout=timeout))
                code, details, trailers = grpc.StatusCode.OK, "", ()
    except grpc.aio.AioRpcError as exc:
        code, details, trailers = exc.code(), exc.details() or "", exc.trailing_metadata() or ()
    except asyncio.CancelledError:
        if call is None or not call.cancelled():
            raise  # this task was cancelled, not the call
        code, details, trailers = grpc.StatusCode.CANCELLED, "", ()  # reading a call this client cancelled
    except TimeoutError:
        if call is not None:
            call.cancel()
        return Outcome(case, "hang", time.perf_counter() - start, [f"no complete answer within {hang_s:g}s"])
    seconds = time.perf_counter() - start
    violations = check_grpc(case, code, details or "", dict(trailers or ()), responses)
    return Outcome(case, code.name, seconds, violations, (details or "")[:DETAIL_CHARS])


async def run_cases(cases: list, send, concurrency: int) -> list[Outcome]:
    """``await send(case)`` for every case, at most ``concurrency`` at a time; outcomes in case order."""
    gate = asyncio.Semaphore(concurrency)

    async def one(case):
        async with gate:
            return await send(case)

    return list(await asyncio.gather(*(one(c) for c in cases)))


async def fuzz_http(base_url: str, cases: list[HttpCase], concurrency: int, hang_s: float = 60.0,
                    keep_alive: bool = True) -> list[Outcome]:
    """``keep_alive`` False: a connection per request, so that a connection the server drops after one case
    cannot fail the next (ServerLog still sees why it was dropped)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0, force_close=not keep_alive)
    async with aiohttp.ClientSession(connector=connector) as session:
        return await run_cases(cases, lambda c: send_http(session, base_url, c, hang_s), concurrency)


async def fuzz_grpc(target: str, cases: list[GrpcCase], concurrency: int, hang_s: float = 60.0) -> list[Outcome]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        return await run_cases(cases, lambda c: send_grpc(channel, c, hang_s), concurrency)


async def still_serving(base_url: str | None, target: str | None) -> list[str]:
    """Problems with one plain valid request per protocol (empty: the server answers)."""
    import aiohttp

    problems = []
    if base_url is not None:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "ignore_eos": True}
        async with aiohttp.ClientSession() as session, asyncio.timeout(60), \
                session.post(base_url + "/v1/completions", json=body) as r:
            answer = await r.json(content_type=None)
            if r.status != 200 or answer["usage"]["completion_tokens"] != 4:
                problems.append(f"HTTP: {r.status} {answer}")
    if target is not None:
        request = pb.GenerateRequest(text="The capital of France is", model=MODEL,
                                     sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
        async with grpc.aio.insecure_channel(target) as channel:
            try:
                responses = [r async for r in channel.unary_stream(
                    "/pagoda.v1.Pagoda/Generate", request_serializer=pb.GenerateRequest.SerializeToString,
                    response_deserializer=pb.GenerateResponse.FromString)(request, timeout=60)]
                if responses[-1].usage.completion_tokens != 4:
                    problems.append(f"gRPC: {responses[-1]}")
            except grpc.aio.AioRpcError as exc:
                problems.append(f"gRPC: {exc.code().name} {exc.details()}")
    return problems
