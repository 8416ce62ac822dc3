"""Graph-structured prompts (engine/graph_prompt.py): the three encodings on a patient–disease–drug
graph, canonical text for prefix caching, every validation error with its message, the limits."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagoda.engine.graph_prompt import ENCODINGS, Graph, GraphEdge, GraphLimits, GraphNode, graph_message, render

MEDICAL = {
    "directed": True,
    "weighted": True,
    "nodes": [
        {"id": "p1", "type": "patient", "attributes": {"age": 54, "sex": "F", "hba1c": 8.1}},
        {"id": "p2", "type": "patient", "attributes": {"age": 67, "sex": "M", "egfr": 38}},
        {"id": "d1", "type": "disease", "attributes": {"name": "type 2 diabetes"}},
        {"id": "d2", "type": "disease", "attributes": {"name": "chronic kidney disease"}},
        {"id": "m1", "type": "drug", "attributes": {"name": "metformin"}},
        {"id": "m2", "type": "drug", "attributes": {"name": "ibuprofen"}},
    ],
    "edges": [
        {"source": "p1", "target": "d1", "relation": "diagnosed_with", "weight": 0.9},
        {"source": "p2", "target": "d2", "relation": "diagnosed_with", "weight": 0.8},
        {"source": "p1", "target": "m1", "relation": "takes", "weight": 1},
        {"source": "p2", "target": "m1", "relation": "takes", "weight": 1},
        {"source": "p2", "target": "m2", "relation": "takes", "weight": 1},
        {"source": "m1", "target": "d1", "relation": "treats", "weight": 0.95},
        {"source": "m2", "target": "m1", "relation": "interacts_with", "weight": 0.4,
         "attributes": {"severity": "moderate", "effect": "raises lactic acidosis risk"}},
    ],
}


def medical(**changes) -> dict:
    return {**copy.deepcopy(MEDICAL), **changes}


def undirected_medical() -> dict:
    data = medical(directed=False, weighted=False)
    for edge in data["edges"]:
        del edge["weight"]
    return data


# ---- the three encodings -----------------------------------------------------------------------

def test_incident_lists_each_nodes_out_edges_when_directed():
    text = render(Graph.from_dict(MEDICAL), "incident")
    lines = text.splitlines()
    assert lines[0] == "Directed, weighted graph with 6 nodes and 7 edges."
    assert lines[2] == ('Node p1 (patient, age=54, hba1c=8.1, sex="F") has edges to '
                        "d1 (diagnosed_with, weight=0.9), m1 (takes, weight=1).")
    assert 'Node d1 (disease, name="type 2 diabetes") has no outgoing edges.' in lines
    assert lines[-1] == ('Node m2 (drug, name="ibuprofen") has edges to m1 (interacts_with, weight=0.4, '
                         'effect="raises lactic acidosis risk", severity="moderate").')
    assert len(lines) == 2 + 6  # header, legend, one line a node


def test_incident_lists_both_ends_when_undirected():
    lines = render(Graph.from_dict(undirected_medical()), "incident").splitlines()
    assert lines[0] == "Undirected graph with 6 nodes and 7 edges."
    assert 'Node m1 (drug, name="metformin") is connected to p1 (takes), p2 (takes), d1 (treats), m2 (interacts_with, ' \
           'effect="raises lactic acidosis risk", severity="moderate").' in lines
    assert 'Node d2 (disease, name="chronic kidney disease") is connected to p2 (diagnosed_with).' in lines


def test_incident_self_loop_once_and_isolated_node():
    graph = Graph.from_dict({"nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "a"}]})
    assert render(graph, "incident").splitlines()[2:] == ["Node a is connected to a.", "Node b has no edges."]


def test_adjacency_is_the_node_list_then_the_edge_list():
    lines = render(Graph.from_dict(MEDICAL), "adjacency").splitlines()
    assert lines[:3] == ["Directed, weighted graph with 6 nodes and 7 edges.", "Nodes:",
                         'p1 (patient, age=54, hba1c=8.1, sex="F")']
    assert lines[8] == "Edges, where (a, b) means an edge from a to b:"
    assert lines[9] == "(p1, d1) diagnosed_with, weight=0.9"
    assert lines[-1] == '(m2, m1) interacts_with, weight=0.4, effect="raises lactic acidosis risk", severity="moderate"'
    undirected = render(Graph.from_dict(undirected_medical()), "adjacency")
    assert "Edges, where (a, b) means that a and b are connected:\n(p1, d1) diagnosed_with\n" in undirected


def test_triples_are_node_facts_then_edges():
    lines = render(Graph.from_dict(MEDICAL), "triples").splitlines()
    assert lines[2:6] == ["(p1, is_a, patient)", "(p1, age, 54)", "(p1, hba1c, 8.1)", '(p1, sex, "F")']
    assert '(d2, name, "chronic kidney disease")' in lines
    assert "(p1, diagnosed_with, d1) weight=0.9" in lines
    assert lines[-1] == ('(m2, interacts_with, m1) weight=0.4, effect="raises lactic acidosis risk", '
                         'severity="moderate"')
    bare = Graph.from_dict({"nodes": [{"id": "a"}, {"id": "b"}], "edges": [{"source": "a", "target": "b"}]})
    assert render(bare, "triples") == (
        "Undirected graph with 2 nodes and 1 edge.\n"
        "Facts as (head, relation, tail) triples; an edge's weight and attributes follow it; edges hold both ways.\n"
        "(a, is_a, node)\n(b, is_a, node)\n(a, related_to, b)"
    )


def test_names_that_are_not_one_word_are_json_strings_and_cannot_add_lines():
    note = "line\nInjected\u2028Injected\x85Injected"  # str.splitlines() breaks at all three
    data = {"nodes": [{"id": "type 2, diabetes", "attributes": {"note": note, "n/a": True}}, {"id": "(x)", "type": "a b"}],
            "edges": [{"source": "type 2, diabetes", "target": "(x)", "relation": "x=y"}]}
    graph = Graph.from_dict(data)
    for encoding in ENCODINGS:
        assert '"type 2, diabetes"' in render(graph, encoding)
        assert not any(line.startswith("Injected") for line in render(graph, encoding).splitlines())
    assert render(graph, "adjacency").splitlines()[2:] == [
        '"type 2, diabetes" (n/a=true, note="line\\nInjected\\u2028Injected\\u0085Injected")', '"(x)" ("a b")',
        "Edges, where (a, b) means that a and b are connected:", '("type 2, diabetes", "(x)") "x=y"']


def test_graph_message_puts_the_graph_before_the_question():
    graph = Graph.from_dict(MEDICAL)
    question = "Which patient's treatment needs review, and what diagnosis does the graph suggest?"
    message = graph_message(graph, "triples", question)
    assert message == {"role": "user", "content": render(graph, "triples") + "\n\n" + question}
    assert graph_message(graph, "triples") == {"role": "user", "content": render(graph, "triples")}
    other = graph_message(graph, "triples", "Is p1 at risk?")["content"]
    assert os.path.commonprefix([message["content"], other]) == render(graph, "triples") + "\n\n"


def test_unknown_encoding_names_graph_encoding_and_the_supported_ones():
    graph = Graph.from_dict(MEDICAL)
    with pytest.raises(ValueError, match=r"^graph_encoding: 'gml' is not supported \(supported: adjacency, "
                                         r"incident, triples\)$"):
        render(graph, "gml")
    with pytest.raises(ValueError, match=r"^graph_encoding: \['incident'\] is not supported"):
        render(graph, ["incident"])  # a client's JSON may hold anything
    with pytest.raises(ValueError, match="^graph_encoding: 'gml'"):
        graph_message(graph, "gml", "question")


# ---- canonical text (prefix caching) ---------------------------------------------------------

def test_same_graph_same_text():
    wire = json.dumps(MEDICAL)
    for encoding in ENCODINGS:
        first, second = Graph.from_dict(json.loads(wire)), Graph.from_dict(json.loads(wire))
        assert first == second
        assert render(first, encoding) == render(second, encoding) == render(first, encoding)


def test_attribute_key_order_does_not_matter_but_node_order_does():
    shuffled = medical()
    shuffled["nodes"][0]["attributes"] = {"sex": "F", "hba1c": 8.1, "age": 54}
    reordered = medical()
    reordered["nodes"].reverse()
    for encoding in ENCODINGS:
        assert render(Graph.from_dict(shuffled), encoding) == render(Graph.from_dict(MEDICAL), encoding)
        assert render(Graph.from_dict(reordered), encoding) != render(Graph.from_dict(MEDICAL), encoding)


def test_text_is_the_same_in_another_process_and_needs_no_torch():
    code = ("import json, sys; from pagoda.engine.graph_prompt import Graph, render, ENCODINGS; "
            "g = Graph.from_dict(json.loads(sys.argv[1])); assert 'torch' not in sys.modules; "
            "print(json.dumps([render(g, e) for e in sorted(ENCODINGS)]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code, json.dumps(MEDICAL)], capture_output=True, text=True,
                         env=env, check=True, timeout=60)
    graph = Graph.from_dict(MEDICAL)
    assert json.loads(out.stdout) == [render(graph, e) for e in sorted(ENCODINGS)]


# ---- properties over random graphs -----------------------------------------------------------

_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=10)
_values = st.one_of(st.text(max_size=12), st.integers(-(2**63), 2**63 - 1), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False))


@st.composite
def graph_dicts(draw) -> dict:
    ids = draw(st.lists(_names, min_size=1, max_size=8, unique=True))
    directed, weighted = draw(st.booleans()), draw(st.booleans())
    attributes = st.dictionaries(_names, _values, max_size=3)
    nodes = [{"id": i, "type": draw(st.none() | _names), "attributes": draw(attributes)} for i in ids]
    edges, seen = [], set()
    for _ in range(draw(st.integers(0, 12))):
        source, target, relation = draw(st.sampled_from(ids)), draw(st.sampled_from(ids)), draw(st.none() | _names)
        key = (source, target, relation) if directed else (*sorted((source, target)), relation)
        if key not in seen:
            seen.add(key)
            edges.append({"source": source, "target": target, "relation": relation, "attributes": draw(attributes)})
            if weighted:
                edges[-1]["weight"] = draw(st.floats(-1e6, 1e6))
    return {"directed": directed, "weighted": weighted, "nodes": nodes, "edges": edges}


def _shown(name: str) -> str:
    """How the text writes a name (the module's documented rule): bare when one word, else a JSON string."""
    if re.fullmatch(r"[\w.\-+/#@]+", name):
        return name
    quoted = json.dumps(name, ensure_ascii=False)  # and the characters json.dumps leaves that could end a line:
    return re.sub("[\x7f-\x9f\u2028\u2029]", lambda m: f"\\u{ord(m.group()):04x}", quoted)


@settings(max_examples=30, deadline=None)
@given(graph_dicts())
def test_every_node_and_edge_is_in_every_encoding(data):
    graph = Graph.from_dict(data)
    n, m = len(graph.nodes), len(graph.edges)
    texts = {encoding: render(graph, encoding) for encoding in ENCODINGS}
    for node in graph.nodes:
        assert all(_shown(node.id) in text for text in texts.values())
    adjacency, incident = texts["adjacency"].splitlines(), texts["incident"].splitlines()
    triples = texts["triples"].splitlines()
    # Client text never adds a line: each encoding's line count follows from the graph's shape.
    assert len(adjacency) == 3 + n + m and len(incident) == 2 + n
    assert len(triples) == 2 + n + sum(len(node.attributes) for node in graph.nodes) + m
    verb = "has edges to" if graph.directed else "is connected to"
    for i, edge in enumerate(graph.edges):
        source, target = _shown(edge.source), _shown(edge.target)
        assert adjacency[3 + n + i].startswith(f"({source}, {target})")
        relation = _shown(edge.relation) if edge.relation is not None else "related_to"
        assert triples[-m + i].startswith(f"({source}, {relation}, {target})")
        line = next(line for line in incident if line.startswith(f"Node {source} "))
        assert target in line.partition(verb)[2]


@settings(max_examples=15, deadline=None)
@given(graph_dicts())
def test_reading_twice_gives_equal_graphs_and_text(data):
    first, second = Graph.from_dict(data), Graph.from_dict(json.loads(json.dumps(data)))
    assert first == second
    assert all(render(first, e) == render(second, e) for e in ENCODINGS)


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=10)


