"""What a fuzzed request may get back: the documented answers, and the checks of one answer.

The contract is DESIGN.md's "Contracts at the edges" as ``cluster/api/errors.py`` spells it out, for a
server with no API key and a healthy replica (the fuzz setting):

    HTTP   200; 400 invalid_request_error; 404 not_found_error; 413 invalid_request_error (no Retry-After);
           429 rate_limit_error with Retry-After; 504 timeout_error only when the client sent Request-Timeout.
           Never 401 (no key is set), 503 (the replica is healthy) or 500 (a bug), nor any other status.
           Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}; streams end with
           "data: [DONE]", and an error inside one is such an object too, never server_error.
    gRPC   OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND; DEADLINE_EXCEEDED only under a client
           deadline the fuzzer chose, CANCELLED only when the client cancelled. Never INTERNAL or UNKNOWN.

A valid case must succeed (backpressure aside). Every answer must come within ``hang_s``: a hang is a
violation too. Each check returns violations as short class names ("undocumented status 500"), so a
run can count them; ``Outcome.detail`` keeps what the server said. ``tests.fuzz.clients`` sends the
cases and applies these checks; ``tests.fuzz.review`` sums a run up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import grpc

from pagoda.cluster.api.errors import MAX_MESSAGE_CHARS
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from tests.fuzz.cases import GrpcCase, HttpCase

HTTP_ERRORS = {  # status -> (OpenAI error type, error code): cluster/api/errors.py
    400: ("invalid_request_error", "invalid_argument"),
    404: ("not_found_error", "not_found"),
    413: ("invalid_request_error", "resource_exhausted"),
    429: ("rate_limit_error", "resource_exhausted"),
    504: ("timeout_error", "deadline_exceeded"),
}
GRPC_ANSWERS = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.NOT_FOUND}
LONGEST_MESSAGE = MAX_MESSAGE_CHARS + 40  # errors.ApiError cuts messages to this, plus a "... (n more characters)"
INTERNALS = ("Traceback", "Unexpected <class", "Exception calling application", "RayTaskError")
DETAIL_CHARS = 300


@dataclass
class Outcome:
    case: HttpCase | GrpcCase
    status: str  # "200", "400", ... or "OK", "INVALID_ARGUMENT", ...; "hang" or "transport error"
    seconds: float
    violations: list[str] = field(default_factory=list)  # empty when the answer keeps the contract
    detail: str = ""  # the error message the server sent (cut)


def allowed_http(case: HttpCase) -> set[int]:
    if case.kind == "valid":
        return {200, 429}
    return {200, *HTTP_ERRORS} - (set() if case.has_deadline else {504})


def allowed_grpc(case: GrpcCase) -> set[grpc.StatusCode]:
    if case.kind == "valid":
        return {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    allowed = set(GRPC_ANSWERS)
    if case.timeout_s is not None:
        allowed.add(grpc.StatusCode.DEADLINE_EXCEEDED)
    if case.cancel_after is not None:
        allowed.add(grpc.StatusCode.CANCELLED)
    return allowed


# ---- HTTP ---------------------------------------------------------------------------------------------------


def check_http(case: HttpCase, status: int, headers, body: bytes) -> tuple[list[str], str]:
    """(violations, the error message if any)."""
    violations = []
    if status not in allowed_http(case):
        refused = case.kind == "valid" and status < 500
        violations.append(f"valid request answered {status}" if refused else f"undocumented status {status}")
    if status == 200:
        is_sse = headers.get("content-type", "").startswith("text/event-stream")
        if is_sse != case.wants_stream:
            violations.append("stream asked but JSON answered" if case.wants_stream else "SSE answered unasked")
        violations += _check_sse(body) if is_sse else _check_completion(body)
        return violations, ""
    error, problems = _error_object(body)
    violations += problems
    if error is not None:
        violations += _check_error(error, status)
    if status == 429 and headers.get("retry-after") != "1":
        violations.append("429 without Retry-After: 1")
    if status == 413 and "retry-after" in headers:
        violations.append("413 with Retry-After")
    message = error.get("message", "") if isinstance(error, dict) else body[:DETAIL_CHARS].decode("utf-8", "replace")
    return violations, str(message)[:DETAIL_CHARS]


def _error_object(body: bytes) -> tuple[dict | None, list[str]]:
    try:
        obj = json.loads(body)
    except ValueError:
        return None, ["error body is not JSON"]
    if not isinstance(obj, dict) or not isinstance(obj.get("error"), dict):
        return None, ["error body is not {\"error\": {...}}"]
    return obj["error"], []


def _check_error(error: dict, status: int | None) -> list[str]:
    """OpenAI's error object; ``status`` None for an error event inside a stream."""
    out = []
    strings = all(isinstance(error.get(k), str) for k in ("message", "type", "code"))
    if not strings or not (error.get("param") is None or isinstance(error["param"], str)):
        return ["error object lacks message/type/param/code"]
    if status in HTTP_ERRORS and (error["type"], error["code"]) != HTTP_ERRORS[status]:
        out.append(f"{status} with type {error['type']}/{error['code']}")
    if status is None and error["type"] not in {t for t, _ in HTTP_ERRORS.values()}:
        out.append(f"stream error event of type {error['type']}")
    if len(error["message"]) > LONGEST_MESSAGE:
        out.append("error message over MAX_MESSAGE_CHARS")
    if any(marker in error["message"] for marker in INTERNALS):
        out.append("error message shows internals")
    return out


