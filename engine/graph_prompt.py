"""Graph-structured prompts: a typed graph in a request, written as text for the chat template.

A request may carry ``graph`` and ``graph_encoding``. ``Graph.from_dict`` checks the graph against
``GraphLimits``; ``render`` writes it in one of the encodings of Fatemi, Halcrow and Perozzi, "Talk
like a Graph: Encoding Graphs for Large Language Models" (ICLR 2024): the encoding alone moved their
accuracy on graph tasks by up to tens of points and none was best at every task, so the client picks
it. ``graph_message`` wraps the text as a user chat message.

JSON shape; ``*`` marks required keys, a null counts as absent, attribute values are str, int,
float or bool:

    {"directed": false, "weighted": false,                    # default false
     "nodes"*: [{"id"*: "p1", "type": "patient", "attributes": {"age": 54}}],   # 1 node or more
     "edges": [{"source"*: "p1", "target"*: "d1", "relation": "diagnosed_with",
                "weight": 0.8, "attributes": {"since": 2021}}]}                 # default []

A graph from ``from_dict`` has unique non-empty ids; edges between node ids only; a finite weight on
every edge iff weighted; int values within 64 bits and finite floats; attributes sorted by key; no
two edges with the same endpoints and relation (either way round when undirected); no unknown keys.
Each error is a ValueError starting with the offending element's JSON path
(``graph.edges[3].target: 'p9' is not a node id``): 400 / INVALID_ARGUMENT. The constructors do not
check: build graphs from client data with ``from_dict``.

Canonical text, for prefix caching: the same graph gives byte-identical text. Nodes and edges are
written in the order given (reordering them changes the text and the cached prefix); attributes
sorted by key (key order in a JSON object does not matter). Names (ids, types, relations, keys) of
letters, digits and ``_ . - + / # @`` are written bare, others and all string values as JSON
strings, so no comma, bracket or newline in client text reads as structure.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields

from pagoda.engine.config import require

Value = str | int | float | bool
Attributes = tuple[tuple[str, Value], ...]  # (key, value) pairs sorted by key

DEFAULT_ENCODING = "incident"  # what a front end uses when a request names no graph_encoding
_PLAIN = re.compile(r"[\w.\-+/#@]+")
_LINE_BREAKS = re.compile("[\x7f-\x9f\u2028\u2029]")  # json.dumps escapes the controls below 0x20, not these
_GRAPH_KEYS = ("directed", "edges", "nodes", "weighted")
_NODE_KEYS = ("attributes", "id", "type")
_EDGE_KEYS = ("attributes", "relation", "source", "target", "weight")


@dataclass(frozen=True)
class GraphLimits:
    """What one request's graph may hold; ``Graph.from_dict`` checks every limit."""

    max_nodes: int = 1000
    max_edges: int = 5000
    max_id_chars: int = 128  # one node id, type, relation or attribute key
    max_attributes: int = 32  # on one node or edge
    max_text_chars: int = 1000  # one string attribute value
    max_total_chars: int = 262_144  # all the graph's strings together: bounds the rendered text

    def __post_init__(self) -> None:
        for name, value in ((f.name, getattr(self, f.name)) for f in fields(self)):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            require(ok, f"GraphLimits.{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class GraphNode:
    id: str  # unique in its graph
    type: str | None = None  # "patient", "disease", "drug", ...
    attributes: Attributes = ()


@dataclass(frozen=True)
class GraphEdge:
    source: str  # a node id; the edge points source -> target when the graph is directed
    target: str  # a node id
    relation: str | None = None  # "diagnosed_with", "interacts_with", ...
    weight: float | None = None  # finite; set on every edge iff the graph is weighted
    attributes: Attributes = ()


@dataclass(frozen=True)
class Graph:
    """A request's graph; ``from_dict`` builds one from client JSON and checks it (the constructor does not)."""

    nodes: tuple[GraphNode, ...]
    edges: tuple[GraphEdge, ...] = ()
    directed: bool = False
    weighted: bool = False

    @classmethod
    def from_dict(cls, data: object, limits: GraphLimits = GraphLimits(), path: str = "graph") -> Graph:
        """The request's ``graph`` JSON (shape in the module docstring) checked against ``limits``;
        ValueError starting with the offending element's path (``path`` is the field's own)."""
        return _Parser(limits).graph(data, path)


class _Parser:
    """One ``from_dict`` call: the limits, and the characters of client text seen so far."""

    def __init__(self, limits: GraphLimits) -> None:
        self.limits = limits
        self.chars = 0

    def graph(self, data: object, path: str) -> Graph:
        obj = _object(data, path, required=("nodes",), allowed=_GRAPH_KEYS)
        directed, weighted = _flag(obj, "directed", path), _flag(obj, "weighted", path)
        raw_nodes = _array(obj["nodes"], f"{path}.nodes", "nodes", self.limits.max_nodes)
        require(raw_nodes, f"{path}.nodes: empty; a graph needs at least 1 node")
        raw_edges = _array(obj.get("edges") or [], f"{path}.edges", "edges", self.limits.max_edges)
        nodes, first = [], {}  # first: node id -> the path of the node that has it
        for i, raw in enumerate(raw_nodes):
            at = f"{path}.nodes[{i}]"
            nodes.append(self.node(raw, at))
            where = first.setdefault(nodes[-1].id, at)
            require(where == at, f"{at}.id: {nodes[-1].id!r} is a duplicate (first at {where})")
        edges, seen = [], {}  # seen: (endpoints, relation) -> the path of the edge that has them
        for i, raw in enumerate(raw_edges):
            at = f"{path}.edges[{i}]"
            edge = self.edge(raw, at, weighted)
            for end in ("source", "target"):
                require(getattr(edge, end) in first, f"{at}.{end}: {getattr(edge, end)!r} is not a node id")
            ends = (edge.source, edge.target) if directed else tuple(sorted((edge.source, edge.target)))
            where = seen.setdefault((*ends, edge.relation), at)
            require(where == at, f"{at}: duplicates {where} (same endpoints and relation)")
            edges.append(edge)
        return Graph(tuple(nodes), tuple(edges), directed, weighted)

    def node(self, raw: object, path: str) -> GraphNode:
        obj = _object(raw, path, required=("id",), allowed=_NODE_KEYS)
        id_ = self.name(obj["id"], f"{path}.id")
        type_ = None if obj.get("type") is None else self.name(obj["type"], f"{path}.type")
        return GraphNode(id_, type_, self.attributes(obj, path))

    def edge(self, raw: object, path: str, weighted: bool) -> GraphEdge:
        obj = _object(raw, path, required=("source", "target"), allowed=_EDGE_KEYS)
        source, target = self.name(obj["source"], f"{path}.source"), self.name(obj["target"], f"{path}.target")
        relation = None if obj.get("relation") is None else self.name(obj["relation"], f"{path}.relation")
        weight = obj.get("weight")
        if weighted:
            require(weight is not None, f"{path}.weight: required, since the graph is weighted")
            require(_finite(weight), f"{path}.weight: must be a finite number, got {_got(weight)}")
            weight = float(weight)
        else:
            require(weight is None, f'{path}.weight: given, but the graph is not weighted (set "weighted": true)')
        return GraphEdge(source, target, relation, weight, self.attributes(obj, path))

    def attributes(self, obj: dict, path: str) -> Attributes:
        raw = obj.get("attributes")
        if raw is None:
            return ()
        path, most = f"{path}.attributes", self.limits.max_attributes
        require(isinstance(raw, dict), f"{path}: must be an object, got {_json_type(raw)}")
        require(len(raw) <= most, f"{path}: {len(raw):,} attributes, more than max_attributes ({most:,})")
        pairs = [(self.name(key, _member(path, key)), self.value(value, _member(path, key))) for key, value in raw.items()]
        return tuple(sorted(pairs, key=lambda pair: pair[0]))

    def name(self, value: object, path: str) -> str:
        """An id, type, relation or attribute key."""
        require(isinstance(value, str), f"{path}: must be a string, got {_json_type(value)}")
        require(value != "", f"{path}: must not be empty")
        most = self.limits.max_id_chars
        require(len(value) <= most, f"{path}: {len(value):,} characters, more than max_id_chars ({most:,})")
        return self.count(value, path)

    def value(self, value: object, path: str) -> Value:
        if isinstance(value, str):
            most = self.limits.max_text_chars
            require(len(value) <= most, f"{path}: {len(value):,} characters, more than max_text_chars ({most:,})")
            return self.count(value, path)
        if isinstance(value, bool):
            return value
        if isinstance(value, int):
            require(-(2**63) <= value < 2**63, f"{path}: integer out of range (64-bit signed)")
            return value
        require(_finite(value), f"{path}: must be a string, finite number or boolean, got {_got(value)}")
        return value

    def count(self, text: str, path: str) -> str:
        self.chars += len(text)
        most = self.limits.max_total_chars
        require(self.chars <= most, f"{path}: the graph's text reaches {self.chars:,} characters, "
                                    f"more than max_total_chars ({most:,})")
        return text


def _object(raw: object, path: str, required: tuple[str, ...], allowed: tuple[str, ...]) -> dict:
    require(isinstance(raw, dict), f"{path}: must be an object, got {_json_type(raw)}")
    unknown = [k for k in raw if k not in allowed]
    shown = ", ".join(_clip(repr(k)) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    require(not unknown, f"{path}: unknown key{'s' * (len(unknown) > 1)} {shown} (allowed: {', '.join(allowed)})")
    for key in required:
        require(raw.get(key) is not None, f"{path}.{key}: required")
    return raw


def _array(raw: object, path: str, noun: str, most: int) -> list | tuple:
    require(isinstance(raw, (list, tuple)), f"{path}: must be an array, got {_json_type(raw)}")
    require(len(raw) <= most, f"{path}: {len(raw):,} {noun}, more than max_{noun} ({most:,})")
    return raw


def _flag(obj: dict, key: str, path: str) -> bool:
    value = obj.get(key)
    require(value is None or isinstance(value, bool), f"{path}.{key}: must be true or false, got {_json_type(value)}")
    return bool(value)


def _finite(value: object) -> bool:
    """A number, not NaN or infinite, nor an int too large for a float (Python compares those exactly)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def _got(value: object) -> str:
    if isinstance(value, float):
        return json.dumps(value)  # NaN, Infinity, -Infinity: as the client wrote them
    return "an integer too large for a float" if _json_type(value) == "number" else _json_type(value)


def _json_type(value: object) -> str:
    for kind, name in ((bool, "boolean"), ((int, float), "number"), (str, "string"), (dict, "object"),
                       ((list, tuple), "array")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _member(path: str, key: object) -> str:
    """``graph.nodes[0].attributes.age``, or ``...attributes["blood pressure"]`` for a key that is not one word."""
    key = str(key)
    return _clip(f"{path}.{key}" if _PLAIN.fullmatch(key) else f"{path}[{_string(key)}]")


def _clip(text: str, most: int = 100) -> str:
    return text if len(text) <= most else text[: most - 3] + "..."


# ---- rendering -------------------------------------------------------------------------------

def _name(text: str) -> str:
    """An id, type, relation or key: bare when one plain word, else a JSON string."""
    return text if _PLAIN.fullmatch(text) else _string(text)


def _string(text: str) -> str:
    """A JSON string with every character that could end a line escaped."""
    return _LINE_BREAKS.sub(lambda m: f"\\u{ord(m.group()):04x}", json.dumps(text, ensure_ascii=False))


def _number(value: float) -> str:
    return repr(float(value)).removesuffix(".0")  # 1.0 -> 1, 0.25 -> 0.25, 1e+16 stays


def _value(value: Value) -> str:
    if isinstance(value, str):
        return _string(value)
    return _number(value) if isinstance(value, float) else json.dumps(value)  # true, false, 54


def _pairs(attributes: Attributes) -> list[str]:
    return [f"{_name(key)}={_value(value)}" for key, value in attributes]


def _node(node: GraphNode) -> str:
    """``p1 (patient, age=54)``: the id, then the type and attributes."""
    parts = ([] if node.type is None else [_name(node.type)]) + _pairs(node.attributes)
    return f"{_name(node.id)} ({', '.join(parts)})" if parts else _name(node.id)


def _edge_label(edge: GraphEdge) -> str:
    """``interacts_with, weight=0.6, severity="major"``; empty for a bare edge."""
    return ", ".join(([] if edge.relation is None else [_name(edge.relation)]) + _weight_and_pairs(edge))


def _weight_and_pairs(edge: GraphEdge) -> list[str]:
    return ([] if edge.weight is None else [f"weight={_number(edge.weight)}"]) + _pairs(edge.attributes)


def _incident(graph: Graph) -> list[str]:
    """Per node, the nodes it is connected to (the paper's incident encoding); a directed graph
    lists each node's out-edges, so every edge is written once (twice when undirected)."""
    around: dict[str, list[str]] = {node.id: [] for node in graph.nodes}
    for edge in graph.edges:
        label = _edge_label(edge)
        around[edge.source].append(_name(edge.target) + f" ({label})" * bool(label))
        if not graph.directed and edge.target != edge.source:
            around[edge.target].append(_name(edge.source) + f" ({label})" * bool(label))
    verb, none = ("has edges to", "has no outgoing edges") if graph.directed else ("is connected to", "has no edges")
    targets = "the nodes its edges point to" if graph.directed else "the nodes it is connected to"
    lines = [f"Each node is written with its type and attributes, then {targets}, with each edge's details."]
    for node in graph.nodes:
        ends = around[node.id]
        lines.append(f"Node {_node(node)} {verb} {', '.join(ends)}." if ends else f"Node {_node(node)} {none}.")
    return lines


def _adjacency(graph: Graph) -> list[str]:
    """The node list, then the edge list as (a, b) pairs (the paper's adjacency encoding)."""
    meaning = "an edge from a to b" if graph.directed else "that a and b are connected"
    lines = ["Nodes:", *map(_node, graph.nodes), f"Edges, where (a, b) means {meaning}:"]
    for edge in graph.edges:
        label = _edge_label(edge)
        lines.append(f"({_name(edge.source)}, {_name(edge.target)})" + f" {label}" * bool(label))
    return lines


def _triples(graph: Graph) -> list[str]:
    """Knowledge-graph style: one (head, relation, tail) fact a line; a node's type is ``is_a``
    (``node`` when untyped), its attributes are facts, and an edge's weight and attributes follow it."""
    both_ways = "" if graph.directed else "; edges hold both ways"
    lines = [f"Facts as (head, relation, tail) triples; an edge's weight and attributes follow it{both_ways}."]
    for node in graph.nodes:
        head = _name(node.id)
        lines.append(f"({head}, is_a, {_name(node.type) if node.type is not None else 'node'})")
        lines += [f"({head}, {_name(key)}, {_value(value)})" for key, value in node.attributes]
    for edge in graph.edges:
        relation = _name(edge.relation) if edge.relation is not None else "related_to"
        rest = ", ".join(_weight_and_pairs(edge))
        lines.append(f"({_name(edge.source)}, {relation}, {_name(edge.target)})" + f" {rest}" * bool(rest))
    return lines


ENCODINGS: dict[str, Callable[[Graph], list[str]]] = {
    "adjacency": _adjacency,
    "incident": _incident,
    "triples": _triples,
}
"""Encoding name -> the lines that follow the header line. Add an encoding by adding an entry."""


def render(graph: Graph, encoding: str) -> str:
    """The graph as text: a header line (size, directed or not, weighted), then the encoding's lines.
    ValueError naming ``graph_encoding`` for an unknown encoding."""
    encoder = ENCODINGS.get(encoding) if isinstance(encoding, str) else None
    supported = ", ".join(sorted(ENCODINGS))
    require(encoder is not None, f"graph_encoding: {_clip(repr(encoding))} is not supported (supported: {supported})")
    kind = ("Directed" if graph.directed else "Undirected") + ", weighted" * graph.weighted
    n, m = len(graph.nodes), len(graph.edges)
    header = f"{kind} graph with {n:,} node{'s' * (n != 1)} and {m:,} edge{'s' * (m != 1)}."
    return "\n".join([header, *encoder(graph)])


def graph_message(graph: Graph, encoding: str, instruction: str | None = None) -> dict[str, str]:
    """An OpenAI-style user message for the chat template: the rendered graph, then a blank line and
    ``instruction`` (the user's question) when given. A front end puts it where the request's graph
    goes (before the question, as one message: some templates refuse two user turns in a row). The
    graph comes first so that requests about the same graph share a cached prompt prefix up to it."""
    text = render(graph, encoding)
    return {"role": "user", "content": text if instruction is None else f"{text}\n\n{instruction}"}
