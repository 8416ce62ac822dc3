"""The OpenAI-compatible HTTP API, driven by the official ``openai`` package against a real local
Ray cluster + Serve app (one CPU replica of the embedded model, shared with test_grpc_api: conftest.py) and
uvicorn on 127.0.0.1."""

from __future__ import annotations

import json
import re

import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
try:  # the HTTP client the installed openai package uses (httpx, or its fork httpx2)
    import httpx2 as httpx
except ImportError:
    httpx = pytest.importorskip("httpx")

from pagoda.cluster.api.config import ApiConfig
from pagoda.engine.graph_prompt import Graph, graph_message
from pagoda.engine.tokenizer import encode_chat, load_tokenizer
from tests.integration.api_app import more_servers, wait_engine_busy, wait_engine_idle
from tests.unit.test_graph_prompt import MEDICAL

MODEL = "apitest"
PROMPT = "The capital of France is"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app[2].http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer(embedded_path):
    return load_tokenizer(embedded_path)


@pytest.fixture(scope="module")
def guarded(app):
    """A second pair of servers over the same replica: API key required, one request at a time,
    small messages."""
    api = ApiConfig(http_port=0, grpc_port=None, api_key="sekret", max_concurrent_requests=1, max_message_bytes=2048)
    other = more_servers(app[2], app[0], api)
    yield other
    other.stop()


# ---- 1. completions and chat --------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_greedy_with_usage(client, tokenizer):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.text and choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert r.usage.completion_tokens == len(tokenizer(choice.text, add_special_tokens=False).input_ids) or \
        r.usage.completion_tokens <= 8
    if choice.finish_reason == "length":
        assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_matches_non_stream(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_answers_paris(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and "Paris" in r.choices[0].message.content
    assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10


def test_chat_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n2_gives_two_choices_and_counts_both(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1]
    assert r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=5, n=2, seed=3,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    finishes = [(ch.index, ch.finish_reason) for c in chunks for ch in c.choices if ch.finish_reason]
    assert sorted(finishes) == [(0, "length"), (1, "length")]
    assert chunks[-1].usage.completion_tokens == 10


def test_stop_string_cuts_the_text(client):
    free = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0).choices[0].text
    word = next(w for w in free.split() if len(w) > 2 and free.index(w) > 0)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[word])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == free[: free.index(word)]


def test_max_tokens_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True, "priority": -1, "tenant": "team-a"})
    lp = r.choices[0].logprobs
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


# ---- 3. a dropped SSE stream aborts the request ------------------------------------------------


def test_dropped_sse_stream_aborts_in_the_engine(app):
    _, handle, servers = app
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", servers.http_url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"]
        wait_engine_busy(handle)
    # leaving the block closed the connection mid-stream
    _took, stats = wait_engine_idle(handle, timeout_s=1.0)
    assert stats["num_running"] == 0 and stats["kv_cache_usage"] == 0


def test_client_leaving_a_non_streaming_request_aborts_it(app):
    _, handle, servers = app
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(servers.http_url + "/v1/completions", json=body, timeout=1.5)  # gives up, closes the socket
    _took, stats = wait_engine_idle(handle, timeout_s=1.0)
    assert stats["kv_cache_usage"] == 0


# ---- 5. the error table ------------------------------------------------------------------------


def _error(client, **kwargs):
    with pytest.raises(openai.APIStatusError) as info:
        client.completions.create(model=kwargs.pop("model", MODEL), prompt=kwargs.pop("prompt", PROMPT), **kwargs)
    return info.value


def test_bad_parameter_is_400_naming_the_field(client):
    e = _error(client, max_tokens=16, temperature=-1)
    assert e.status_code == 400 and e.body["param"] == "temperature" and e.body["type"] == "invalid_request_error"
    e = _error(client, max_tokens=600)
    assert e.status_code == 400 and e.body["param"] == "max_tokens" and "max_model_len (512)" in e.body["message"]
    e = _error(client, max_tokens="many")
    assert e.status_code == 400 and e.body["param"] == "max_tokens"
    e = _error(client, max_tokens=4, extra_body={"tenant": "two words"})
    assert e.status_code == 400 and e.body["param"] == "tenant" and "letters, digits" in e.body["message"]


