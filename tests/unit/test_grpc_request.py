"""pagoda.v1 request fields -> Frontend arguments (cluster/api/grpc_request.py): every structured-output kind
becomes the spec it names, and every malformed constraint or graph is INVALID_ARGUMENT naming its field."""

from __future__ import annotations

import json

import grpc
import pytest

from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.grpc_request import graph_request, sampling_kwargs
from pagoda.engine.graph_request import GraphRequest
from pagoda.engine.structured import StructuredOutputSpec
from pagoda.engine.structured.spec import choice_ebnf
from tests.unit.test_graph_prompt import MEDICAL

SCHEMA = {"type": "object", "properties": {"drug": {"enum": ["metformin", "ibuprofen"]}}, "required": ["drug"]}


def _spec(**structured) -> StructuredOutputSpec:
    return sampling_kwargs(pb.SamplingParams(structured=pb.StructuredOutput(**structured)))["structured"]


def test_each_kind_becomes_its_spec():
    assert _spec(json_schema=json.dumps(SCHEMA)) == StructuredOutputSpec(json_schema=SCHEMA)
    assert _spec(json_schema=json.dumps(SCHEMA), disable_any_whitespace=True) == \
        StructuredOutputSpec(json_schema=SCHEMA, any_whitespace=False)
    assert _spec(json_object=True) == StructuredOutputSpec(json_object=True)
    assert _spec(regex="[A-Z]{2}") == StructuredOutputSpec(regex="[A-Z]{2}")
    assert _spec(ebnf='root ::= "yes" | "no"') == StructuredOutputSpec(ebnf='root ::= "yes" | "no"')
    assert _spec(grammar="autoglm-action") == StructuredOutputSpec(grammar="autoglm-action")
    assert _spec(choice=pb.Choices(choices=["yes", "no"])) == StructuredOutputSpec(ebnf=choice_ebnf(["yes", "no"]))
    assert "structured" not in sampling_kwargs(pb.SamplingParams(max_tokens=3))


@pytest.mark.parametrize("structured, field, message", [
    ({}, "sampling.structured", "set one of json_schema"),
    ({"json_schema": "{not json"}, "sampling.structured.json_schema", "is not valid JSON"),
    ({"json_schema": "[1]"}, "sampling.structured.json_schema", "must be a JSON schema object"),
    ({"json_object": False}, "sampling.structured.json_object", "must be true"),
    ({"regex": "("}, "sampling.structured.regex", "invalid regex"),
    ({"ebnf": "root ::= ("}, "sampling.structured.ebnf", "invalid ebnf"),
    ({"grammar": "autoglm"}, "sampling.structured.grammar", "unknown grammar 'autoglm'; registered: autoglm-action"),
    ({"choice": pb.Choices()}, "sampling.structured.choice", "non-empty list of strings"),
])
def test_bad_constraints_are_invalid_argument_naming_the_field(structured, field, message):
    with pytest.raises(ApiError) as info:
        _spec(**structured)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.param == field
    assert info.value.message.startswith(field) and message in info.value.message


def test_graph_is_json_text():
    assert graph_request("", "") is None
    assert graph_request(json.dumps(MEDICAL), "") == GraphRequest.from_fields(MEDICAL)
    assert graph_request(json.dumps(MEDICAL), "triples") == GraphRequest.from_fields(MEDICAL, "triples")


@pytest.mark.parametrize("graph, encoding, field", [
    ('{"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "b"}]}', "", "graph.edges[0].target"),
    ('{"nodes": [{"id": "a", "attributes": {"w": NaN}}]}', "", "graph"),  # not JSON at all
    ('{"nodes": [', "", "graph"),
    ("[" * 100_000, "", "graph"),
    ('{"nodes": [{"id": "\\ud800"}]}', "", "graph"),
    ("", "incident", "graph_encoding"),
    ('{"nodes": [{"id": "a"}]}', "prose", "graph_encoding"),
])
def test_bad_graph_is_invalid_argument_naming_the_element(graph, encoding, field):
    with pytest.raises(ApiError) as info:
        graph_request(graph, encoding)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.param == field
    assert info.value.message.startswith(field)
