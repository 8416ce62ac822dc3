"""A request's graph: the ``graph`` and ``graph_encoding`` fields, checked, and where the text goes.

Every front end takes the same two fields — the OpenAI chat API, gRPC ``Generate`` and ``Tokenize``,
``pagoda generate --graph`` — so they are read here once: ``GraphRequest.from_fields`` checks the graph
(``Graph.from_dict``), the encoding and the text (valid Unicode), rendering it once, at the edge; ``into``
writes the text into the conversation. Every error is a ``GraphRequestError`` whose ``field`` is the JSON
path of the offending element (``graph.edges[3].target``, ``graph_encoding``): a 400 / INVALID_ARGUMENT
that names it.

Where the text goes: before the content of the conversation's first user message, in that same message
(``graph_message``'s rule: one user message, since some chat templates refuse two user turns in a row).
The first user message, not the last: the graph is what the whole conversation is about, and written
there the prompt is the same up to the end of the graph's text for every question about that graph and
every later turn of the conversation, so the prefix cache serves it after the first request. A system
message stays before it.

Only chat conversations take a graph. A raw prompt (``/v1/completions``, gRPC text or token ids,
``pagoda generate --raw``) is the client's exact text, with no user message to put the graph in; rather
than invent a place, front ends refuse ``graph`` there, naming it. A client that wants the graph inside a
raw prompt renders it itself (``graph_prompt.render``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pagoda.engine.graph_prompt import DEFAULT_ENCODING, Graph, GraphLimits, render

LIMITS = GraphLimits()  # what a request's graph may hold, unless a front end passes its own

# The path graph_prompt's messages start with: graph.nodes[0].attributes.age, ...attributes["blood pressure"]
_PATH = re.compile(r'graph(?:_encoding)?(?:\.[\w.\-+/#@]+|\[\d+\]|\["(?:[^"\\]|\\.)*"\])*')


class GraphRequestError(ValueError):
    """A bad ``graph`` or ``graph_encoding``. The message starts with ``field``, the offending element's
    JSON path (``graph.edges[3].target: 'p9' is not a node id``)."""

    @property
    def field(self) -> str:
        match = _PATH.match(str(self))
        return match.group(0) if match else "graph"


@dataclass(frozen=True)
class GraphRequest:
    """A checked graph, the encoding to write it in and the text they render to (rendered once, here)."""

    graph: Graph  # from Graph.from_dict: build one from client data with ``from_fields``
    encoding: str = DEFAULT_ENCODING  # a key of graph_prompt.ENCODINGS
    text: str = field(init=False, repr=False, compare=False)  # render(graph, encoding)

    def __post_init__(self) -> None:
        try:
            text = render(self.graph, self.encoding)  # names graph_encoding when it is not one of ENCODINGS
        except ValueError as exc:
            raise GraphRequestError(str(exc)) from None
        try:  # JSON's \ud800 escape gives a lone surrogate, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise GraphRequestError("graph: holds a lone surrogate (an unpaired \\ud800-\\udfff escape); "
                                    "its text must be valid Unicode") from None
        object.__setattr__(self, "text", text)

    @classmethod
    def from_fields(cls, graph: object, encoding: object = None, limits: GraphLimits = LIMITS) -> GraphRequest | None:
        """The request's ``graph`` (parsed JSON, the shape in ``graph_prompt``) and ``graph_encoding``
        (None: ``DEFAULT_ENCODING``); None when there is no graph. GraphRequestError naming the element."""
        if graph is None:
            if encoding is not None:
                raise GraphRequestError("graph_encoding: given without graph; it says how to write the graph")
            return None
        try:
            checked = Graph.from_dict(graph, limits)
        except ValueError as exc:
            raise GraphRequestError(str(exc)) from None
        return cls(checked, DEFAULT_ENCODING if encoding is None else encoding)

    def into(self, messages: list) -> list:
        """``messages`` (OpenAI chat messages; not modified) with the graph's text before the content of
        the first user message: ``graph_message(graph, encoding, content)``'s content for a string, a first
        text part for a list of parts. Malformed messages are left for the tokenizer's check to name."""
        for i, message in enumerate(messages):
            if isinstance(message, dict) and message.get("role") == "user":
                return [*messages[:i], {**message, "content": self._before(message.get("content"))}, *messages[i + 1:]]
        raise GraphRequestError("graph: the conversation has no user message; the graph's text goes before "
                                "the first user message's content")

    def _before(self, content: object) -> object:
        if isinstance(content, str):
            return f"{self.text}\n\n{content}" if content else self.text  # as graph_message writes it
        if isinstance(content, list):
            return [{"type": "text", "text": f"{self.text}\n\n"}, *content]
        return content