def _containers(value):
    """Every object and array in a JSON value, the value itself first."""
    if isinstance(value, (dict, list)):
        yield value
        for child in value.values() if isinstance(value, dict) else value:
            yield from _containers(child)


@settings(max_examples=60, deadline=None)
@given(graph_dicts(), st.data())
def test_any_client_value_is_a_graph_or_a_value_error_naming_graph(data, draw):
    """Nothing a client sends crashes from_dict: put any JSON value anywhere in a valid graph."""
    target = draw.draw(st.sampled_from(list(_containers(data))))
    if isinstance(target, dict):
        key = draw.draw(st.sampled_from(sorted(target)) | _names) if target else draw.draw(_names)
        target[key] = draw.draw(_json)
    elif target:
        target[draw.draw(st.integers(0, len(target) - 1))] = draw.draw(_json)
    try:
        graph = Graph.from_dict(data)
    except ValueError as e:
        assert str(e).startswith("graph")
    else:
        assert all(render(graph, e) for e in ENCODINGS)


# ---- validation: every error names the element ------------------------------------------------

def _set(path: list, value, data: dict | None = None) -> dict:
    data = medical() if data is None else data
    target = data
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return data


_DROP = object()

ERRORS = [
    # (path to change, new value, the whole message)
    (["nodes"], _DROP, "graph.nodes: required"),
    (["nodes"], None, "graph.nodes: required"),
    (["nodes"], {"p1": {}}, "graph.nodes: must be an array, got object"),
    (["nodes"], [], "graph.nodes: empty; a graph needs at least 1 node"),
    (["edges"], "p1-d1", "graph.edges: must be an array, got string"),
    (["directed"], "yes", "graph.directed: must be true or false, got string"),
    (["weighted"], 1, "graph.weighted: must be true or false, got number"),
    (["labels"], {}, "graph: unknown key 'labels' (allowed: directed, edges, nodes, weighted)"),
    (["nodes", 1], "p2", "graph.nodes[1]: must be an object, got string"),
    (["nodes", 1, "id"], _DROP, "graph.nodes[1].id: required"),
    (["nodes", 1, "id"], 2, "graph.nodes[1].id: must be a string, got number"),
    (["nodes", 1, "id"], "", "graph.nodes[1].id: must not be empty"),
    (["nodes", 4, "id"], "d1", "graph.nodes[4].id: 'd1' is a duplicate (first at graph.nodes[2])"),
    (["nodes", 0, "label"], "x", "graph.nodes[0]: unknown key 'label' (allowed: attributes, id, type)"),
    (["nodes", 0, "type"], ["patient"], "graph.nodes[0].type: must be a string, got array"),
    (["nodes", 0, "attributes"], ["age"], "graph.nodes[0].attributes: must be an object, got array"),
    (["nodes", 0, "attributes", "age"], [54], ("graph.nodes[0].attributes.age: must be a string, finite number or "
                                              "boolean, got array")),
    (["nodes", 0, "attributes", "age"], None, ("graph.nodes[0].attributes.age: must be a string, finite number or "
                                              "boolean, got null")),
    (["nodes", 0, "attributes", "age"], float("nan"), ("graph.nodes[0].attributes.age: must be a string, finite "
                                                      "number or boolean, got NaN")),
    (["nodes", 0, "attributes", "age"], 2**63, "graph.nodes[0].attributes.age: integer out of range (64-bit signed)"),
    (["nodes", 0, "attributes", "blood pressure"], {}, ('graph.nodes[0].attributes["blood pressure"]: must be a '
                                                       "string, finite number or boolean, got object")),
    (["nodes", 0, "attributes", ""], 1, 'graph.nodes[0].attributes[""]: must not be empty'),
    (["edges", 3], None, "graph.edges[3]: must be an object, got null"),
    (["edges", 3, "target"], "p9", "graph.edges[3].target: 'p9' is not a node id"),
    (["edges", 0, "source"], "x", "graph.edges[0].source: 'x' is not a node id"),
    (["edges", 0, "target"], _DROP, "graph.edges[0].target: required"),
    (["edges", 0, "source"], 1, "graph.edges[0].source: must be a string, got number"),
    (["edges", 0, "relation"], "", "graph.edges[0].relation: must not be empty"),
    (["edges", 0, "kind"], "x", ("graph.edges[0]: unknown key 'kind' (allowed: attributes, relation, source, "
                                "target, weight)")),
    (["edges", 2], {"source": "p1", "target": "d1", "relation": "diagnosed_with", "weight": 1}, "graph.edges[2]: duplicates graph.edges[0] (same endpoints and relation)"),
    (["edges", 0, "weight"], _DROP, "graph.edges[0].weight: required, since the graph is weighted"),
    (["edges", 0, "weight"], float("inf"), "graph.edges[0].weight: must be a finite number, got Infinity"),
    (["edges", 0, "weight"], float("-inf"), "graph.edges[0].weight: must be a finite number, got -Infinity"),
    (["edges", 0, "weight"], float("nan"), "graph.edges[0].weight: must be a finite number, got NaN"),
    (["edges", 0, "weight"], "0.9", "graph.edges[0].weight: must be a finite number, got string"),
    (["edges", 0, "weight"], True, "graph.edges[0].weight: must be a finite number, got boolean"),
    (["edges", 0, "weight"], 10**400, ("graph.edges[0].weight: must be a finite number, got an integer too large "
                                      "for a float")),
    (["edges", 6, "attributes", "severity"], [], ("graph.edges[6].attributes.severity: must be a string, finite "
                                                 "number or boolean, got array")),
]


