"""``pagoda generate``'s --graph, --graph-encoding, --json-schema, --regex and --grammar (engine/cli_inputs.py):
parsed into the engine's objects, and every bad file or combination an argparse error naming the flag, before
any model loads."""

from __future__ import annotations

import json

import pytest

from pagoda.engine.cli import build_parser, main
from pagoda.engine.graph_prompt import Graph
from pagoda.engine.structured import StructuredOutputSpec
from tests.unit.test_graph_prompt import MEDICAL

SCHEMA = {"type": "object", "properties": {"drug": {"enum": ["metformin", "ibuprofen"]}}, "required": ["drug"]}


@pytest.fixture
def files(tmp_path):
    paths = {"graph": tmp_path / "graph.json", "schema": tmp_path / "schema.json", "ebnf": tmp_path / "yes.ebnf",
             "bad_graph": tmp_path / "bad_graph.json", "bad_schema": tmp_path / "bad_schema.json",
             "not_json": tmp_path / "not.json"}
    paths["graph"].write_text(json.dumps(MEDICAL))
    paths["schema"].write_text(json.dumps(SCHEMA))
    paths["ebnf"].write_text('root ::= "yes" | "no"')
    paths["bad_graph"].write_text(json.dumps({"nodes": [{"id": "a"}], "edges": [{"source": "a", "target": "b"}]}))
    paths["bad_schema"].write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strin"}}}))
    paths["not_json"].write_text("{nodes")
    return {name: str(path) for name, path in paths.items()}


def _parse(*argv):
    return build_parser({}).parse_args(["generate", "q", *argv])


def test_flags_become_the_engines_objects(files):
    args = _parse("--graph", files["graph"], "--graph-encoding", "triples", "--json-schema", files["schema"])
    assert args.graph == Graph.from_dict(MEDICAL) and args.graph_encoding == "triples"
    assert args.structured == StructuredOutputSpec(json_schema=SCHEMA, any_whitespace=False)  # compact JSON
    assert _parse("--regex", "[0-9]+").structured == StructuredOutputSpec(regex="[0-9]+")
    assert _parse("--grammar", "autoglm-action").structured == StructuredOutputSpec(grammar="autoglm-action")
    assert _parse("--grammar", files["ebnf"]).structured == StructuredOutputSpec(ebnf='root ::= "yes" | "no"')
    plain = _parse()
    assert plain.graph is None and plain.graph_encoding is None and plain.structured is None


@pytest.mark.parametrize("argv, expected", [
    (["--graph", "{bad_graph}"], "argument --graph: {bad_graph}: graph.edges[0].target: 'b' is not a node id"),
    (["--graph", "{not_json}"], "argument --graph: {not_json} is not valid JSON"),
    (["--graph", "/no/such.json"], "argument --graph: cannot read /no/such.json: No such file or directory"),
    (["--graph", "{graph}", "--graph-encoding", "prose"], "argument --graph-encoding: invalid choice: 'prose'"),
    (["--json-schema", "{bad_schema}"], "argument --json-schema: {bad_schema}: invalid json schema"),
    (["--regex", "("], "argument --regex: invalid regex"),
    (["--grammar", "autoglm"], "argument --grammar: 'autoglm' is neither a registered grammar (autoglm-action)"),
    (["--regex", "a", "--json-schema", "{schema}"], "argument --json-schema: not allowed with argument --regex"),
    (["--graph-encoding", "triples"], "argument --graph-encoding: needs --graph"),
    (["--graph", "{graph}", "--raw"], "argument --graph: not with --raw"),
])
def test_bad_inputs_are_argparse_errors_naming_the_flag(files, capsys, argv, expected):
    with pytest.raises(SystemExit) as info:
        main(["generate", "q", *(a.format(**files) for a in argv)])
    assert info.value.code == 2
    assert expected.format(**files) in capsys.readouterr().err
