"""One table from failures to gRPC status and OpenAI-shaped HTTP errors (DESIGN.md, "Contracts at the edges").

    ValueError (bad parameter, prompt too long)      INVALID_ARGUMENT     400  invalid_request_error
    QueueFullError, concurrency limit, too large     RESOURCE_EXHAUSTED   429  rate_limit_error (Retry-After)
    deadline passed                                  DEADLINE_EXCEEDED    504  timeout_error
    client cancelled                                 CANCELLED            —    (nobody to answer)
    EngineDeadError, ReplicaUnavailableError         UNAVAILABLE          503  service_unavailable
    unknown model                                    NOT_FOUND            404  not_found_error
    missing or wrong API key                         UNAUTHENTICATED      401  authentication_error

Engine errors raised on a replica arrive wrapped by Ray (``RayTaskError``); ``to_api_error``
unwraps them so the client reads the engine's own message, which names the field.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import grpc

from pagoda.engine.errors import EngineDeadError, QueueFullError

RETRY_AFTER_S = 1  # what a 429 / RESOURCE_EXHAUSTED tells the client to wait


@dataclass
class ApiError(Exception):
    """A failure with its status in both protocols; ``param`` names the offending field."""

    code: grpc.StatusCode
    http_status: int
    type: str  # OpenAI's error type
    message: str
    param: str | None = None
    retry_after_s: int | None = None  # set for RESOURCE_EXHAUSTED

    def __str__(self) -> str:
        return self.message

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code.name.lower()}}


def invalid(message: str, param: str | None = None) -> ApiError:
    return ApiError(grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", message,
                    param if param is not None else _field_of(message))


def exhausted(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", message, None, RETRY_AFTER_S)


def deadline(message: str = "deadline exceeded; the request was aborted") -> ApiError:
    return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", message)


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable", message)


def not_found(message: str, param: str | None = "model") -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, 404, "not_found_error", message, param)


def unauthenticated(message: str = "missing or wrong API key") -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", message)


def to_api_error(exc: BaseException) -> ApiError:
    """The ApiError for anything a request can raise (unknown failures are UNAVAILABLE, never a crash)."""
    exc = _unwrap(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return exhausted(str(exc))
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return deadline()
    if isinstance(exc, EngineDeadError):
        return unavailable(str(exc))
    if isinstance(exc, ValueError):
        return invalid(str(exc))
    return unavailable(f"request failed: {type(exc).__name__}: {exc}")


def _unwrap(exc: BaseException) -> BaseException:
    """The engine's exception inside Ray's ``RayTaskError`` (which prints a remote traceback)."""
    for _ in range(4):
        cause = getattr(exc, "cause", None)
        if type(exc).__name__.startswith("RayTaskError") and isinstance(cause, BaseException):
            exc = cause
        else:
            break
    return exc


def _field_of(message: str) -> str | None:
    """Engine messages start with the field they are about: 'max_tokens must be >= 1' -> 'max_tokens';
    'prompt length (600) + max_tokens (16) must be <= ...' -> 'prompt'."""
    match = re.match(r"([a-z_]+)(\[\d+\])?[ .]", message)
    return match.group(1) if match else None
