"""The ``autoglm-action`` grammar and a parser that reads replies the way Open-AutoGLM does.

Open-AutoGLM (zai-org/Open-AutoGLM, a phone-operating agent) asks its model for

    <think>what the screen shows, what to do</think><answer>do(action="Tap", element=[500,120])</answer>

with one action per reply: ``do(action=NAME, key=value, ...)`` or ``finish(message="...")``.
Coordinates are relative, integers 0-999 (the agent scales them by width/1000).

How Open-AutoGLM reads a reply (``phone_agent/model/client.py`` then ``phone_agent/actions/handler.py``),
which ``parse_action`` mirrors:

1. Split: if ``finish(message=`` occurs anywhere, the action is everything from its first occurrence
   on; else the same with ``do(action=``; else everything is the action. The tags are gone by then:
   in GLM's tokenizer they are special tokens that the server drops from the text; here the four tag
   strings are removed first, which is what such a server would have sent.
2. Parse the stripped action text:
   - ``do(action="Type"...`` / ``do(action="Type_Name"...``: the text is everything after the first
     ``text=`` minus its first character and its last two (the quote, and ``")``), taken raw (no
     unescaping); the action is reported as ``Type``.
   - other ``do...``: newlines, CRs and tabs are escaped, the text is parsed as a Python call, and each
     keyword argument is evaluated as a Python literal.
   - ``finish...``: the message is the text with every ``finish(message=`` removed, minus its first
     character and its last two.
   - anything else, or a failure on the way, is rejected (ValueError).

What the grammar guarantees so that every reply it admits parses as intended:
- the thought excludes the tags and both action markers, so the split lands on the real action;
- strings are JSON-like (no raw control characters; escapes ``\\" \\\\ \\n \\r \\t \\b \\f \\uXXXX``, all
  valid in a Python literal) and never contain ``finish(message=``;
- ``text=`` is the last argument of ``Type`` (Open-AutoGLM reads it up to the final ``")``);
- the thought and each string are bounded (``max_chars``), so even at one character per token a
  reply fits Open-AutoGLM's default ``max_tokens=3000``. Two quirks: the thought cannot contain
  ``do(action=`` or ``finish(message=``, and the bound on a string may be exceeded by the rest of an
  escape sequence that began inside it.
"""

from __future__ import annotations

import ast
import json
from typing import Any

MAX_THOUGHT_CHARS = 1024  # characters of the <think> section (a few paragraphs; then it must close)
MAX_STRING_CHARS = 256  # characters of one string argument as written (an escape counts 2 or 6)
MAX_COORDINATE = 999

TAGS = ("<think>", "</think>", "<answer>", "</answer>")
MARKERS = ("finish(message=", "do(action=")  # Open-AutoGLM's split order: finish first

# action name -> (required arguments, optional arguments); argument kinds: point, string, duration.
# Open-AutoGLM's handler table and the action list of its system prompts.
ACTIONS: dict[str, tuple[dict[str, str], dict[str, str]]] = {
    "Launch": ({"app": "string"}, {}),
    "Tap": ({"element": "point"}, {"message": "string"}),
    "Type": ({"text": "string"}, {}),
    "Type_Name": ({"text": "string"}, {}),
    "Swipe": ({"start": "point", "end": "point"}, {}),
    "Back": ({}, {}),
    "Home": ({}, {}),
    "Double Tap": ({"element": "point"}, {}),
    "Long Press": ({"element": "point"}, {}),
    "Wait": ({"duration": "duration"}, {}),
    "Take_over": ({"message": "string"}, {}),
    "Note": ({"message": "string"}, {}),
    "Call_API": ({"instruction": "string"}, {}),
    "Interact": ({}, {}),
}


