"""SamplingParams' field metadata (engine/request_fields.py) is the one list of sampling fields: every field
decides its OpenAI, gRPC and CLI names; the pagoda.v1 SamplingParams message has exactly the fields the metadata
names, with compatible types; and the OpenAI parser, the gRPC mapping and the CLI carry every named field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import pytest
from google.protobuf.descriptor import FieldDescriptor as FD

from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.grpc_request import sampling_kwargs
from pagoda.cluster.api.openai_protocol import parse_request
from pagoda.engine.cli import build_parser
from pagoda.engine.cli_session import sampling_params_from_args
from pagoda.engine.request_fields import Exposed, Hidden, plain_fields, request_fields, spec
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured import StructuredOutputSpec

FIELDS = request_fields(SamplingParams)
REGEX = StructuredOutputSpec(regex="[0-9]+")
# A valid value other than the default for each field (floats exact in float32, the proto's type).
EXAMPLES = {"n": 2, "temperature": 0.5, "top_p": 0.75, "top_k": 4, "min_p": 0.25, "repetition_penalty": 1.5,
            "presence_penalty": -0.5, "frequency_penalty": 0.5, "seed": 7, "stop": ("x", "yz"),
            "stop_token_ids": (3, 4), "max_tokens": 9, "min_tokens": 2, "ignore_eos": True, "logprobs": 3,
            "skip_special_tokens": False, "structured": REGEX}
# A custom field as each front end spells it: (what the client sends, the SamplingParams value it becomes).
OPENAI_CUSTOM = {"stop": ("x", ("x",)), "logprobs": (3, 3),  # /v1/completions: logprobs is a count
                 "structured": ({"type": "json_object"}, StructuredOutputSpec(json_object=True))}  # response_format
GRPC_CUSTOM = {"structured": (pb.StructuredOutput(regex="[0-9]+"), REGEX)}
CLI_CUSTOM = {"stop": (["--stop", "x", "--stop", "yz"], ("x", "yz")),
              "stop_token_ids": (["--stop-token-ids", "3", "4"], (3, 4)), "structured": (["--regex", "[0-9]+"], REGEX)}


def _by(front: str) -> list:
    return [(f, e) for f in FIELDS if isinstance(e := f.exposure(front), Exposed)]


def _cases(front: str, custom: dict, plain) -> list:
    """(field, front end's name, what the client sends, the value it must become) for each named field."""
    return [(f, e.name, *custom.get(f.name, (plain(e.name, EXAMPLES[f.name]), EXAMPLES[f.name])))
            for f, e in _by(front)]


def _wire(name: str, value):
    return list(value) if isinstance(value, tuple) else value


def _carried(params: SamplingParams, cases: list) -> None:
    assert {f.name: getattr(params, f.name) for f, *_ in cases} == {f.name: want for f, *_, want in cases}


# ------------------------------------------------------------------------------------------- (1) metadata


def test_every_field_decides_every_front_end():
    assert [f.name for f in FIELDS] == [f.name for f in dataclasses.fields(SamplingParams)]
    assert set(EXAMPLES) == {f.name for f in FIELDS}, "give the new field an example here"
    for f in FIELDS:
        for front in ("openai", "grpc", "cli"):
            e = f.exposure(front)
            assert isinstance(e, Exposed) and e.name or isinstance(e, Hidden) and e.reason, (f.name, front)


def test_a_field_without_metadata_is_named():
    @dataclass(frozen=True)
    class Params:
        a: int = field(default=1, metadata=spec("a", openai="a", grpc="a", cli="--a"))
        b: int = 2

    with pytest.raises(TypeError, match=r"Params\.b has no front-end spec"):
        request_fields(Params)
    with pytest.raises(ValueError, match="hidden field must say why"):
        spec("c", openai=Hidden(""), grpc="c", cli="--c")
    with pytest.raises(ValueError, match="CLI flag starts with --"):
        spec("c", openai="c", grpc="c", cli="c")


# ----------------------------------------------------------------------------------------------- (2) gRPC

_INTS = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_UINT32, FD.TYPE_UINT64, FD.TYPE_SINT32, FD.TYPE_SINT64}
_SIGNED = {FD.TYPE_INT32, FD.TYPE_INT64, FD.TYPE_SINT32, FD.TYPE_SINT64}
_PROTO_TYPES = {int: _INTS, float: {FD.TYPE_FLOAT, FD.TYPE_DOUBLE}, bool: {FD.TYPE_BOOL}, str: {FD.TYPE_STRING}}
_ZERO = {int: 0, float: 0.0, bool: False, str: ""}