@pytest.mark.parametrize(("path", "value", "message"), ERRORS, ids=[e[2].split(":")[0] for e in ERRORS])
def test_validation_error_names_the_element(path, value, message):
    data = medical()
    if value is _DROP:
        target = data
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
    else:
        _set(path, value, data)
    with pytest.raises(ValueError) as caught:
        Graph.from_dict(data)
    assert str(caught.value) == message


def test_top_level_must_be_an_object_and_the_path_is_the_callers():
    with pytest.raises(ValueError, match=r"^graph: must be an object, got array$"):
        Graph.from_dict([])
    with pytest.raises(ValueError, match=r"^messages\[1\]\.graph\.edges\[3\]\.target: 'p9' is not a node id$"):
        Graph.from_dict(_set(["edges", 3, "target"], "p9"), path="messages[1].graph")


def test_unknown_keys_are_all_named():
    data = _set(["nodes", 0, "color"], "red", _set(["nodes", 0, "label"], "x"))
    with pytest.raises(ValueError, match=r"^graph\.nodes\[0\]: unknown keys 'label', 'color' \(allowed: "):
        Graph.from_dict(data)


def test_weight_only_on_weighted_graphs():
    data = undirected_medical()
    data["edges"][1]["weight"] = 0.5
    with pytest.raises(ValueError, match=r'^graph\.edges\[1\]\.weight: given, but the graph is not weighted '
                                         r'\(set "weighted": true\)$'):
        Graph.from_dict(data)
    assert Graph.from_dict(_set(["edges", 0, "weight"], -2)).edges[0].weight == -2.0  # any finite number