def _check_completion(body: bytes) -> list[str]:
    try:
        obj = json.loads(body)
    except ValueError:
        return ["200 body is not JSON"]
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if obj.get("object") not in ("text_completion", "chat.completion") or not isinstance(choices, list) or not choices:
        return ["200 body is not a completion"]
    if any(c.get("finish_reason") not in ("stop", "length") for c in choices):
        return ["completion choice without finish_reason"]
    if not isinstance(obj.get("usage"), dict):
        return ["completion without usage"]
    return []


def _check_sse(body: bytes) -> list[str]:
    try:
        events = [e for e in body.decode("utf-8").split("\n\n") if e.strip()]
    except UnicodeDecodeError:
        return ["stream is not UTF-8"]
    if not events or events[-1] != "data: [DONE]":
        return ["stream does not end with data: [DONE]"]
    seen, finished, failed = set(), set(), False
    for event in events[:-1]:
        if not event.startswith("data: "):
            return ["stream event without data:"]
        try:
            obj = json.loads(event[6:])
        except ValueError:
            return ["stream event is not JSON"]
        if "error" in obj:
            failed = True
            problems = _check_error(obj["error"], None) if isinstance(obj["error"], dict) else ["bad error event"]
            if problems:
                return problems
            continue
        for choice in obj.get("choices", []):
            seen.add(choice["index"])
            if choice.get("finish_reason") is not None:
                finished.add(choice["index"])
    if not failed and seen != finished:
        return ["stream ended with a choice unfinished"]
    return []


# ---- gRPC ---------------------------------------------------------------------------------------------------


def check_grpc(case: GrpcCase, code: grpc.StatusCode, details: str, trailers: dict,
               responses: list[bytes]) -> list[str]:
    if code not in allowed_grpc(case):
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and case.timeout_s is None:
            return ["hang: the guard's deadline passed"]
        valid_refused = case.kind == "valid" and code in GRPC_ANSWERS
        return [f"valid request answered {code.name}" if valid_refused else f"undocumented status {code.name}"]
    if code != grpc.StatusCode.OK:
        out = []
        if len(details) > LONGEST_MESSAGE:
            out.append("error details over MAX_MESSAGE_CHARS")
        if any(marker in details for marker in INTERNALS):
            out.append("error details show internals")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "in flight" in details and trailers.get("retry-after") != "1":
            out.append("RESOURCE_EXHAUSTED (backpressure) without retry-after: 1")
        return out
    if case.method == "Generate" and case.cancel_after is None:
        return _check_generate([pb.GenerateResponse.FromString(r) for r in responses])
    if case.method == "Tokenize":
        r = pb.TokenizeResponse.FromString(responses[0])
        return [] if r.count == len(r.token_ids) else ["Tokenize count != len(token_ids)"]
    return []


def _check_generate(responses: list[pb.GenerateResponse]) -> list[str]:
    if not responses or not responses[-1].HasField("usage"):
        return ["Generate stream did not end with usage"]
    indexes = {r.index for r in responses}
    finished = {r.index for r in responses if r.finish_reason != pb.FINISH_REASON_UNSPECIFIED}
    return [] if indexes == finished else ["Generate stream ended with a completion unfinished"]
