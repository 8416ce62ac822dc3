"""The pagoda.v1 gRPC service with its generated stubs, health and reflection, against a real local
Ray cluster + Serve app (one CPU replica of the embedded model, shared with test_openai_api: conftest.py) on
127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import json
import re

import pytest

pytest.importorskip("ray")
grpc = pytest.importorskip("grpc")

from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.engine.graph_prompt import Graph, graph_message
from pagoda.engine.tokenizer import encode_chat, load_tokenizer
from tests.integration.api_app import more_servers, wait_engine_busy, wait_engine_idle
from tests.unit.test_graph_prompt import MEDICAL

PROMPT = "The capital of France is"
FRANCE = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="What is the capital of France?")])


@pytest.fixture(scope="module")
def channel(app):
    with grpc.insecure_channel(app[2].grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.PagodaStub(channel)


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


def generate(stub, max_tokens=12, **kwargs):
    sampling = pb.SamplingParams(max_tokens=max_tokens, temperature=kwargs.pop("temperature", 0.0),
                                 **kwargs.pop("sampling", {}))
    timeout = kwargs.pop("timeout", None)
    if "token_ids" not in kwargs and "messages" not in kwargs:
        kwargs.setdefault("text", PROMPT)
    return stub.Generate(pb.GenerateRequest(sampling=sampling, **kwargs), timeout=timeout)


def collect(responses) -> tuple[dict[int, str], dict[int, list[int]], dict[int, int], list]:
    texts, ids, finish, all_ = {}, {}, {}, list(responses)
    for r in all_:
        texts[r.index] = texts.get(r.index, "") + r.text
        ids.setdefault(r.index, []).extend(r.token_ids)
        if r.finish_reason:
            finish[r.index] = r.finish_reason
    return texts, ids, finish, all_


# ---- 2. stubs: Generate, Tokenize, ModelInfo ---------------------------------------------------


def test_generate_streams_text_with_usage(stub, tokenizer):
    texts, ids, finish, responses = collect(generate(stub, max_tokens=12, sampling={"ignore_eos": True},
                                                     priority=-1, tenant="team-a"))
    assert len(responses) >= 2 and texts[0] and len(ids[0]) == 12
    assert finish == {0: pb.FINISH_REASON_LENGTH}
    last = responses[-1]
    assert last.HasField("usage") and not any(r.HasField("usage") for r in responses[:-1])
    assert last.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids) and last.usage.completion_tokens == 12
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == texts[0]


def test_generate_from_token_ids_and_chat(stub, tokenizer):
    by_text = collect(generate(stub))[0][0]
    by_ids = collect(generate(stub, token_ids=pb.TokenIds(ids=tokenizer(PROMPT).input_ids)))[0][0]
    assert by_ids == by_text
    chat = collect(generate(stub, max_tokens=24, messages=FRANCE))[0][0]
    assert "Paris" in chat


def test_generate_n2_stop_and_logprobs(stub):
    texts, ids, finish, responses = collect(generate(
        stub, max_tokens=5, temperature=1.0, sampling={"n": 2, "seed": 7, "ignore_eos": True, "logprobs": 2}))
    assert sorted(texts) == [0, 1] and all(len(v) == 5 for v in ids.values())
    assert responses[-1].usage.completion_tokens == 10
    assert sum(len(r.logprobs) for r in responses) == 10
    assert all(len(lp.top) >= 2 and lp.logprob <= 0 for r in responses for lp in r.logprobs)
    free = collect(generate(stub, max_tokens=16))[0][0]
    word = next(w for w in free.split() if len(w) > 2 and free.index(w) > 0)
    texts, _, finish, _ = collect(generate(stub, max_tokens=16, sampling={"stop": [word]}))
    assert texts[0] == free[: free.index(word)] and finish[0] == pb.FINISH_REASON_STOP


def test_tokenize_and_model_info(stub, tokenizer):
    r = stub.Tokenize(pb.TokenizeRequest(text=PROMPT))
    assert list(r.token_ids) == tokenizer(PROMPT).input_ids and r.count == len(r.token_ids) and r.max_model_len == 512
    chat = stub.Tokenize(pb.TokenizeRequest(messages=FRANCE))
    assert list(chat.token_ids) == encode_chat(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    info = stub.ModelInfo(pb.ModelInfoRequest())
    assert info.model == "apitest" and info.max_model_len == 512 and info.vocab_size == len(tokenizer)
    assert info.block_size == 16 and info.num_replicas == 1 and info.has_chat_template


# ---- graph prompts and structured output ---------------------------------------------------------

GRAPH_QUESTIONS = ("Which drug does p2 take that interacts with another?", "Which disease does p1 have?")
DRUG_SCHEMA = {"type": "object", "properties": {"drug": {"enum": ["metformin", "ibuprofen"]}}, "required": ["drug"],
               "additionalProperties": False}


def _graph_chat(question: str) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=question)])


def test_graph_prompt_is_the_locally_rendered_one_and_its_prefix_is_cached(stub, tokenizer):
    """Tokenize shows the ids graph_message + the chat template give; Generate runs exactly those, a second
    question about the graph gets its blocks from the prefix cache, and a JSON schema constrains the answer."""
    jsonschema = pytest.importorskip("jsonschema")
    graph, text = Graph.from_dict(MEDICAL), json.dumps(MEDICAL)
    ids = [encode_chat(tokenizer, [graph_message(graph, "adjacency", q)]) for q in GRAPH_QUESTIONS]
    tokens = stub.Tokenize(pb.TokenizeRequest(messages=_graph_chat(GRAPH_QUESTIONS[0]), graph=text,
                                              graph_encoding="adjacency"))
    assert list(tokens.token_ids) == ids[0]
    first = collect(generate(stub, max_tokens=1, messages=_graph_chat(GRAPH_QUESTIONS[0]), graph=text,
                             graph_encoding="adjacency"))[3]
    assert first[-1].usage.prompt_tokens == len(ids[0])
    structured = pb.StructuredOutput(json_schema=json.dumps(DRUG_SCHEMA), disable_any_whitespace=True)
    texts, _, finish, second = collect(generate(stub, max_tokens=16, messages=_graph_chat(GRAPH_QUESTIONS[1]),
                                                graph=text, graph_encoding="adjacency",
                                                sampling={"structured": structured}))
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)  # the graph's text and what precedes it
    assert second[-1].usage.prompt_tokens == len(ids[1]) and shared > 200
    assert second[-1].usage.cached_tokens == shared // 16 * 16  # every full block of it
    jsonschema.validate(json.loads(texts[0]), DRUG_SCHEMA)
    assert finish[0] == pb.FINISH_REASON_STOP and texts[0] in ('{"drug": "metformin"}', '{"drug": "ibuprofen"}')


def test_structured_output_constrains_every_kind(stub):
    kinds = {"regex": pb.StructuredOutput(regex="[A-Z]{2}-[0-9]{3}"),
             "choice": pb.StructuredOutput(choice=pb.Choices(choices=["Paris", "Lyon", "Nice"])),
             "ebnf": pb.StructuredOutput(ebnf='root ::= "(" [0-9] ")"')}
    texts = {kind: collect(generate(stub, max_tokens=8, temperature=1.0, sampling={"seed": 3, "structured": s}))[0][0]
             for kind, s in kinds.items()}
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", texts["regex"]) and texts["choice"] in ("Paris", "Lyon", "Nice")
    assert re.fullmatch(r"\([0-9]\)", texts["ebnf"]), texts


def test_bad_graph_or_constraint_is_invalid_argument_naming_the_field(stub):
    edge = json.dumps({"nodes": [{"id": "p1"}], "edges": [{"source": "p1", "target": "d9"}]})
    e = _code(generate, stub, messages=FRANCE, graph=edge)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details() == "graph.edges[0].target: 'd9' is not a node id"
    e = _code(stub.Tokenize, pb.TokenizeRequest(messages=FRANCE, graph="{nodes"))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("graph: is not valid JSON")
    e = _code(generate, stub, messages=FRANCE, graph_encoding="triples")
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("graph_encoding: given without graph")
    e = _code(generate, stub, text=PROMPT, graph=json.dumps(MEDICAL))  # a text prompt has no user message
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("graph: only chat messages")
    e = _code(generate, stub, sampling={"structured": pb.StructuredOutput(grammar="autoglm")})
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("sampling.structured.grammar: unknown grammar 'autoglm'")
    e = _code(generate, stub, sampling={"structured": pb.StructuredOutput(json_schema='{"type": "strin"}')})
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("sampling.structured.json_schema")


# ---- 2. health and reflection ------------------------------------------------------------------


def test_health_check_and_watch(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "pagoda.v1.Pagoda"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="pagoda.v1.Pagoda"))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_and_drives_generate(channel):
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"pagoda.v1.Pagoda", "grpc.health.v1.Health"} <= names

    # a client that knows nothing but the server: descriptors by reflection, messages built from them
    pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
    method = pool.FindServiceByName("pagoda.v1.Pagoda").methods_by_name["Generate"]
    request_cls = message_factory.GetMessageClass(method.input_type)
    response_cls = message_factory.GetMessageClass(method.output_type)
    call = channel.unary_stream("/pagoda.v1.Pagoda/Generate", request_serializer=request_cls.SerializeToString,
                                response_deserializer=response_cls.FromString)
    request = request_cls(text=PROMPT)
    request.sampling.max_tokens = 4
    request.sampling.temperature = 0.0
    request.sampling.ignore_eos = True
    responses = list(call(request))
    assert sum(len(r.token_ids) for r in responses) == 4 and responses[-1].usage.completion_tokens == 4


# ---- 3, 4. cancellation and deadlines reach the engine -----------------------------------------


def test_cancel_mid_stream_aborts_in_the_engine(app, stub):
    handle = app[1]
    call = generate(stub, max_tokens=400, sampling={"ignore_eos": True})
    assert next(call).token_ids
    wait_engine_busy(handle)
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    _took, stats = wait_engine_idle(handle, timeout_s=1.0)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0


def test_deadline_exceeded_aborts_the_request(app, stub):
    with pytest.raises(grpc.RpcError) as info:
        list(generate(stub, max_tokens=400, sampling={"ignore_eos": True}, timeout=0.7))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_engine_idle(app[1], timeout_s=1.0)


# ---- 5. the error table ------------------------------------------------------------------------


def _code(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        result = fn(*args, **kwargs)
        if not hasattr(result, "ListFields"):
            list(result)
    return info.value


def test_invalid_argument_names_the_field(stub):
    e = _code(generate, stub, temperature=-1.0)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "temperature" in e.details()
    e = _code(generate, stub, max_tokens=600)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in e.details()
    e = _code(stub.Generate, pb.GenerateRequest())
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in e.details()
    e = _code(generate, stub, token_ids=pb.TokenIds(ids=[10**7]))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "token ids" in e.details()
    e = _code(generate, stub, tenant="x" * 129)
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("tenant must be at most 128")


def test_unknown_model_is_not_found(stub):
    assert _code(generate, stub, model="gpt-17").code() == grpc.StatusCode.NOT_FOUND
    assert _code(stub.ModelInfo, pb.ModelInfoRequest(model="gpt-17")).code() == grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def guarded(app):
    api = ApiConfig(http_port=None, grpc_port=0, api_key="sekret", max_concurrent_requests=1, max_message_bytes=2048)
    servers = more_servers(app[2], app[0], api)
    with grpc.insecure_channel(servers.grpc_target) as ch:
        yield pb_grpc.PagodaStub(ch), ch
    servers.stop()


KEY = (("authorization", "Bearer sekret"),)


def test_unauthenticated_without_the_key(guarded):
    stub, channel = guarded
    assert _code(stub.ModelInfo, pb.ModelInfoRequest()).code() == grpc.StatusCode.UNAUTHENTICATED
    e = _code(stub.ModelInfo, pb.ModelInfoRequest(), metadata=(("authorization", "Bearer nope"),))
    assert e.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ModelInfo(pb.ModelInfoRequest(), metadata=KEY).model == "apitest"
    health = health_pb2_grpc.HealthStub(channel)  # probes need no key
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING


def test_resource_exhausted_with_retry_after(app, guarded):
    stub, _ = guarded
    e = _code(stub.Tokenize, pb.TokenizeRequest(text="x" * 4096), metadata=KEY)
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # message over max_message_bytes
    long = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=300, ignore_eos=True)),
                         metadata=KEY)
    assert next(long).token_ids  # holds the only slot
    e = _code(lambda: list(stub.Generate(pb.GenerateRequest(text=PROMPT), metadata=KEY)))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(e.trailing_metadata())["retry-after"] == "1"
    long.cancel()
    wait_engine_idle(app[1], timeout_s=1.0)


# ---- 6. TLS --------------------------------------------------------------------------------------


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    return tmp_path / "cert.pem", tmp_path / "key.pem", cert_pem, key_pem


def test_tls_and_mtls(app, tmp_path):
    cert, key, cert_pem, key_pem = _self_signed(tmp_path)
    api = ApiConfig(http_port=None, grpc_port=0, tls_cert_file=str(cert), tls_key_file=str(key))
    servers = more_servers(app[2], app[0], api)
    try:
        with grpc.secure_channel(servers.grpc_target, grpc.ssl_channel_credentials(root_certificates=cert_pem)) as ch:
            texts = collect(generate(pb_grpc.PagodaStub(ch), max_tokens=4))[0]
            assert texts[0]
        with grpc.insecure_channel(servers.grpc_target) as ch:  # plaintext is refused
            assert _code(pb_grpc.PagodaStub(ch).ModelInfo, pb.ModelInfoRequest(), timeout=5).code() == \
                grpc.StatusCode.UNAVAILABLE
    finally:
        servers.stop()
    # mTLS: the same self-signed certificate doubles as the client CA and the client's certificate
    mapi = ApiConfig(http_port=None, grpc_port=0, tls_cert_file=str(cert), tls_key_file=str(key),
                     tls_client_ca_file=str(cert))
    servers = more_servers(app[2], app[0], mapi)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert_pem, private_key=key_pem, certificate_chain=cert_pem)
        with grpc.secure_channel(servers.grpc_target, creds) as ch:
            assert pb_grpc.PagodaStub(ch).ModelInfo(pb.ModelInfoRequest(), timeout=10).model == "apitest"
        anonymous = grpc.ssl_channel_credentials(root_certificates=cert_pem)
        with grpc.secure_channel(servers.grpc_target, anonymous) as ch:
            assert _code(pb_grpc.PagodaStub(ch).ModelInfo, pb.ModelInfoRequest(), timeout=5).code() == \
                grpc.StatusCode.UNAVAILABLE
    finally:
        servers.stop()


def test_still_serving_after_errors(stub):
    assert "Paris" in collect(generate(stub, max_tokens=24, messages=FRANCE))[0][0]
