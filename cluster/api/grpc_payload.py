"""Requests whose bytes are not a valid message are INVALID_ARGUMENT, like any other client mistake.

grpcio decodes a request before the servicer runs, and a ``DecodeError`` there reaches the client as
UNKNOWN with a Python class name in the details ("Unexpected <class '...DecodeError'>"): no handler
of ours ever saw it. This interceptor gives every unary-request method a deserializer that cannot
raise — a payload that does not parse becomes ``Undecodable`` — and answers those with
INVALID_ARGUMENT naming the message type, before the servicer is called.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class Undecodable:
    """What a request became when its bytes did not parse."""

    method: str
    size: int


class DecodeErrorsAreInvalidArgument(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        method, decode = handler_call_details.method, handler.request_deserializer

        def safe_decode(data: bytes):
            try:
                return decode(data)
            except Exception:  # noqa: BLE001 — any parse failure is the client's payload, not our bug
                return Undecodable(method, len(data))

        if handler.response_streaming:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):  # a handler that yields its responses

                async def unary_stream(request, context):
                    if isinstance(request, Undecodable):
                        await _reject(request, context)
                    async for response in behavior(request, context):
                        yield response
            else:  # one that writes them with context.write (grpc_health's Watch)

                async def unary_stream(request, context):
                    if isinstance(request, Undecodable):
                        await _reject(request, context)
                    return await behavior(request, context)

            return handler._replace(request_deserializer=safe_decode, unary_stream=unary_stream)
        behavior = handler.unary_unary

        async def unary_unary(request, context):
            if isinstance(request, Undecodable):
                await _reject(request, context)
            return await behavior(request, context)

        return handler._replace(request_deserializer=safe_decode, unary_unary=unary_unary)


async def _reject(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"the request ({request.size} bytes) is not a valid message for {request.method}")
