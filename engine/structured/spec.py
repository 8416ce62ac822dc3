"""StructuredOutputSpec: what a request's output must match, and how OpenAI-style bodies ask for it.

A spec names exactly one constraint: a JSON schema, any JSON object, a regex, EBNF grammar text
(xgrammar's dialect, root rule ``root``), or a registered grammar name (``registry.py``). It is
validated once, at construction, by xgrammar's own parsers (no tokenizer needed), so a bad request
fails at the frontend with a ValueError naming the field; unpickling (on tensor-parallel ranks) does
not validate again. It is frozen, hashable (the compiled-grammar cache key) and picklable.

``from_openai`` reads a request body:

- OpenAI ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``; the
  schema is always enforced, whatever ``strict`` says.
- vLLM's ``structured_outputs``: one of ``json`` (schema object or text), ``json_object: true``,
  ``regex``, ``choice`` (a list of literal strings; the output is one of them), ``grammar`` (a
  registered name such as ``"autoglm-action"``, or EBNF text); plus ``disable_any_whitespace``, and
  ``disable_fallback`` (accepted; there is one backend).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pagoda.engine.structured.registry import grammar_names, grammar_text

MAX_SPEC_CHARS = 64 * 1024  # schema, regex or grammar text, as sent
MAX_CHOICES = 256
MAX_JSON_WHITESPACE = 16  # whitespace characters in a row between JSON tokens (any_whitespace), so no endless padding
KINDS = ("json_schema", "json_object", "regex", "ebnf", "grammar")


class StructuredOutputError(ValueError):
    """A malformed structured-output request. ``field`` is the path the client sent (e.g.
    ``response_format.json_schema.schema``); the message is ``"{field}: {reason}"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason

    def __reduce__(self):
        return type(self), (self.field, self.reason)

    def at(self, field: str) -> StructuredOutputError:
        """The same error, reported under another field name."""
        return StructuredOutputError(field, self.reason)


@dataclass(frozen=True)
class StructuredOutputSpec:
    """Exactly one of the five kinds is set. Field errors are reported as ``structured_outputs.<field>``."""

    json_schema: str | None = None  # a JSON schema as compact JSON text (a dict is accepted and serialized)
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it
    ebnf: str | None = None  # xgrammar EBNF text, root rule "root"
    grammar: str | None = None  # a registered grammar name, e.g. "autoglm-action"
    any_whitespace: bool = True  # JSON kinds: whitespace allowed between tokens (<= MAX_JSON_WHITESPACE); else compact

    def __post_init__(self) -> None:
        kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            got = ", ".join(kinds) or "none"
            raise StructuredOutputError("structured_outputs", f"give exactly one of {', '.join(KINDS)} (got {got})")
        if not isinstance(self.any_whitespace, bool):
            raise StructuredOutputError("structured_outputs.any_whitespace", "must be a boolean")
        field = f"structured_outputs.{self.kind}"
        if self.json_schema is not None:
            object.__setattr__(self, "json_schema", _schema_text(self.json_schema, field))
        elif self.kind == "json_object":
            if self.json_object is not True:
                raise StructuredOutputError(field, f"must be true or false, got {_quoted(self.json_object)}")
        else:
            _check_text(getattr(self, self.kind), field)
        if self.grammar is not None and self.grammar not in grammar_names():
            raise StructuredOutputError(field, f"unknown grammar {_quoted(self.grammar)}; registered: "
                                               f"{', '.join(grammar_names())}")
        try:
            self.to_grammar()
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError; nothing a client sends may escape
            raise StructuredOutputError(field, f"invalid {self.kind.replace('_', ' ')}: {xgrammar_message(e)}") from None

    @property
    def kind(self) -> str:
        """Which of KINDS this spec sets."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def to_grammar(self):
        """The tokenizer-independent ``xgrammar.Grammar`` (imports xgrammar)."""
        import xgrammar

        if self.json_schema is not None or self.json_object:
            whitespace = MAX_JSON_WHITESPACE if self.any_whitespace else None
            return _no_controls_in_bounded_strings(xgrammar.Grammar.from_json_schema(
                self.json_schema or '{"type": "object"}', any_whitespace=self.any_whitespace,
                max_whitespace_cnt=whitespace, strict_mode=True,
            ))
        if self.regex is not None:
            return xgrammar.Grammar.from_regex(self.regex)
        return xgrammar.Grammar.from_ebnf(self.ebnf if self.ebnf is not None else grammar_text(self.grammar))


# xgrammar <= 0.2.9 writes a string with minLength/maxLength as repetitions of this class, which admits raw
# control characters (invalid JSON) and no escapes (mlc-ai/xgrammar#800). The fix keeps it one character class
# without the controls: with an escape alternative each mask costs ~1000x more (37 ms instead of 0.03 ms).
_BOUNDED_STRING_CHAR = r'(([^\"\\\r\n]))'
_JSON_STRING_CHAR = r'(([^\0-\x1f\"\\]))'


def _no_controls_in_bounded_strings(grammar):
    """``grammar`` whose length-bounded JSON strings admit no raw control characters (a no-op where
    xgrammar no longer writes that class). Such strings still take no escapes."""
    import xgrammar

    text = str(grammar)
    if _BOUNDED_STRING_CHAR not in text:
        return grammar
    return xgrammar.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHAR, _JSON_STRING_CHAR))


def xgrammar_message(error: Exception) -> str:
    """xgrammar's message without its "[time] file.cc:line: " prefix, one line, bounded."""
    text = re.sub(r"^\[[^\]]*\]\s*\S+:\d+:\s*", "", str(error).strip()).splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _check_text(value: Any, field: str) -> None:
    if not isinstance(value, str) or not value:
        raise StructuredOutputError(field, f"must be a non-empty string, got {_quoted(value)}")
    if len(value) > MAX_SPEC_CHARS:
        raise StructuredOutputError(field, f"is {len(value)} characters; the limit is {MAX_SPEC_CHARS}")


