"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Streaming answers are server-sent events ending with ``data: [DONE]``. The first chunk is awaited
before the response starts, so a request that fails early (bad field, queue full, unknown model)
still gets its proper status; a failure after that arrives as an ``{"error": ...}`` event.

A burst beyond capacity is refused before FastAPI sees it (``refuse_when_full``, plain ASGI): a
refusal then costs little more than sending a small response: 500 refusals over kept-alive
connections took ~0.1 s of uvicorn's time this way against ~0.4 s raised in the route.

A client that drops an SSE stream makes Starlette cancel the response task (a non-streaming
request polls for the disconnect itself); the cancellation runs through ``Frontend.generate``
into ``PagodaClient``, which cancels the Serve stream, and the engine aborts the request. A client deadline may be sent as ``Request-Timeout: <seconds>``
(504 when it passes; the request is aborted).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from pagoda.cluster.api import errors
from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.frontend import Frontend
from pagoda.cluster.api.openai_protocol import (
    Accumulator,
    ParsedRequest,
    completion_response,
    parse_request,
    stream_choice,
    stream_chunk,
    usage,
)

DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


def create_app(frontend: Frontend) -> Callable:
    """The ASGI app: the routes below behind ``refuse_when_full``."""
    app = FastAPI(title="pagoda", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _any_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(errors.to_api_error(exc))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        frontend.check_key(request.headers.get("authorization"))
        info = frontend.info
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "pagoda",
                                           "root": info.source, "max_model_len": info.max_model_len}
                                          for name in info.aliases]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(frontend, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(frontend, request, chat=True)

    return refuse_when_full(app, frontend)


GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


def refuse_when_full(app, frontend: Frontend):
    """``app`` behind a plain ASGI gate: a generate request that finds no place free (and passes the
    key check, if any: a wrong key still gets its 401 from the app) gets its 429 here, before
    routing, body parsing and FastAPI's exception middleware. The response is the one the route
    would give (``error_response``'s body and Retry-After)."""
    async def gate(scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["path"] in GENERATE_PATHS and frontend.at_capacity()
                and (frontend.api.api_key is None or _key_ok(frontend, scope))):
            try:
                frontend.check_capacity()
            except ApiError as exc:
                await _send_error(send, exc)
                return
        await app(scope, receive, send)

    return gate


def _key_ok(frontend: Frontend, scope) -> bool:
    header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
    try:
        frontend.check_key(None if header is None else header.decode("latin-1"))
    except ApiError:
        return False
    return True


async def _send_error(send, exc: ApiError) -> None:
    body = json.dumps(exc.openai_body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if exc.retry_after_s is not None:
        headers.append((b"retry-after", str(exc.retry_after_s).encode()))
    await send({"type": "http.response.start", "status": exc.http_status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def error_response(exc: ApiError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse(exc.openai_body(), status_code=exc.http_status, headers=headers)


async def _generate(frontend: Frontend, request: Request, chat: bool):
    frontend.check_key(request.headers.get("authorization"))
    frontend.check_capacity()
    req = parse_request(await _json_body(request, frontend.api.max_message_bytes), chat)
    frontend.check_model(req.model)
    prompt = await frontend.prompt(**req.prompt)  # images: fetched and measured off the event loop
    params = frontend.sampling_params(**req.sampling)
    chunks = frontend.generate(prompt, params, req.request_id, req.priority, _timeout(request), tenant=req.tenant)
    if not req.stream:
        acc = Accumulator(params.n)
        await _unless_disconnected(request, _accumulate(chunks, acc))
        return completion_response(req, frontend.response_model(req.model), acc)
    first = await anext(chunks)  # errors before the first token keep their HTTP status
    model = frontend.response_model(req.model)
    return StreamingResponse(_sse(req, model, first, chunks, params.n), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def _sse(req: ParsedRequest, model: str, first, chunks: AsyncIterator, n: int) -> AsyncIterator[str]:
    started, finished = [False] * n, [False] * n
    prompt_tokens = completion_tokens = cached = 0
    try:
        chunk = first
        while chunk is not None:
            out = chunk.output
            prompt_tokens, cached = chunk.num_prompt_tokens, out.num_cached_tokens
            choices = []
            for c in out.outputs:
                if finished[c.index] or not (c.text or c.token_ids or c.finish_reason or not started[c.index]):
                    continue  # a finished completion repeats its finish reason in later deltas
                completion_tokens += len(c.token_ids)
                choices.append(stream_choice(req, c, first=not started[c.index]))
                started[c.index], finished[c.index] = True, c.finish_reason is not None
            if choices:
                yield _event(stream_chunk(req, model, choices))
            chunk = await anext(chunks, None)
        if req.include_usage:
            yield _event(stream_chunk(req, model, [], usage(prompt_tokens, completion_tokens, cached)))
    except ApiError as exc:
        yield _event(exc.openai_body())
    finally:
        await chunks.aclose()  # a dropped client lands here too: the engine aborts the request
    yield "data: [DONE]\n\n"


async def _accumulate(chunks: AsyncIterator, acc: Accumulator) -> None:
    async for chunk in chunks:
        acc.add(chunk)


async def _unless_disconnected(request: Request, work) -> None:
    """Runs ``work``; if the client hangs up first, cancels it (the engine aborts the request)."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                break
        await task
    finally:
        task.cancel()


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _json_body(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.too_large(f"request body is {declared} bytes; the limit is {limit}")
    raw = await request.body()
    if len(raw) > limit:
        raise errors.too_large(f"request body is {len(raw)} bytes; the limit is {limit}")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise errors.invalid("request body nests too deeply", "body") from None
    except ValueError as exc:
        raise errors.invalid(f"request body is not valid JSON: {exc}", "body") from None
    _check_text(body)
    return body


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _check_text(body) -> None:
    """Every string is UTF-8 text: JSON's \\ud800 escape decodes to a lone surrogate, which no tokenizer
    takes. Walks iteratively (json.loads bounded the depth); names the first bad field."""
    stack = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if value.isascii():  # most text, and every base64 image: no copy needed to know
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                field = path or "body"
                raise errors.invalid(f"{field} is not valid UTF-8 text (a lone surrogate escape?)", field) from None
        elif isinstance(value, dict):
            for key, item in value.items():
                name = key.encode("utf-8", "backslashreplace").decode("utf-8")  # a bad key named, not echoed raw
                stack.append((f"{path}.{name}" if path else name, key))
                stack.append((f"{path}.{name}" if path else name, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _timeout(request: Request) -> float | None:
    value = request.headers.get("request-timeout")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise errors.invalid(f"Request-Timeout must be a number of seconds, got {errors.quoted(value)}",
                             "Request-Timeout") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise errors.invalid(f"Request-Timeout must be a finite number of seconds > 0, got {errors.quoted(value)}",
                             "Request-Timeout")
    return seconds
