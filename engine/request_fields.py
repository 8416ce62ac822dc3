"""How each request field is named by each front end: the OpenAI body, the pagoda.v1 proto and the CLI.

The table is the field metadata of ``SamplingParams`` (``field(default=..., metadata=spec(...))``), so a
field, its help text and its front-end names are written once, side by side; this module defines that
metadata and reads it back. Each front end maps its *plain* fields by one rule per type
(``cluster/api/openai_protocol.py``, ``cluster/api/grpc_request.py``, ``engine/cli.py``). A *custom* field is
named here but parsed by the front end's own code (``stop`` as a string or a list, chat's ``logprobs`` with
``top_logprobs``, ``response_format``); a *hidden* one says why that front end leaves it out. Every field
decides all three front ends: ``request_fields`` raises on a field without metadata, and
``tests/unit/test_request_fields.py`` holds the table against the proto and both parsers.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any

from pagoda.engine.config import require

FRONT_ENDS = ("openai", "grpc", "cli")
_KEY = "pagoda.front_ends"  # the metadata key that holds a field's FieldSpec


@dataclass(frozen=True)
class Exposed:
    """The field's name in one front end."""

    name: str  # OpenAI body field, pagoda.v1 SamplingParams field, or CLI flag
    custom: str = ""  # why that front end parses it by hand; empty: its rule for the field's type does


@dataclass(frozen=True)
class Hidden:
    """A front end that deliberately does not offer the field."""

    reason: str  # why, for the next reader

    def __post_init__(self) -> None:
        require(bool(self.reason), "a hidden field must say why")


@dataclass(frozen=True)
class FieldSpec:
    """One field's front-end names: a field's ``metadata`` holds it under ``_KEY`` (``spec`` builds that)."""

    help: str  # one line: what the field does (the CLI's --help text)
    openai: Exposed | Hidden
    grpc: Exposed | Hidden
    cli: Exposed | Hidden
    cli_default: Any = MISSING  # the CLI's own default where it differs from the dataclass's; MISSING: the same

    def __post_init__(self) -> None:
        require(bool(self.help), "a field spec needs a help text")
        require(isinstance(self.cli, Hidden) or self.cli.name.startswith("--"),
                f"a CLI flag starts with --, got {getattr(self.cli, 'name', None)!r}")


def spec(help: str, *, openai: str | Exposed | Hidden, grpc: str | Exposed | Hidden, cli: str | Exposed | Hidden,
         cli_default: Any = MISSING) -> dict:
    """Field metadata. A string names a plain field; ``custom(name, why)`` and ``hidden(why)`` say otherwise."""
    named = {front: Exposed(v) if isinstance(v, str) else v for front, v in zip(FRONT_ENDS, (openai, grpc, cli))}
    return {_KEY: FieldSpec(help, cli_default=cli_default, **named)}


def custom(name: str, why: str) -> Exposed:
    """A front end names the field but parses it by hand, for the reason given."""
    require(bool(why), f"custom {name!r} must say why")
    return Exposed(name, why)


def hidden(reason: str) -> Hidden:
    return Hidden(reason)


@dataclass(frozen=True)
class RequestField:
    """One dataclass field with its spec and its annotation unwrapped."""

    name: str  # the dataclass field
    type: type  # int, float, bool, str or a class; the element type when repeated
    repeated: bool  # annotated tuple[type, ...]
    optional: bool  # annotated type | None
    default: Any
    spec: FieldSpec

    def exposure(self, front: str) -> Exposed | Hidden:
        return getattr(self.spec, front)

    @property
    def cli_default(self) -> Any:
        return self.default if self.spec.cli_default is MISSING else self.spec.cli_default


@functools.cache
def request_fields(cls: type) -> tuple[RequestField, ...]:
    """Every field of dataclass ``cls``, in declaration order; a TypeError names a field without a spec."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _KEY not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} has no front-end spec: give it metadata=spec(help, openai=..., "
                            "grpc=..., cli=...) naming it in each front end, or hidden(why) (engine/request_fields.py)")
        typ, repeated, optional = _unwrap(hints[f.name])
        out.append(RequestField(f.name, typ, repeated, optional, f.default, f.metadata[_KEY]))
    return tuple(out)


def plain_fields(cls: type, front: str) -> tuple[tuple[str, RequestField], ...]:
    """(front end's name, field) for each field that front end maps by its rule for the field's type."""
    require(front in FRONT_ENDS, f"front end must be one of {FRONT_ENDS}, got {front!r}")
    return tuple((e.name, f) for f in request_fields(cls)
                 if isinstance(e := f.exposure(front), Exposed) and not e.custom)


def _unwrap(hint) -> tuple[type, bool, bool]:
    """``int | None`` -> (int, False, True); ``tuple[str, ...]`` -> (str, True, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        require(len(inner) == 1, f"a request field is one type or None, got {hint}")
        return _unwrap(inner[0])[0], False, True
    if typing.get_origin(hint) is tuple:
        require(len(args) == 2 and args[1] is Ellipsis, f"a repeated request field is tuple[X, ...], got {hint}")
        return args[0], True, False
    return hint, False, False
