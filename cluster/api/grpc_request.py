"""pagoda.v1 request fields -> Frontend arguments: sampling (with its structured-output constraint) and the graph.

Pure functions over generated messages. Which SamplingParams field each proto field sets comes from the
dataclass's field metadata (``engine/request_fields.py``); only ``structured`` is mapped by hand. Each error is
an ApiError (INVALID_ARGUMENT) naming the field as this protocol spells it: ``sampling.structured.regex``,
``graph_encoding``, or a path into the graph's JSON text (``graph.edges[0].target``). Proto3 has no unset
string, so an empty ``graph`` or ``graph_encoding`` is absent.
"""

from __future__ import annotations

import json

from pagoda.cluster.api import errors
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.engine.graph_request import GraphRequest, GraphRequestError
from pagoda.engine.request_fields import plain_fields
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured import StructuredOutputError, StructuredOutputSpec
from pagoda.engine.structured.spec import choice_ebnf

_SAMPLING = pb.SamplingParams.DESCRIPTOR.fields_by_name
_PLAIN = plain_fields(SamplingParams, "grpc")  # (proto field, SamplingParams field): each but `structured`
_STRUCTURED = "sampling.structured"


def sampling_kwargs(s: pb.SamplingParams) -> dict:
    """Keyword arguments of ``SamplingParams``: the fields the client set. A field with presence (``optional``)
    is set when present; repeated fields and proto3 scalars without presence (``ignore_eos``) when not empty/zero."""
    kwargs = {}
    for proto_name, f in _PLAIN:
        value = getattr(s, proto_name)
        present = s.HasField(proto_name) if _SAMPLING[proto_name].has_presence else bool(value)
        if present:
            kwargs[f.name] = list(value) if f.repeated else value
    if s.HasField("structured"):
        kwargs["structured"] = structured_spec(s.structured)
    return kwargs


def structured_spec(s: pb.StructuredOutput) -> StructuredOutputSpec:
    """The spec a ``StructuredOutput`` asks for, checked by the grammar compiler's parsers."""
    kind = s.WhichOneof("constraint")
    if kind is None:
        raise errors.invalid(f"{_STRUCTURED}: set one of json_schema, json_object, regex, ebnf, grammar, choice",
                             _STRUCTURED)
    field = f"{_STRUCTURED}.{kind}"
    whitespace = not s.disable_any_whitespace
    try:
        if kind == "json_schema":
            return StructuredOutputSpec(json_schema=s.json_schema, any_whitespace=whitespace)
        if kind == "json_object":
            if not s.json_object:
                raise errors.invalid(f"{field}: must be true when set (false asks for nothing)", field)
            return StructuredOutputSpec(json_object=True, any_whitespace=whitespace)
        if kind == "choice":
            return StructuredOutputSpec(ebnf=choice_ebnf(list(s.choice.choices), field))
        return StructuredOutputSpec(**{kind: getattr(s, kind)})  # regex, ebnf, grammar: text or a name
    except StructuredOutputError as exc:
        raise errors.invalid(str(exc.at(field)), field) from None


def graph_request(graph: str, encoding: str) -> GraphRequest | None:
    """``graph`` (JSON text) and ``graph_encoding`` checked and rendered; None when no graph is given."""
    try:
        return GraphRequest.from_fields(_graph_json(graph) if graph else None, encoding or None)
    except GraphRequestError as exc:
        raise errors.invalid(str(exc), exc.field) from None


def _graph_json(text: str) -> object:
    try:
        return json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise errors.invalid("graph: the JSON nests too deeply", "graph") from None
    except ValueError as exc:
        raise errors.invalid(f"graph: is not valid JSON: {exc}", "graph") from None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")
