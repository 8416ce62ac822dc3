"""The fuzzer's own checks (tests/fuzz/), without a server: the contract flags what DESIGN.md does not document
and passes what it does, and a fixed seed draws the same cases in the documented mix."""

from __future__ import annotations

import json
from collections import Counter

import grpc
import pytest

pytest.importorskip("hypothesis")

from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from tests.fuzz.cases import CHAT, COMPLETIONS, GrpcCase, HttpCase, draw_mix
from tests.fuzz.contract import check_grpc, check_http
from tests.fuzz.grpc_cases import grpc_cases
from tests.fuzz.http_cases import http_cases

VALID = HttpCase(COMPLETIONS, b'{"prompt": "hi", "max_tokens": 2}', (), "valid", "")
MUTATED = HttpCase(COMPLETIONS, b'{"prompt": "hi", "max_tokens": "x"}', (), "mutated", "max_tokens=<str>")
JSON = {"content-type": "application/json"}


def _error(status_type: str, code: str, param: str | None = "max_tokens") -> bytes:
    return json.dumps({"error": {"message": "max_tokens must be int", "type": status_type, "param": param,
                                 "code": code}}).encode()


def test_http_documented_errors_pass_and_others_are_flagged():
    assert check_http(MUTATED, 400, JSON, _error("invalid_request_error", "invalid_argument"))[0] == []
    assert check_http(MUTATED, 500, JSON, _error("server_error", "internal"))[0] == ["undocumented status 500"]
    assert check_http(MUTATED, 400, JSON, b"oops")[0] == ["error body is not JSON"]
    assert check_http(MUTATED, 400, JSON, _error("rate_limit_error", "resource_exhausted"))[0] == \
        ["400 with type rate_limit_error/resource_exhausted"]
    assert check_http(MUTATED, 429, JSON, _error("rate_limit_error", "resource_exhausted"))[0] == \
        ["429 without Retry-After: 1"]
    assert check_http(MUTATED, 504, JSON, _error("timeout_error", "deadline_exceeded"))[0] == \
        ["undocumented status 504"]  # no Request-Timeout was sent
    assert check_http(VALID, 400, JSON, _error("invalid_request_error", "invalid_argument"))[0] == \
        ["valid request answered 400"]


def test_http_streams_must_end_with_done_and_finish_every_choice():
    case = HttpCase(CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}', (), "valid", "")
    sse = {"content-type": "text/event-stream"}
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "a"},
                                                              "finish_reason": None}]}
    done = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    events = [f"data: {json.dumps(chunk)}\n\n", f"data: {json.dumps(done)}\n\n"]
    assert check_http(case, 200, sse, "".join([*events, "data: [DONE]\n\n"]).encode())[0] == []
    assert check_http(case, 200, sse, "".join(events).encode())[0] == ["stream does not end with data: [DONE]"]
    assert check_http(case, 200, sse, (events[0] + "data: [DONE]\n\n").encode())[0] == \
        ["stream ended with a choice unfinished"]
    assert check_http(case, 200, JSON, b"{}")[0][0] == "stream asked but JSON answered"


def test_grpc_internal_and_unknown_are_never_documented():
    raw = GrpcCase("Generate", b"\xff", "raw", "random bytes")
    assert check_grpc(raw, grpc.StatusCode.INVALID_ARGUMENT, "bad", {}, []) == []
    for code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
        assert check_grpc(raw, code, "x", {}, []) == [f"undocumented status {code.name}"]
    assert check_grpc(raw, grpc.StatusCode.DEADLINE_EXCEEDED, "", {}, []) == ["hang: the guard's deadline passed"]
    late = GrpcCase("Generate", b"", "mutated", "message", timeout_s=0.01)
    assert check_grpc(late, grpc.StatusCode.DEADLINE_EXCEEDED, "", {}, []) == []


def test_grpc_generate_stream_must_end_with_usage():
    case = GrpcCase("Generate", b"", "valid", "")
    last = pb.GenerateResponse(index=0, token_ids=[5], finish_reason=pb.FINISH_REASON_LENGTH)
    assert check_grpc(case, grpc.StatusCode.OK, "", {}, [last.SerializeToString()]) == \
        ["Generate stream did not end with usage"]
    last.usage.completion_tokens = 1
    assert check_grpc(case, grpc.StatusCode.OK, "", {}, [last.SerializeToString()]) == []


@pytest.mark.parametrize("strategies", [http_cases, grpc_cases])
def test_a_seed_draws_the_same_cases_in_the_documented_mix(strategies):
    first, again = (draw_mix(strategies(vocab_size=1000, big=2000), 80, 3) for _ in range(2))
    assert first == again
    assert Counter(c.kind for c in first) == {"valid": 20, "mutated": 40, "raw": 20}
    assert all(isinstance(c.body if isinstance(c, HttpCase) else c.payload, bytes) for c in first)
