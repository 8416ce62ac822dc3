"""The `pagoda` command line, run as a user would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import requires_smollm2

CLI = [sys.executable, "-m", "pagoda.engine.cli"]
MEDICAL_GRAPH = Path(__file__).resolve().parents[2] / "docs" / "examples" / "medical_graph.json"
DRUG_SCHEMA = {"type": "object", "properties": {"drug": {"enum": ["metformin", "ibuprofen"]}}, "required": ["drug"],
               "additionalProperties": False}


def _run(args, stdin=None, timeout=300):
    return subprocess.run(CLI + args, input=stdin, capture_output=True, text=True, timeout=timeout)


def test_help_documents_every_sampling_flag():
    out = _run(["generate", "--help"]).stdout
    for flag in ("--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--presence-penalty",
                 "--frequency-penalty", "--seed", "--max-tokens", "--min-tokens", "--stop", "--stop-token-ids",
                 "--ignore-eos", "--graph", "--graph-encoding", "--json-schema", "--regex", "--grammar"):
        assert flag in out


def test_bad_flag_value_is_a_clear_error():
    result = _run(["generate", "hi", "--top-p", "0"])
    assert result.returncode == 2
    assert "top_p must be in (0, 1]" in result.stderr


@requires_smollm2
def test_generate_answers_paris():
    result = _run(["generate", "What is the capital of France?", "--max-tokens", "32"])
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@requires_smollm2
def test_chat_keeps_the_conversation():
    result = _run(["chat", "--max-tokens", "24"], stdin="What is the capital of France?\nAnd of Germany?\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pagoda> ") == 2
    assert "Paris" in result.stdout


@requires_smollm2
def test_generate_answers_about_a_graph_as_schema_json(tmp_path):
    """The README's graph example, with a schema short enough for a test: the answer is JSON it admits."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = tmp_path / "drug.schema.json"
    schema.write_text(json.dumps(DRUG_SCHEMA))
    result = _run(["generate", "--graph", str(MEDICAL_GRAPH), "--graph-encoding", "triples", "--json-schema",
                   str(schema), "--max-tokens", "16", "Which drug does p2 take that interacts with another?"])
    assert result.returncode == 0, result.stderr
    jsonschema.validate(json.loads(result.stdout), DRUG_SCHEMA)