def test_response_format_json_schema_constrains_the_answer(client):
    """OpenAI's response_format and vLLM's structured_outputs reach the sampler (xgrammar masks); a schema
    the grammar compiler refuses is a 400 naming the field, never ignored."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "sunny"], "additionalProperties": False}
    chat = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "The weather in Paris, as JSON."}], max_tokens=48,
        temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    answer = json.loads(chat.choices[0].message.content)
    assert set(answer) == {"city", "sunny"} and isinstance(answer["sunny"], bool)
    assert chat.choices[0].finish_reason == "stop"
    plate = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                      extra_body={"structured_outputs": {"regex": "[A-Z]{2}-[0-9]{3}"}})
    assert re.fullmatch("[A-Z]{2}-[0-9]{3}", plate.choices[0].text)
    e = _error(client, max_tokens=8, extra_body={"response_format": {"type": "xml"}})
    assert e.status_code == 400 and e.body["param"] == "response_format.type"
    e = _error(client, max_tokens=8, extra_body={"structured_outputs": {"regex": "a", "grammar": "autoglm-action"}})
    assert e.status_code == 400 and e.body["param"].startswith("structured_outputs")


# ---- graph prompts: the graph's text before the first user message ------------------------------

GRAPH_QUESTIONS = ("Which drug does p2 take that interacts with another?", "Which disease does p1 have?")
DRUG_SCHEMA = {"type": "object", "properties": {"drug": {"enum": ["metformin", "ibuprofen"]}}, "required": ["drug"],
               "additionalProperties": False}


def test_chat_graph_is_the_locally_rendered_prompt_and_its_prefix_is_cached(client, tokenizer):
    """Token for token the prompt graph_message + the chat template give; a second question about the same
    graph is served the graph's blocks from the prefix cache; with response_format the answer is schema JSON."""
    jsonschema = pytest.importorskip("jsonschema")
    graph = Graph.from_dict(MEDICAL)
    ids = [encode_chat(tokenizer, [graph_message(graph, "triples", q)]) for q in GRAPH_QUESTIONS]
    first = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": GRAPH_QUESTIONS[0]}],
                                           max_tokens=1, temperature=0,
                                           extra_body={"graph": MEDICAL, "graph_encoding": "triples"})
    assert first.usage.prompt_tokens == len(ids[0])
    second = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": GRAPH_QUESTIONS[1]}], max_tokens=32, temperature=0,
        extra_body={"graph": MEDICAL, "graph_encoding": "triples"},
        response_format={"type": "json_schema", "json_schema": {"name": "drug", "schema": DRUG_SCHEMA}})
    shared = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)  # the graph's text and what precedes it
    assert second.usage.prompt_tokens == len(ids[1]) and shared > 200
    assert second.usage.prompt_tokens_details.cached_tokens == shared // 16 * 16  # every full block of it
    jsonschema.validate(json.loads(second.choices[0].message.content), DRUG_SCHEMA)


def test_bad_graph_is_400_naming_the_element(client):
    def chat_error(**extra):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, extra_body=extra)
        return info.value.body

    edge = {"nodes": [{"id": "p1"}], "edges": [{"source": "p1", "target": "d9"}]}
    body = chat_error(graph=edge)
    assert body["param"] == "graph.edges[0].target" and body["message"] == \
        "graph.edges[0].target: 'd9' is not a node id"
    assert chat_error(graph_encoding="triples")["param"] == "graph_encoding"
    assert chat_error(graph={"nodes": [{"id": "p1"}]}, graph_encoding="prose")["param"] == "graph_encoding"
    e = _error(client, max_tokens=2, extra_body={"graph": {"nodes": [{"id": "p1"}]}})
    assert e.status_code == 400 and e.body["param"] == "graph" and "/v1/chat/completions" in e.body["message"]


def test_unknown_model_is_404(client):
    e = _error(client, model="gpt-17")
    assert e.status_code == 404 and e.body["param"] == "model" and e.body["code"] == "not_found"


def test_deadline_is_504_and_aborts(app):
    _, handle, servers = app
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}
    r = httpx.post(servers.http_url + "/v1/completions", json=body, headers={"Request-Timeout": "0.5"}, timeout=30)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    wait_engine_idle(handle, timeout_s=1.0)


def test_api_key_is_401_without_it(guarded):
    url = guarded.http_url + "/v1/completions"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    keyed = openai.OpenAI(base_url=guarded.http_url + "/v1", api_key="sekret", max_retries=0)
    assert keyed.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].text is not None


def test_backpressure_is_429_with_retry_after_and_size_413_without(app, guarded):
    url = guarded.http_url + "/v1/completions"
    auth = {"Authorization": "Bearer sekret"}
    big = httpx.post(url, json={"model": MODEL, "prompt": "x" * 4096}, headers=auth)
    assert big.status_code == 413 and "retry-after" not in big.headers  # the same body can never fit
    assert "limit is 2048" in big.json()["error"]["message"]
    long_body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=long_body, headers=auth) as r:
        assert r.status_code == 200  # holds the only slot
        second = httpx.post(url, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, headers=auth)
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["error"]["type"] == "rate_limit_error"  # refused before routing, the route's body
        wrong = httpx.post(url, json={"model": MODEL, "prompt": PROMPT}, headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401  # the key is checked first, full or not
        assert httpx.get(guarded.http_url + "/v1/models", headers=auth).status_code == 200  # not a generate path
    wait_engine_idle(app[1], timeout_s=1.0)


def test_still_serving_after_errors(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content


# ---- served model names (vLLM's --served-model-name with several names) -------------------------


@pytest.fixture(scope="module")
def aliased(app):
    """Servers over the same replica that answer to two names (Open-AutoGLM calls its model autoglm-phone-9b)."""
    api = ApiConfig(http_port=0, grpc_port=0, served_model_name=["autoglm-phone-9b", "glm4v"])
    other = more_servers(app[2], app[0], api)
    yield other
    other.stop()


def test_every_served_name_is_listed_and_answers_under_its_own_name(aliased):
    client = openai.OpenAI(base_url=aliased.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["autoglm-phone-9b", "glm4v"]
    for name in ("autoglm-phone-9b", "glm4v"):
        r = client.chat.completions.create(model=name, messages=FRANCE, max_tokens=4, temperature=0)
        assert r.model == name and r.choices[0].message.content
    chunks = list(client.chat.completions.create(model="glm4v", messages=FRANCE, max_tokens=4, stream=True))
    assert {c.model for c in chunks} == {"glm4v"}
    with pytest.raises(openai.NotFoundError, match="served: autoglm-phone-9b, glm4v"):
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=4)


def test_grpc_model_info_reports_the_served_names(aliased):
    import grpc

    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{aliased.grpc_port}") as channel:
        info = pb_grpc.PagodaStub(channel).ModelInfo(pb.ModelInfoRequest(model="glm4v"), timeout=30)
    assert info.model == "glm4v" and list(info.served_model_names) == ["autoglm-phone-9b", "glm4v"]
