"""OpenAI request parsing and response shapes, as pure functions."""

from __future__ import annotations

import pytest

from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.openai_protocol import Accumulator, completion_response, parse_request
from pagoda.cluster.protocol import GenerateChunk
from pagoda.engine.request import CompletionOutput, Logprob, RequestOutput


def test_completion_body_maps_to_sampling_params():
    req = parse_request({"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0, "n": 2, "stop": "x",
                         "logprobs": 1, "priority": -3, "top_k": 4, "stream": True,
                         "stream_options": {"include_usage": True}, "tenant": "team-a"}, chat=False)
    assert req.prompt == {"text": "hi"} and req.priority == -3 and req.stream and req.include_usage
    assert req.tenant == "team-a" and parse_request({"prompt": "hi"}, chat=False).tenant is None
    assert req.sampling == {"max_tokens": 5, "temperature": 0, "n": 2, "stop": ["x"], "logprobs": 1, "top_k": 4}


def test_chat_body_and_token_prompts():
    req = parse_request({"messages": [{"role": "user", "content": "q"}], "max_completion_tokens": 7,
                         "logprobs": True, "top_logprobs": 3}, chat=True)
    assert req.sampling == {"max_tokens": 7, "logprobs": 3} and req.top_logprobs == 3
    assert parse_request({"prompt": [[1, 2, 3]]}, chat=False).prompt == {"token_ids": [1, 2, 3]}


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "stop": [1]}, "stop"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "x", "tenant": 7}, "tenant"),  # the name itself is checked by Frontend.generate (test_api_errors)
    ([], "body"),
])
def test_bad_fields_are_named(body, param):
    with pytest.raises(ApiError) as info:
        parse_request(body, chat=False)
    assert info.value.http_status == 400 and info.value.param == param


def test_accumulated_response_counts_usage():
    req = parse_request({"prompt": "p", "n": 2, "logprobs": 0}, chat=False)
    acc = Accumulator(2)
    lp = {5: Logprob(-0.5, 1, "a")}
    for finished in (False, True):
        acc.add(GenerateChunk(RequestOutput("r", "p", [] if finished else [1, 2, 3], [
            CompletionOutput(0, "a", [5], logprobs=[lp], finish_reason="length" if finished else None),
            CompletionOutput(1, "a" if not finished else "", [5] if not finished else [], logprobs=[lp][: not finished],
                             finish_reason="stop" if finished else None)], finished, 2), "fake", 3))
    body = completion_response(req, "m", acc)
    assert [c["text"] for c in body["choices"]] == ["aa", "a"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop"]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-0.5, -0.5]


def test_chat_graph_is_checked_and_rendered_for_the_frontend():
    from pagoda.engine.graph_request import GraphRequest
    from tests.unit.test_graph_prompt import MEDICAL

    messages = [{"role": "user", "content": "q"}]
    req = parse_request({"messages": messages, "graph": MEDICAL, "graph_encoding": "triples"}, chat=True)
    assert req.prompt == {"messages": messages, "graph": GraphRequest.from_fields(MEDICAL, "triples")}
    assert parse_request({"messages": messages, "graph": None}, chat=True).prompt == {"messages": messages}


@pytest.mark.parametrize("body, chat, param", [
    ({"graph": {"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "b"}]}}, True, "graph.edges[0].target"),
    ({"graph": {"nodes": [{"id": "a"}]}, "graph_encoding": "prose"}, True, "graph_encoding"),
    ({"graph_encoding": "incident"}, True, "graph_encoding"),
    ({"graph": {"nodes": [{"id": "a"}]}}, False, "graph"),  # /v1/completions: the prompt is the client's exact text
    ({"graph_encoding": "incident"}, False, "graph_encoding"),
])
def test_bad_graph_fields_are_named(body, chat, param):
    body = {**body, **({"messages": [{"role": "user", "content": "q"}]} if chat else {"prompt": "q"})}
    with pytest.raises(ApiError) as info:
        parse_request(body, chat=chat)
    assert info.value.http_status == 400 and info.value.param == param and info.value.message.startswith(param)
