"""The pagoda.v1 contract: every field commented, enums start at *_UNSPECIFIED = 0, stubs in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb

PROTO = Path(__file__).resolve().parents[2] / "cluster" / "api" / "proto" / "pagoda" / "v1" / "pagoda.proto"


def test_every_field_has_a_comment():
    fields = [line for line in PROTO.read_text().splitlines() if re.search(r"=\s*\d+;", line)]
    assert fields and all("//" in line for line in fields), [line for line in fields if "//" not in line]


def test_enums_start_unspecified():
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        first = enum.values_by_number[0]
        assert first.name == re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_UNSPECIFIED"


def test_stubs_match_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    out = tmp_path / "out.bin"
    assert protoc.main(["protoc", f"-I{PROTO.parents[2]}", f"--descriptor_set_out={out}", "pagoda/v1/pagoda.proto"]) == 0
    from google.protobuf import descriptor_pb2

    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in fresh.message_type:  # protoc fills json_name in descriptor sets; the gencode has none
        for f in message.field:
            f.ClearField("json_name")
    current = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(current)
    assert fresh == current, "regenerate: python -m pagoda.cluster.api.gen_stubs"
