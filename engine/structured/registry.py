"""Named grammars: a request asks for ``grammar="autoglm-action"`` instead of sending the text.

A name maps to a function that returns xgrammar EBNF text, given as "module:function" and imported on
first use (the table lives in ``engine/plugins.py``). Plugins add their own with ``register_grammar``.
"""

from __future__ import annotations

from pagoda.engine import plugins

GRAMMAR = "structured_grammar"  # plugin kind: grammar name -> () -> EBNF text

plugins.register(GRAMMAR, "autoglm-action", "pagoda.engine.structured.autoglm:autoglm_action_ebnf")


def register_grammar(name: str, ebnf: str) -> None:
    """Makes ``StructuredOutputSpec(grammar=name)`` compile the EBNF text ``ebnf`` (root rule ``root``)."""
    plugins.register(GRAMMAR, name, lambda: ebnf)


def grammar_names() -> list[str]:
    return plugins.names(GRAMMAR)


def grammar_text(name: str) -> str:
    """The EBNF text registered as ``name``; KeyError when nothing is."""
    return plugins.resolve(GRAMMAR, name)()