def test_duplicate_edges_depend_on_direction():
    reverse = {"source": "d1", "target": "p1", "relation": "diagnosed_with"}
    data = medical()
    data["edges"].append({**reverse, "weight": 1})
    assert len(Graph.from_dict(data).edges) == 8  # directed: d1 -> p1 is another edge than p1 -> d1
    data = undirected_medical()
    data["edges"].append(reverse)
    with pytest.raises(ValueError, match=r"^graph\.edges\[7\]: duplicates graph\.edges\[0\] "):
        Graph.from_dict(data)
    data["edges"][-1]["relation"] = "suspected"  # a parallel edge with another relation is fine
    assert len(Graph.from_dict(data).edges) == 8


def test_null_optional_fields_are_absent():
    graph = Graph.from_dict({"directed": None, "weighted": None, "edges": None,
                             "nodes": [{"id": "a", "type": None, "attributes": None}]})
    assert graph == Graph((GraphNode("a"),))


# ---- limits -----------------------------------------------------------------------------------

def test_node_and_edge_counts():
    nodes = [{"id": f"n{i}"} for i in range(1204)]
    with pytest.raises(ValueError, match=r"^graph\.nodes: 1,204 nodes, more than max_nodes \(1,000\)$"):
        Graph.from_dict({"nodes": nodes})
    assert len(Graph.from_dict({"nodes": nodes[:1000]}).nodes) == 1000
    edges = [{"source": "n0", "target": "n1"}] * 5001  # counted before anything is parsed
    with pytest.raises(ValueError, match=r"^graph\.edges: 5,001 edges, more than max_edges \(5,000\)$"):
        Graph.from_dict({"nodes": nodes[:2], "edges": edges})
    with pytest.raises(ValueError, match=r"^graph\.edges: 7 edges, more than max_edges \(6\)$"):
        Graph.from_dict(MEDICAL, GraphLimits(max_edges=6))


