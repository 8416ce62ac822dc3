"""A request's graph (engine/graph_request.py): the fields checked with the element named, the text written
before the first user message exactly as graph_message writes it, and the README's example files."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import pytest

from pagoda.engine.graph_prompt import DEFAULT_ENCODING, Graph, graph_message, render
from pagoda.engine.graph_request import GraphRequest, GraphRequestError
from pagoda.engine.structured import StructuredOutputSpec
from tests.unit.test_graph_prompt import MEDICAL, medical

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
QUESTION = "Which drugs interact?"


def test_no_graph_is_none_and_the_encoding_defaults():
    assert GraphRequest.from_fields(None) is None
    request = GraphRequest.from_fields(MEDICAL)
    assert request.encoding == DEFAULT_ENCODING and request.text == render(Graph.from_dict(MEDICAL), DEFAULT_ENCODING)
    assert GraphRequest.from_fields(MEDICAL, "triples").text == render(Graph.from_dict(MEDICAL), "triples")


def test_text_goes_before_the_first_user_message_as_graph_message_writes_it():
    request = GraphRequest.from_fields(MEDICAL, "adjacency")
    messages = [{"role": "system", "content": "You are a pharmacist."}, {"role": "user", "content": QUESTION},
                {"role": "assistant", "content": "m2 and m1."}, {"role": "user", "content": "How severe?"}]
    before = copy.deepcopy(messages)
    out = request.into(messages)
    assert messages == before  # not modified
    assert out[1] == graph_message(Graph.from_dict(MEDICAL), "adjacency", QUESTION)
    assert out[0] == messages[0] and out[2:] == messages[2:]
    assert request.into([{"role": "user", "content": ""}])[0] == graph_message(Graph.from_dict(MEDICAL), "adjacency")


def test_content_parts_get_the_text_as_their_first_part():
    request = GraphRequest.from_fields(MEDICAL)
    parts = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    assert request.into([{"role": "user", "content": parts}])[0]["content"] == \
        [{"type": "text", "text": request.text + "\n\n"}, *parts]


def test_a_conversation_without_a_user_message_is_refused():
    with pytest.raises(GraphRequestError) as info:
        GraphRequest.from_fields(MEDICAL).into([{"role": "system", "content": "hi"}])
    assert info.value.field == "graph" and "no user message" in str(info.value)


def _bad_target() -> dict:
    data = medical()
    data["edges"][0]["target"] = "p9"
    return data


@pytest.mark.parametrize("graph, encoding, field, message", [
    (_bad_target(), None, "graph.edges[0].target", "graph.edges[0].target: 'p9' is not a node id"),
    ({"nodes": [{"id": "a", "attributes": {"blood pressure": [120, 80]}}]}, None,
     'graph.nodes[0].attributes["blood pressure"]', "must be a string, finite number or boolean, got array"),
    ({"nodes": [{"id": "a", "attributes": {"hba1c": float("nan")}}]}, None, "graph.nodes[0].attributes.hba1c", "NaN"),
    ({"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "a"}, {"source": "a", "target": "a"}]}, None,
     "graph.edges[1]", "duplicates graph.edges[0]"),
    ({"nodes": []}, None, "graph.nodes", "a graph needs at least 1 node"),
    ([1], None, "graph", "must be an object, got array"),
    (None, "incident", "graph_encoding", "given without graph"),
    (MEDICAL, "prose", "graph_encoding", "'prose' is not supported (supported: adjacency, incident, triples)"),
    (MEDICAL, 3, "graph_encoding", "3 is not supported"),
    ({"nodes": [{"id": "a\ud800"}]}, None, "graph", "lone surrogate"),
])
def test_errors_name_the_element(graph, encoding, field, message):
    with pytest.raises(GraphRequestError) as info:
        GraphRequest.from_fields(graph, encoding)
    assert info.value.field == field and message in str(info.value) and str(info.value).startswith(field)
    again = pickle.loads(pickle.dumps(info.value))  # errors cross process boundaries intact
    assert again.field == field and str(again) == str(info.value)


def test_readme_example_files():
    """docs/examples/ holds the graph the tests use and a diagnosis schema the grammar compiler takes."""
    assert json.loads((EXAMPLES / "medical_graph.json").read_text()) == MEDICAL
    schema = json.loads((EXAMPLES / "diagnosis.schema.json").read_text())
    assert StructuredOutputSpec(json_schema=schema, any_whitespace=False).kind == "json_schema"