def _repeated(fd) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == FD.LABEL_REPEATED  # older protobuf


def test_proto_fields_are_the_metadata_grpc_names_with_compatible_types():
    proto = pb.SamplingParams.DESCRIPTOR.fields_by_name
    named = {e.name: f for f, e in _by("grpc")}
    assert set(proto) == set(named), "pagoda.v1 SamplingParams and SamplingParams' grpc= metadata differ"
    for name, f in named.items():
        fd = proto[name]
        assert _repeated(fd) == f.repeated, name  # tuple[X, ...] <-> repeated X
        assert fd.type in _PROTO_TYPES.get(f.type, {FD.TYPE_MESSAGE}), name
        if isinstance(f.default, int) and not isinstance(f.default, bool) and f.default < 0:
            assert fd.type in _SIGNED, f"{name}: its default {f.default} needs a signed type"
        if not f.repeated and not fd.has_presence:  # unset reads as zero: right only where zero is the default
            assert not f.optional and f.default == _ZERO[f.type], f"{name}: make it `optional` in the proto"


def test_grpc_carries_every_named_field():
    cases = _cases("grpc", GRPC_CUSTOM, _wire)
    _carried(SamplingParams(**sampling_kwargs(pb.SamplingParams(**{name: sent for _, name, sent, _ in cases}))), cases)
    assert sampling_kwargs(pb.SamplingParams()) == {}  # unset: the engine's defaults (skip_special_tokens stays on)
    assert {e.name for _, e in _by("grpc") if e.custom} == {"structured"}  # by hand: grpc_request.structured_spec


# ------------------------------------------------------------------------------------------ (3) OpenAI, CLI


def test_openai_parser_accepts_every_named_field():
    cases = _cases("openai", OPENAI_CUSTOM, _wire)
    body = {"prompt": "q", **{name: sent for _, name, sent, _ in cases}}
    _carried(SamplingParams(**parse_request(body, chat=False).sampling), cases)
    assert parse_request({"prompt": "q"}, chat=False).sampling == {}


@pytest.mark.parametrize("name", [name for name, _ in plain_fields(SamplingParams, "openai")])
def test_openai_plain_field_of_the_wrong_type_is_a_400_naming_it(name):
    with pytest.raises(ApiError) as info:
        parse_request({"prompt": "q", name: "1"}, chat=False)
    assert info.value.http_status == 400 and info.value.param == name


def _generate_parser():
    return build_parser({})._subparsers._group_actions[0].choices["generate"]


def test_cli_has_every_named_flag_with_the_dataclass_default():
    generate = _generate_parser()
    for f, e in _by("cli"):
        action = generate._option_string_actions[e.name]
        assert action.dest == f.name, e.name  # sampling_params_from_args reads the field's name
        assert (tuple(action.default) if f.repeated else action.default) == f.cli_default, e.name
    # the CLI's own defaults, declared in the metadata: greedy, and room for a few sentences
    declared = {f.name: f.cli_default for f in FIELDS if f.spec.cli_default is not dataclasses.MISSING}
    assert declared == {"temperature": 0.0, "max_tokens": 256}
    assert sampling_params_from_args(generate.parse_args(["q"])) == dataclasses.replace(SamplingParams(), **declared)


def test_cli_carries_every_named_field():
    cases = _cases("cli", CLI_CUSTOM, lambda flag, value: [flag] if value is True else [flag, str(value)])
    argv = ["q", *(arg for _, _, sent, _ in cases for arg in sent)]
    _carried(sampling_params_from_args(_generate_parser().parse_args(argv)), cases)