def test_name_and_text_lengths():
    assert Graph.from_dict({"nodes": [{"id": "x" * 128}]}).nodes[0].id == "x" * 128
    with pytest.raises(ValueError, match=r"^graph\.nodes\[0\]\.id: 129 characters, more than max_id_chars \(128\)$"):
        Graph.from_dict({"nodes": [{"id": "x" * 129}]})
    with pytest.raises(ValueError, match=r"^graph\.edges\[0\]\.relation: 14 characters, more than max_id_chars \(8\)$"):
        Graph.from_dict(MEDICAL, GraphLimits(max_id_chars=8))
    note = _set(["nodes", 1, "attributes", "note"], "n" * 1001)
    with pytest.raises(ValueError, match=r"^graph\.nodes\[1\]\.attributes\.note: 1,001 characters, more than "
                                         r"max_text_chars \(1,000\)$"):
        Graph.from_dict(note)
    long_key = "k" * 129
    with pytest.raises(ValueError, match=r"^graph\.nodes\[1\]\.attributes\.k{40}.*\.\.\.: 129 characters, more than "
                                         r"max_id_chars \(128\)$"):
        Graph.from_dict(_set(["nodes", 1, "attributes", long_key], 1))


def test_attribute_count():
    many = {f"a{i}": i for i in range(33)}
    with pytest.raises(ValueError, match=r"^graph\.edges\[2\]\.attributes: 33 attributes, more than "
                                         r"max_attributes \(32\)$"):
        Graph.from_dict(_set(["edges", 2, "attributes"], many))
    del many["a32"]
    assert len(Graph.from_dict(_set(["edges", 2, "attributes"], many)).edges[2].attributes) == 32


