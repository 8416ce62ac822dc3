"""The error table at the edges (DESIGN.md) without Ray: the mapping itself, then both real servers on
loopback over a scripted fake client — UNAVAILABLE/503 when the replica dies, RESOURCE_EXHAUSTED/429
when the engine queue is full, an error event when a stream fails after its first token, a bad tenant
name 400/INVALID_ARGUMENT — and the servers keep serving afterwards."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket

import grpc
import pytest

try:  # the HTTP client the installed openai package uses (httpx, or its fork httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from pagoda.cluster.api import errors
from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.frontend import Frontend
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import GenerateChunk, ReplicaUnavailableError
from pagoda.engine.errors import EngineDeadError, QueueFullError
from pagoda.engine.request import CompletionOutput, RequestOutput


class FakeTokenizer:
    chat_template = None

    def __len__(self) -> int:
        return 1000

    def __call__(self, text: str):
        if text.startswith("boom"):  # a bug before any request id exists
            raise RuntimeError("secret tokenizer internals")
        return type("Encoding", (), {"input_ids": [ord(c) % 1000 for c in text]})()


class FakeClient:
    """Streams per the prompt's first character: 'o' ok, 'd' replica dead, 'q' queue full, 'm' dies mid-stream,
    'x' a bug (an unexpected exception whose text must not reach the client), 's' ok after a second.
    Records the (priority, tenant) of every request it is sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, str | None]] = []

    async def generate(self, token_ids, params, request_id, priority=0, tenant=None):
        self.sent.append((priority, tenant))
        mode = chr(token_ids[0])
        if mode == "s":
            await asyncio.sleep(1.0)
        if mode == "d":
            raise ReplicaUnavailableError("the serving replica died (before its first token)", tokens_sent=False)
        if mode == "q":
            raise QueueFullError("waiting queue is full (max_waiting=4)")
        if mode == "x":
            raise RuntimeError("secret internals: /srv/pagoda/weights")
        for i in range(3):
            if mode == "m" and i == 1:
                raise ReplicaUnavailableError("the serving replica died (after its first token)", tokens_sent=True)
            done = i == 2
            yield GenerateChunk(RequestOutput(request_id, None, list(token_ids), [
                CompletionOutput(0, f"t{i}", [i], finish_reason="length" if done else None)], done), "fake",
                len(token_ids))


@pytest.fixture(scope="module")
def servers():
    api = ApiConfig(http_port=0, grpc_port=0)
    frontend = Frontend(FakeClient(), FakeTokenizer(), AppConfig(), api, max_model_len=128)
    s = ApiServers.from_frontend(frontend, api)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(servers):
    with grpc.insecure_channel(servers.grpc_target) as ch:
        yield pb_grpc.PagodaStub(ch)


def _post(servers, prompt: str, stream: bool = False):
    return httpx.post(servers.http_url + "/v1/completions", json={"prompt": prompt, "stream": stream}, timeout=10)


def _grpc_code(stub, prompt: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(text=prompt)))
    return info.value