def _schema_text(schema: Any, field: str) -> str:
    """A schema (object, or JSON text of one) as compact JSON text; key order kept (it orders the output)."""
    if isinstance(schema, str):
        _check_text(schema, field)
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise StructuredOutputError(field, f"is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise StructuredOutputError(field, f"must be a JSON schema object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise StructuredOutputError(field, f"is not JSON-serializable: {e}") from None
    _check_text(text, field)
    return text


# ------------------------------------------------------------------------------------------ requests

_OPTIONS = ("json", "json_object", "regex", "choice", "grammar")  # structured_outputs: one of these
_FLAGS = ("disable_any_whitespace", "disable_fallback")


def from_openai(body: dict) -> StructuredOutputSpec | None:
    """The spec a /v1/completions or /v1/chat/completions body asks for, or None.

    Raises StructuredOutputError (a ValueError) naming the field for anything malformed, including
    both ``response_format`` (other than text) and ``structured_outputs`` in one body.
    """
    if not isinstance(body, dict):
        raise StructuredOutputError("body", "must be a JSON object")
    specs = {}
    if body.get("response_format") is not None:
        specs["response_format"] = _from_response_format(body["response_format"])
    if body.get("structured_outputs") is not None:
        specs["structured_outputs"] = _from_structured_outputs(body["structured_outputs"])
    specs = {name: spec for name, spec in specs.items() if spec is not None}
    if len(specs) > 1:
        raise StructuredOutputError("structured_outputs", "give response_format or structured_outputs, not both")
    return next(iter(specs.values()), None)


def _from_response_format(value: Any) -> StructuredOutputSpec | None:
    if not isinstance(value, dict):
        raise StructuredOutputError("response_format", "must be an object with a type")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputSpec(json_object=True)
    if kind != "json_schema":
        raise StructuredOutputError("response_format.type",
                                    f"must be text, json_object or json_schema, got {_quoted(kind)}")
    inner = value.get("json_schema")
    if not isinstance(inner, dict):
        raise StructuredOutputError("response_format.json_schema", "must be an object with name and schema")
    for key, types in (("name", str), ("strict", bool)):
        if inner.get(key) is not None and not isinstance(inner[key], types):
            raise StructuredOutputError(f"response_format.json_schema.{key}", f"must be a {types.__name__}")
    if inner.get("schema") is None:
        raise StructuredOutputError("response_format.json_schema.schema", "is required")
    return _build("response_format.json_schema.schema", json_schema=inner["schema"])


def _from_structured_outputs(value: Any) -> StructuredOutputSpec:
    where = "structured_outputs"
    if not isinstance(value, dict):
        raise StructuredOutputError(where, "must be an object")
    unknown = sorted(set(value) - set(_OPTIONS) - set(_FLAGS))
    if unknown:
        raise StructuredOutputError(f"{where}.{unknown[0]}",
                                    f"is not supported (supported: {', '.join(_OPTIONS + _FLAGS)})")
    for flag in _FLAGS:
        if value.get(flag) is not None and not isinstance(value[flag], bool):
            raise StructuredOutputError(f"{where}.{flag}", "must be a boolean")
    given = [k for k in _OPTIONS if value.get(k) not in (None, False)]
    if len(given) != 1:
        raise StructuredOutputError(where, f"give exactly one of {', '.join(_OPTIONS)} (got {', '.join(given) or 'none'})")
    option, arg = given[0], value[given[0]]
    field = f"{where}.{option}"
    ws = {"any_whitespace": not value.get("disable_any_whitespace", False)}
    if option == "json":
        return _build(field, json_schema=arg, **ws)
    if option == "json_object":
        if arg is not True:
            raise StructuredOutputError(field, "must be true")
        return _build(field, json_object=True, **ws)
    if option == "regex":
        return _build(field, regex=arg)
    if option == "choice":
        return _build(field, ebnf=choice_ebnf(arg, field))
    if isinstance(arg, str) and arg in grammar_names():
        return _build(field, grammar=arg)
    if isinstance(arg, str) and "::=" not in arg:
        raise StructuredOutputError(field, f"unknown grammar {_quoted(arg)}: give a registered name "
                                           f"({', '.join(grammar_names())}) or EBNF text with a root rule")
    return _build(field, ebnf=arg)


def choice_ebnf(choices: Any, field: str = "structured_outputs.choice") -> str:
    """EBNF whose outputs are exactly the given strings."""
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices):
        raise StructuredOutputError(field, "must be a non-empty list of strings")
    if len(choices) > MAX_CHOICES:
        raise StructuredOutputError(field, f"has {len(choices)} strings; the limit is {MAX_CHOICES}")
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _build(field: str, **kwargs) -> StructuredOutputSpec:
    """A spec whose errors name ``field`` (what the client sent) rather than the spec's own field."""
    try:
        return StructuredOutputSpec(**kwargs)
    except StructuredOutputError as e:
        raise e.at(field) from None