def test_total_text():
    # p1 + patient + age + hba1c + sex + F = 2 + 7 + 3 + 5 + 3 + 1 = 21 characters; p2 makes 23.
    with pytest.raises(ValueError, match=r"^graph\.nodes\[1\]\.id: the graph's text reaches 23 characters, more "
                                         r"than max_total_chars \(22\)$"):
        Graph.from_dict(MEDICAL, GraphLimits(max_total_chars=22))
    assert Graph.from_dict(MEDICAL, GraphLimits(max_total_chars=1000))


@pytest.mark.parametrize("value", [0, -1, 1.5, True, None])
def test_limits_are_checked(value):
    with pytest.raises(ValueError, match=r"^GraphLimits\.max_nodes must be an integer >= 1, got "):
        GraphLimits(max_nodes=value)


def test_dataclasses_are_frozen_values():
    graph = Graph.from_dict(MEDICAL)
    with pytest.raises(AttributeError):
        graph.nodes = ()  # type: ignore[misc]
    assert graph.edges[0] == GraphEdge("p1", "d1", "diagnosed_with", 0.9)
    assert graph.nodes[0] == GraphNode("p1", "patient", (("age", 54), ("hba1c", 8.1), ("sex", "F")))
    assert hash(graph) == hash(Graph.from_dict(MEDICAL))
