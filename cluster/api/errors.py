"""One table from failures to gRPC status and OpenAI-shaped HTTP errors (DESIGN.md, "Contracts at the edges").

    ValueError (bad parameter, prompt too long)      INVALID_ARGUMENT     400  invalid_request_error
    QueueFullError, API admission limit,             RESOURCE_EXHAUSTED   429  rate_limit_error (Retry-After)
    Serve's BackPressureError (its max_queued_requests)
    request body / message over the size limit       RESOURCE_EXHAUSTED   413  invalid_request_error (no retry)
    deadline passed                                  DEADLINE_EXCEEDED    504  timeout_error
    client cancelled                                 CANCELLED            —    (nobody to answer)
    EngineDeadError, ReplicaUnavailableError         UNAVAILABLE          503  service_unavailable
    unknown model                                    NOT_FOUND            404  not_found_error
    missing or wrong API key                         UNAUTHENTICATED      401  authentication_error
    anything else (a bug)                            INTERNAL             500  server_error

Anything else is pagoda's fault, not the client's and not a reason to retry: the client gets 500 /
INTERNAL with the request id (a fresh id when the request had none yet) and no internals; the server
logs the exception under that id. Messages
quote client input at most ``QUOTE_CHARS`` characters long (``quoted``), and no message exceeds
``MAX_MESSAGE_CHARS``: a 100 KB model name must not become a 100 KB gRPC trailer.

Engine errors raised on a replica arrive wrapped by Ray (``RayTaskError``); ``to_api_error``
unwraps them so the client reads the engine's own message, which names the field.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass

import grpc
from ray.serve.exceptions import BackPressureError

from pagoda.engine.errors import EngineDeadError, QueueFullError

RETRY_AFTER_S = 1  # what a 429 / RESOURCE_EXHAUSTED tells the client to wait
QUOTE_CHARS = 64  # client input quoted in a message is cut to this
MAX_MESSAGE_CHARS = 2000  # and no message is longer (gRPC trailers are limited to a few KB)

logger = logging.getLogger("pagoda.api")


@dataclass
class ApiError(Exception):
    """A failure with its status in both protocols; ``param`` names the offending field."""

    code: grpc.StatusCode
    http_status: int
    type: str  # OpenAI's error type
    message: str
    param: str | None = None
    retry_after_s: int | None = None  # set for RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        if len(self.message) > MAX_MESSAGE_CHARS:
            extra = len(self.message) - MAX_MESSAGE_CHARS
            self.message = self.message[:MAX_MESSAGE_CHARS] + f"... ({extra} more characters)"

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


def too_large(message: str) -> ApiError:
    """Over a size limit: 413, not 429 (retrying the same body cannot succeed)."""
    return ApiError(grpc.StatusCode.RESOURCE_EXHAUSTED, 413, "invalid_request_error", message)


def internal(exc: BaseException, request_id: str | None = None) -> ApiError:
    """An unexpected failure: logged here under the request's id, which is all the client sees of it."""
    request_id = request_id or uuid.uuid4().hex
    logger.error("internal error in request %s: %s", request_id, type(exc).__name__, exc_info=exc)
    return ApiError(grpc.StatusCode.INTERNAL, 500, "server_error",
                    f"internal server error (request id {request_id}); the server log has the details")


def quoted(value: object, limit: int = QUOTE_CHARS) -> str:
    """``repr(value)``, cut to ``limit`` characters, for quoting client input in a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..." + f" ({len(text)} characters)"


def deadline(message: str = "deadline exceeded; the request was aborted") -> ApiError:
    return ApiError(grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error", message)


def unavailable(message: str) -> ApiError:
    return ApiError(grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable", message)


def not_found(message: str, param: str | None = "model") -> ApiError:
    return ApiError(grpc.StatusCode.NOT_FOUND, 404, "not_found_error", message, param)


def unauthenticated(message: str = "missing or wrong API key") -> ApiError:
    return ApiError(grpc.StatusCode.UNAUTHENTICATED, 401, "authentication_error", message)


def to_api_error(exc: BaseException, request_id: str | None = None) -> ApiError:
    """The ApiError for anything a request can raise (an unknown failure is INTERNAL, never a crash)."""
    exc = _unwrap(exc)
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return exhausted(str(exc))
    if isinstance(exc, BackPressureError):  # Serve's own caller queue, if a Serve config sets its limit
        return exhausted(f"every replica is full and so is Serve's queue: {exc} Retry later.")
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        return deadline()
    if isinstance(exc, EngineDeadError):
        return unavailable(str(exc))
    if isinstance(exc, ValueError):
        return invalid(str(exc))
    return internal(exc, request_id)


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