@pytest.mark.parametrize("exc, code, status", [
    (ValueError("max_tokens must be >= 1, got 0"), grpc.StatusCode.INVALID_ARGUMENT, 400),
    (QueueFullError("waiting queue is full"), grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    (TimeoutError(), grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    (EngineDeadError("engine step failed"), grpc.StatusCode.UNAVAILABLE, 503),
    (ReplicaUnavailableError("replica died", tokens_sent=False), grpc.StatusCode.UNAVAILABLE, 503),
    (RuntimeError("something odd"), grpc.StatusCode.INTERNAL, 500),
])
def test_mapping(exc, code, status):
    e = errors.to_api_error(exc)
    assert (e.code, e.http_status) == (code, status)
    body = e.openai_body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == code.name.lower()


def test_field_is_named():
    assert errors.to_api_error(ValueError("max_tokens must be >= 1, got 0")).param == "max_tokens"
    assert errors.to_api_error(ValueError("messages[2].role must be a non-empty string")).param == "messages"
    assert errors.exhausted("x").retry_after_s == errors.RETRY_AFTER_S
    assert (errors.not_found("x").http_status, errors.unauthenticated().http_status) == (404, 401)


def test_replica_dead_is_unavailable_503(servers, stub):
    r = _post(servers, "dead")
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    assert _grpc_code(stub, "dead").code() == grpc.StatusCode.UNAVAILABLE


def test_queue_full_is_429_with_retry_after(servers, stub):
    r = _post(servers, "queue")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    e = _grpc_code(stub, "queue")
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and dict(e.trailing_metadata())["retry-after"] == "1"


def test_failure_mid_stream(servers, stub):
    r = _post(servers, "mid", stream=True)
    assert r.status_code == 200  # the first token was already on its way
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "unavailable"
    assert _grpc_code(stub, "mid").code() == grpc.StatusCode.UNAVAILABLE


def test_bad_bodies_are_400(servers):
    url = servers.http_url + "/v1/completions"
    assert httpx.post(url, content=b"{not json", timeout=10).json()["error"]["param"] == "body"
    r = httpx.post(url, json={"prompt": "ok", "n": 0}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.post(servers.http_url + "/v1/chat/completions", json={"messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_priority_and_tenant_reach_the_client(servers, stub):
    sent = servers.frontend.client.sent
    r = httpx.post(servers.http_url + "/v1/completions", json={"prompt": "ok", "priority": -2, "tenant": "team-a"},
                   timeout=10)
    assert r.status_code == 200 and sent[-1] == (-2, "team-a")
    assert _post(servers, "ok").status_code == 200 and sent[-1] == (0, None)
    list(stub.Generate(pb.GenerateRequest(text="ok", priority=-1, tenant="org/team-b:svc@eu.1")))
    assert sent[-1] == (-1, "org/team-b:svc@eu.1")
    list(stub.Generate(pb.GenerateRequest(text="ok", tenant="")))  # proto3: empty is unset, the default tenant
    assert sent[-1] == (0, None)


@pytest.mark.parametrize("tenant, says", [
    ("two words", "only letters, digits"), ("x" * 129, "at most 128 characters"), ("ümlaut", "only letters"),
])
def test_a_bad_tenant_is_400_invalid_argument_naming_it(servers, stub, tenant, says):
    sent = len(servers.frontend.client.sent)
    r = httpx.post(servers.http_url + "/v1/completions", json={"prompt": "ok", "tenant": tenant}, timeout=10)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "tenant" and says in error["message"], error
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(text="ok", tenant=tenant)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details().startswith("tenant")
    assert len(servers.frontend.client.sent) == sent  # refused before reaching a replica
    for bad in ("", 5):  # over HTTP an empty or non-string tenant is a mistake too
        r = httpx.post(servers.http_url + "/v1/completions", json={"prompt": "ok", "tenant": bad}, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"


def test_accepted_http_connections_send_without_nagle(servers):
    """TCP_NODELAY on the server's side of a keep-alive connection: with Nagle on, each SSE stream's first
    event waited for the client's delayed ACK of the previous response (~40 ms)."""
    conn = http.client.HTTPConnection(servers.api.host, servers.http_port, timeout=10)
    try:
        conn.request("GET", "/health")
        response = conn.getresponse()
        response.read()
        assert response.status == 200 and not response.will_close  # the connection stays open for reuse
        ours = conn.sock.getsockname()
        (transport,) = [c.transport for c in list(servers._uvicorn.server_state.connections)
                        if c.transport.get_extra_info("peername") == ours]
        assert transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        conn.close()


def test_a_bug_is_500_internal_with_the_request_id_and_no_internals(servers, stub, caplog):
    r = _post(servers, "x")
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error" and error["code"] == "internal"
    assert "request id" in error["message"] and "secret" not in r.text and "retry-after" not in r.headers
    request_id = error["message"].split("request id ")[1].split(")")[0]
    assert any(request_id in rec.getMessage() and rec.exc_info for rec in caplog.records)  # the server log has it
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(request_id="req-42", text="x")))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()
    assert "request id req-42" in info.value.details()


def test_a_bug_outside_the_stream_is_internal_too_never_unknown(servers, stub):
    r = _post(servers, "boom")
    assert r.status_code == 500 and "secret" not in r.text and "request id" in r.json()["error"]["message"]
    with pytest.raises(grpc.RpcError) as info:
        stub.Tokenize(pb.TokenizeRequest(text="boom"))
    assert info.value.code() == grpc.StatusCode.INTERNAL and "secret" not in info.value.details()


def _raw(servers, body: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(servers.http_url + "/v1/completions", content=body,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=10)


@pytest.mark.parametrize("body, param, says", [
    (b'{"prompt": "o\\ud800"}', "prompt", "not valid UTF-8"),  # JSON's escape for a lone surrogate
    (b'{"prompt": "ok", "stop": ["\\udfff"]}', "stop[0]", "not valid UTF-8"),
    (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "body", "nests too deeply"),
    (b'{"prompt": "ok", "temperature": Infinity}', "body", "Infinity is not a JSON number"),
    (b'{"prompt": "ok", "temperature": NaN}', "body", "NaN is not a JSON number"),
    (b'{"prompt": "ok", "temperature": 1e308}', "temperature", "temperature must be in [0, 100]"),
    (b'{"prompt": "ok", "best_of": 2}', "best_of", "best_of is not supported"),
    (b'{"prompt": "ok", "echo": true}', "echo", "echo is not supported"),
    (b'{"prompt": "ok", "suffix": "end"}', "suffix", "suffix is not supported"),
    (b'{"prompt": "ok", "logit_bias": {"5": 100}}', "logit_bias", "logit_bias is not supported"),
])
def test_invalid_or_unsupported_input_is_400_naming_the_field(servers, body, param, says):
    r = _raw(servers, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and says in r.json()["error"]["message"]


def test_unsupported_fields_at_their_unused_values_are_accepted(servers):
    body = b'{"prompt": "ok", "best_of": 1, "echo": false, "suffix": "", "logit_bias": {}}'
    assert _raw(servers, body).status_code == 200


@pytest.mark.parametrize("timeout", ["nan", "inf", "-1", "soon"])
def test_a_bad_request_timeout_is_400(servers, timeout):
    r = _raw(servers, b'{"prompt": "ok"}', {"Request-Timeout": timeout})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Request-Timeout"


def test_errors_quote_client_input_briefly(servers, stub):
    name = "m" * 100_000
    r = httpx.post(servers.http_url + "/v1/completions", json={"model": name, "prompt": "ok"}, timeout=10)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(model=name, text="ok")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and len(info.value.details()) < 300
    assert len(str(errors.invalid("x" * 10_000))) <= errors.MAX_MESSAGE_CHARS + 40


def test_a_burst_of_grpc_streams_is_served_not_cancelled_by_the_transport(servers):
    """3,000 streams at once: more calls wait for the asyncio server to pick them up than gRPC core lets
    wait by default (1,000 soft, 3,000 hard), and it cancelled the excess (CANCELLED, nothing to retry)."""

    async def burst() -> list[str]:
        async with grpc.aio.insecure_channel(servers.grpc_target) as channel:
            stub = pb_grpc.PagodaStub(channel)

            async def one() -> str:
                try:
                    return "".join([r.text async for r in stub.Generate(pb.GenerateRequest(text="slow"))])
                except grpc.aio.AioRpcError as exc:
                    return exc.code().name

            return await asyncio.gather(*(one() for _ in range(3000)))

    results = asyncio.run(burst())
    assert results.count("t0t1t2") == 3000, {r: results.count(r) for r in set(results)}


def test_still_serving(servers, stub):
    r = _post(servers, "ok")
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0t1t2"
    assert "".join(x.text for x in stub.Generate(pb.GenerateRequest(text="ok"))) == "t0t1t2"