def _lit(text: str) -> str:
    """An EBNF string literal (xgrammar reads JSON's escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _tag_dispatch(excludes: tuple[str, ...]) -> str:
    """Any text that contains none of ``excludes`` (xgrammar's builtin, matched with Aho-Corasick)."""
    return f"TagDispatch(loop_after_dispatch=false, excludes=({', '.join(_lit(e) for e in excludes)}))"


def _action_rule(name: str, required: dict[str, str], optional: dict[str, str]) -> str:
    """``"NAME", key=VALUE, ...`` (what follows ``do(action=``); optional arguments come last."""
    parts = [_lit(_lit(name))]
    for key, kind in required.items():
        parts.append(f'", {key}=" {kind}')
    for key, kind in optional.items():
        parts.append(f'(", {key}=" {kind})?')
    return " ".join(parts)


def autoglm_action_ebnf(max_thought_chars: int = MAX_THOUGHT_CHARS, max_string_chars: int = MAX_STRING_CHARS) -> str:
    """The grammar text (xgrammar EBNF, root rule ``root``); with the default bounds, what the name
    ``autoglm-action`` compiles. Smaller bounds make shorter replies."""
    if max_thought_chars < 0 or max_string_chars < 0:
        raise ValueError("max_thought_chars and max_string_chars must be >= 0")
    names = [f"act{i}" for i in range(len(ACTIONS))]
    actions = [f"{n} ::= {_action_rule(a, *ACTIONS[a])}" for n, a in zip(names, ACTIONS)]
    plain_excludes = ('"', "\\", MARKERS[0], *(chr(c) for c in range(0x20)))  # quote, backslash, controls
    return "\n".join([
        'root ::= think? "<answer>" nl action nl "</answer>"',
        'think ::= "<think>" thought "</think>" nl',
        f"thought[max_chars={max_thought_chars}] ::= {_tag_dispatch(TAGS + MARKERS)}",
        'nl ::= "\\n"?',
        "action ::= do | finish",
        'finish ::= "finish(message=" string ")"',
        f'do ::= "do(action=" ({" | ".join(names)}) ")"',
        *actions,
        'point ::= "[" coord "," " "? coord "]"',
        "coord ::= [0-9] | [1-9] [0-9] | [1-9] [0-9] [0-9]",
        'duration ::= "\\"" ([0-9] | [1-9] [0-9]) ("." [0-9])? " seconds\\""',
        'string ::= "\\"" chars "\\""',
        f"chars[max_chars={max_string_chars}] ::= plain (escape plain)*",
        f"plain ::= {_tag_dispatch(plain_excludes)}",
        'escape ::= "\\\\" ["\\\\nrtbf] | "\\\\u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F]',
    ])


def split_reply(text: str) -> tuple[str, str]:
    """(thought, action text) as Open-AutoGLM's client splits a reply (tags removed first)."""
    for tag in TAGS:
        text = text.replace(tag, "")
    for marker in MARKERS:
        if marker in text:
            thought, _, rest = text.partition(marker)
            return thought.strip(), marker + rest
    return "", text


def parse_action(text: str) -> dict[str, Any]:
    """The action of a reply, as Open-AutoGLM's ``parse_action`` returns it:
    ``{"_metadata": "do", "action": NAME, ...arguments}`` or ``{"_metadata": "finish", "message": ...}``.

    Raises ValueError where Open-AutoGLM would. It does not check names or arguments (nor does
    Open-AutoGLM at this stage): ``check_action`` does.
    """
    action = split_reply(text)[1].strip()
    if action.startswith(('do(action="Type"', 'do(action="Type_Name"')):
        if "text=" not in action:
            raise ValueError(f"Type action without text=: {action!r}")
        return {"_metadata": "do", "action": "Type", "text": action.split("text=", 1)[1][1:-2]}
    if action.startswith("do"):
        return {"_metadata": "do", **_call_keywords(action)}
    if action.startswith("finish"):
        return {"_metadata": "finish", "message": action.replace("finish(message=", "")[1:-2]}
    raise ValueError(f"not a do(...) or finish(...) action: {action[:200]!r}")


def _call_keywords(action: str) -> dict[str, Any]:
    source = action.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    try:
        call = ast.parse(source, mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError("expected a function call")  # noqa: TRY004 - Open-AutoGLM's parser raises ValueError
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as e:
        raise ValueError(f"failed to parse do() action: {e}") from None


def check_action(action: dict[str, Any]) -> None:
    """Raises ValueError unless a ``parse_action`` result names a known action with well-formed
    arguments (coordinates [x, y] in 0..999); stricter than Open-AutoGLM, which fails at execution."""
    if action.get("_metadata") == "finish":
        if not isinstance(action.get("message"), str):
            raise ValueError("finish: message must be a string")
        return
    name = action.get("action")
    if name not in ACTIONS:
        raise ValueError(f"unknown action {name!r}")
    required, optional = ACTIONS[name]
    args = {k: v for k, v in action.items() if k not in ("_metadata", "action")}
    missing, unknown = set(required) - set(args), set(args) - set(required) - set(optional)
    if missing or unknown:
        raise ValueError(f"{name}: missing {sorted(missing)}, unknown {sorted(unknown)}")
    for key, value in args.items():
        kind = required.get(key) or optional[key]
        if kind == "point":
            ok = (isinstance(value, list) and len(value) == 2
                  and all(type(v) is int and 0 <= v <= MAX_COORDINATE for v in value))
        elif kind == "duration":
            ok = isinstance(value, str) and value.endswith(" seconds") and _is_number(value[: -len(" seconds")])
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ValueError(f"{name}: bad {key}={value!r}")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
