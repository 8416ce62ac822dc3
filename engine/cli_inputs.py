"""What ``pagoda generate`` and ``pagoda chat`` read for ``--graph``, ``--json-schema``, ``--regex`` and
``--grammar``: argparse ``type`` functions, so that a bad file or value fails like any bad flag value
(``pagoda generate: error: argument --graph: g.json: graph.edges[0].target: 'x' is not a node id``), naming
the flag and the file, before the model loads. The structured-output ones import xgrammar (to check the
spec), so only when the flag is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pagoda.engine.graph_prompt import Graph
from pagoda.engine.graph_request import GraphRequest


def graph_file(path: str) -> Graph:
    """A graph's JSON file (the shape in ``graph_prompt``), checked as a request's graph is."""
    try:
        graph = Graph.from_dict(_json(path))
        GraphRequest(graph)  # its text is valid Unicode (no lone surrogate escape)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc}") from None
    return graph


def json_schema_file(path: str):
    """A JSON schema file -> a StructuredOutputSpec the output must match, as compact JSON: free whitespace
    lets a small model lay JSON out oddly and spend tokens on it, and a terminal's JSON goes to ``jq`` anyway."""
    return _spec(path, json_schema=_json(path), any_whitespace=False)


def regex(pattern: str):
    """A regular expression the whole output must match."""
    return _spec(None, regex=pattern)


def grammar(name_or_path: str):
    """A registered grammar's name (``autoglm-action``), or a file of EBNF text (root rule ``root``)."""
    from pagoda.engine.structured import grammar_names

    if name_or_path in grammar_names():
        return _spec(None, grammar=name_or_path)
    if not Path(name_or_path).is_file():
        raise argparse.ArgumentTypeError(f"{name_or_path!r} is neither a registered grammar "
                                         f"({', '.join(grammar_names())}) nor a file of EBNF text")
    return _spec(name_or_path, ebnf=_text(name_or_path))


def _spec(path: str | None, **kind):
    from pagoda.engine.structured import StructuredOutputError, StructuredOutputSpec

    try:
        return StructuredOutputSpec(**kind)
    except StructuredOutputError as exc:
        raise argparse.ArgumentTypeError(f"{path}: {exc.reason}" if path else exc.reason) from None


def _json(path: str) -> object:
    try:
        return json.loads(_text(path))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{path} is not valid JSON: {exc}") from None


def _text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise argparse.ArgumentTypeError(f"cannot read {path}: {reason}") from None
