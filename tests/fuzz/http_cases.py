"""OpenAI request bodies for /v1/completions and /v1/chat/completions: valid, mutated and raw (``http_cases``),
and chat requests with images for a vision-language model (``image_http_cases``)."""

from __future__ import annotations

import base64
import functools

from hypothesis import strategies as st

from tests.fuzz.cases import CHAT, COMPLETIONS, MAX_VALID_TOKENS, MODEL, HttpCase
from tests.fuzz.values import (
    EDGE_FLOATS,
    EDGE_INTS,
    GOOD_IMAGES,
    IMAGE_BYTES,
    LONE_SURROGATES,
    NESTING,
    PLACEHOLDER,
    RAW_NUMBERS,
    RawJson,
    encode_json,
    image_part,
    image_url,
    junk,
    no_placeholder,
    text,
)


@functools.cache
def _optional_fields(vocab_size: int, chat: bool) -> st.SearchStrategy[dict]:
    """Optional fields of a valid body, with values the server must accept."""
    fields = {
        "model": st.sampled_from([MODEL, None]), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
        "top_k": st.one_of(st.just(-1), st.integers(1, 50)), "min_p": st.floats(0, 1),
        "repetition_penalty": st.floats(0.5, 2), "presence_penalty": st.floats(-2, 2),
        "frequency_penalty": st.floats(-2, 2), "seed": st.integers(0, 2**63 - 1), "n": st.integers(1, 3),
        "ignore_eos": st.booleans(),
        "stop": st.one_of(text(8, min_size=1), st.lists(text(8, min_size=1), max_size=4)),
        "stop_token_ids": st.lists(st.integers(0, vocab_size - 1), max_size=4), "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "priority": st.integers(-10, 10),
        "best_of": st.sampled_from([1, None]), "logit_bias": st.just({}), "user": text(10),
    }
    if chat:
        fields.update(logprobs=st.booleans(), top_logprobs=st.integers(0, 5))
    else:
        fields.update(logprobs=st.integers(0, 5), echo=st.just(False), suffix=st.sampled_from(["", None]))
    return st.fixed_dictionaries({}, optional=fields)


@functools.cache
def _prompt(vocab_size: int) -> st.SearchStrategy:
    words = text(40, min_size=1)
    ids = st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=32)
    return st.one_of(words, words.map(lambda s: [s]), ids, ids.map(lambda x: [x]))


@functools.cache
def _messages() -> st.SearchStrategy[list]:
    content = st.one_of(text(40), st.lists(st.builds(lambda t: {"type": "text", "text": t}, text(20)),
                                           min_size=1, max_size=2))
    turn = st.builds(lambda role, c: {"role": role, "content": c}, st.sampled_from(["system", "user", "assistant"]),
                     content)
    last = st.builds(lambda c: {"role": "user", "content": c}, content)
    return st.builds(lambda history, end: [*history, end], st.lists(turn, max_size=1), last)


@functools.cache
def valid_body(chat: bool, vocab_size: int) -> st.SearchStrategy[dict]:
    """A body the server must accept: max_tokens 1..8, every other field optional and in range."""
    first = st.builds(lambda m: {"messages": m}, _messages()) if chat else st.builds(lambda p: {"prompt": p},
                                                                                     _prompt(vocab_size))
    limit = st.sampled_from(["max_tokens", "max_completion_tokens"] if chat else ["max_tokens"])

    def build(body, optional, name, tokens, min_tokens):
        body = {**body, name: tokens, **optional}
        if min_tokens is not None:
            body["min_tokens"] = min(min_tokens, tokens)
        return body

    return st.builds(build, first, _optional_fields(vocab_size, chat), limit, st.integers(1, MAX_VALID_TOKENS),
                     st.one_of(st.none(), st.integers(0, MAX_VALID_TOKENS)))


# fields a mutation sets: the ones the server reads, OpenAI's that it refuses, and some it has never heard of
BODY_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "n", "min_tokens",
               "ignore_eos", "stop", "stop_token_ids", "logprobs", "top_logprobs", "stream", "stream_options",
               "priority", "best_of", "echo", "suffix", "logit_bias", "images", "image", "image_url",
               "multi_modal_data", "user", "tools", "response_format", "", "__proto__", "prompt ")


@functools.cache
def _mutation_parts(big: int) -> dict[str, st.SearchStrategy]:
    """Everything a mutation draws, built once."""
    return {
        "count": st.integers(1, 3),
        "chat_op": st.sampled_from(["set", "set", "set", "delete", "message", "image"]),
        "completion_op": st.sampled_from(["set", "set", "set", "delete", "image"]),
        "name": st.one_of(st.sampled_from(BODY_FIELDS), text(10, surrogates=True), st.sampled_from(LONE_SURROGATES)),
        "value": st.one_of(junk(big), st.sampled_from(EDGE_INTS), st.sampled_from(EDGE_FLOATS),
                           st.sampled_from(RAW_NUMBERS).map(RawJson)),
        "message_op": st.sampled_from(["role", "content", "extra", "replace", "parts", "drop_content"]),
        "message_key": st.sampled_from(["name", "tool_calls", "x", *LONE_SURROGATES]),
        "message_value": st.one_of(junk(big), st.sampled_from(["tool", "function", "developer", "", "USER"])),
        "message": junk(big),
        "parts": st.lists(st.one_of(image_part(), junk(1000), st.builds(lambda t: {"type": "text", "text": t},
                                                                         junk(1000))), max_size=3),
        "image_field": st.sampled_from(["images", "image", "image_url", "multi_modal_data", "prompt"]),
        "image_value": st.one_of(image_part(), st.lists(image_part(), min_size=1, max_size=2), image_url()),
        "image_parts": st.lists(st.one_of(image_part(), st.just({"type": "text", "text": "what is this?"})),
                                min_size=1, max_size=3),
    }


@st.composite
def _mutated(draw_, chat: bool, vocab_size: int, big: int) -> tuple[dict, str]:
    s = _mutation_parts(big)
    body = draw_(valid_body(chat, vocab_size))
    notes = []
    for _ in range(draw_(s["count"])):
        op = draw_(s["chat_op" if chat else "completion_op"])
        if op == "delete" and body:
            name = draw_(st.sampled_from(sorted(body)))
            del body[name]
            notes.append(f"-{name}")
        elif op == "message" and isinstance(body.get("messages"), list) and body["messages"]:
            notes.append(_mutate_message(draw_, s, body["messages"]))
        elif op == "image":
            notes.append(_add_image(draw_, s, body, chat))
        else:
            name = draw_(s["name"])
            body[name] = draw_(s["value"])
            notes.append(f"{name}=<{type(body[name]).__name__}>")
    return body, " ".join(notes)


@functools.cache
def mutated_body(chat: bool, vocab_size: int, big: int) -> st.SearchStrategy[tuple[dict, str]]:
    """A valid body with 1-3 changes; (body, what changed)."""
    return _mutated(chat, vocab_size, big)


def _mutate_message(draw_, s: dict, messages: list) -> str:
    i = draw_(st.integers(0, len(messages) - 1))
    what = draw_(s["message_op"])
    if not isinstance(messages[i], dict):  # an earlier change replaced it
        messages[i] = {}
    if what == "replace":
        messages[i] = draw_(s["message"])
    elif what == "drop_content":
        messages[i].pop("content", None)
    elif what == "parts":
        messages[i]["content"] = draw_(s["parts"])
    else:
        key = {"role": "role", "content": "content"}.get(what) or draw_(s["message_key"])
        messages[i][key] = draw_(s["message_value"])
    return f"messages[{i}].{what}"


def _add_image(draw_, s: dict, body: dict, chat: bool) -> str:
    if not chat:
        name = draw_(s["image_field"])
        body[name] = draw_(s["image_value"])
        return f"{name}=<image>"
    if not isinstance(body.get("messages"), list) or not body["messages"]:  # an earlier change replaced them
        body["messages"] = [{}]
    body["messages"][-1] = {"role": "user", "content": draw_(s["image_parts"])}
    return "messages[-1].content=<image parts>"


CONTENT_TYPES = (None, "application/json", "application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/json; charset=utf-16", "", "image/png")
BAD_DEADLINES = ("abc", "-1", "0", "nan", "inf", "1e999", "", " 1", "0x10", "1" * 400)


@functools.cache
def _headers() -> st.SearchStrategy[tuple]:
    ctype = st.sampled_from(CONTENT_TYPES)
    deadline = st.one_of(st.none(), st.none(), st.none(), st.none(), st.sampled_from(BAD_DEADLINES),
                         st.floats(0.001, 5).map(lambda s: f"{s:.3f}"))
    return st.builds(lambda c, d: tuple((k, v) for k, v in (("Content-Type", c), ("Request-Timeout", d))
                                        if v is not None), ctype, deadline)


@functools.cache
def raw_body(big: int) -> st.SearchStrategy[tuple[bytes, str]]:
    """(bytes, note) that are not a JSON object the server can take."""
    valid = encode_json({"prompt": "hi", "max_tokens": 2})
    return st.one_of(
        st.sampled_from([(b"", "empty body"), (b"{", "truncated"), (b"null", "null"), (b"[]", "list"),
                         (b'"hi"', "string"), (b"123", "number"), (b"NaN", "NaN"), (b"{}", "empty object"),
                         (b'{"prompt": "a", "prompt": 1}', "duplicate key"), (b"{'prompt': 'a'}", "single quotes"),
                         (b'{"prompt": "a",}', "trailing comma"), (b'{"prompt": "a"} x', "trailing garbage"),
                         (b'{"prompt": "\xff\xfe"}', "invalid UTF-8"), (b"\xef\xbb\xbf" + valid, "UTF-8 BOM"),
                         (valid.decode().encode("utf-16"), "UTF-16"), (valid.decode().encode("utf-32"), "UTF-32"),
                         (b'{"prompt": "a" /* c */}', "comment"), (b"prompt=hi&max_tokens=2", "form encoded")]),
        st.binary(max_size=200).map(lambda b: (b, "random bytes")),
        st.builds(lambda k: (valid[:k], "cut valid body"), st.integers(1, len(valid) - 1)),
        st.sampled_from(NESTING).map(lambda d: (b"[" * d + b"]" * d, f"nesting {d}")),
        st.sampled_from(NESTING).map(lambda d: (b'{"prompt":' + b"[" * d + b"]" * d + b"}", f"nested prompt {d}")),
        st.just((encode_json({"prompt": "a" * big, "max_tokens": 1}), f"body over {big} bytes")),
    )


def http_cases(vocab_size: int, big: int = 100_000) -> dict[str, st.SearchStrategy[HttpCase]]:
    """Requests to /v1/completions and /v1/chat/completions, by kind ("valid", "mutated", "raw").
    ``big``: the length of the longest strings (set it above the server's body limit to see 413s)."""
    path = st.sampled_from([COMPLETIONS, CHAT])

    def valid(p, body, headers, ascii_):
        return HttpCase(p, encode_json(body, ascii_), headers, "valid", "")

    def mutated(p, bn, headers, ascii_):
        return HttpCase(p, encode_json(bn[0], ascii_), headers, "mutated", bn[1])

    def raw(p, bn, headers):
        return HttpCase(p, bn[0], headers, "raw", bn[1])

    valid_headers = st.sampled_from([(), (("Content-Type", "application/json"),)])
    valid_case = st.one_of(*(st.builds(valid, st.just(p), valid_body(p == CHAT, vocab_size), valid_headers,
                                       st.booleans()) for p in (COMPLETIONS, CHAT)))
    mutated_case = st.one_of(*(st.builds(mutated, st.just(p), mutated_body(p == CHAT, vocab_size, big), _headers(),
                                         st.booleans()) for p in (COMPLETIONS, CHAT)))
    raw_case = st.builds(raw, path, raw_body(big), _headers())
    return {"valid": valid_case, "mutated": mutated_case, "raw": raw_case}


# ---- images, for a vision-language model -------------------------------------------------------------------


@functools.cache
def _good_image_part() -> st.SearchStrategy[dict]:
    urls = st.sampled_from([base64.b64encode(IMAGE_BYTES[k]).decode() for k in GOOD_IMAGES]).map(
        lambda b: "data:image/png;base64," + b)
    detail = st.sampled_from([None, "auto", "low", "high"])
    return st.one_of(st.builds(lambda u, d: {"type": "image_url", "image_url": {"url": u, "detail": d}}, urls, detail),
                     st.builds(lambda u: {"type": "image_url", "image_url": u}, urls))


@functools.cache
def _image_chat(vocab_size: int, valid: bool) -> st.SearchStrategy[dict]:
    """A valid chat body whose last user turn holds 1-2 images (``valid``: good ones; else any, good or bad,
    1-10 of them, in any turn)."""
    words = text(20).map(no_placeholder) if valid else st.one_of(text(20), st.just(PLACEHOLDER))
    text_part = st.builds(lambda t: {"type": "text", "text": t}, words)
    image = _good_image_part() if valid else st.one_of(_good_image_part(), image_part())
    parts = st.lists(image, min_size=1, max_size=2 if valid else 10)
    content = st.builds(lambda imgs, t, first: [*imgs, t] if first else [t, *imgs], parts, text_part, st.booleans())

    def build(body, user_content, role):
        body = no_placeholder(body) if valid else dict(body)
        body["messages"] = [*body["messages"][:-1], {"role": role, "content": user_content}]
        return body

    role = st.just("user") if valid else st.sampled_from(["user", "user", "user", "system", "assistant"])
    return st.builds(build, valid_body(True, vocab_size), content, role)


def image_http_cases(vocab_size: int, big: int = 100_000) -> dict[str, st.SearchStrategy[HttpCase]]:
    """Chat requests with images, by kind ("valid", "mutated"); for a server whose model takes images."""
    valid = st.builds(lambda b, a: HttpCase(CHAT, encode_json(b, a), (), "valid", "images"),
                      _image_chat(vocab_size, True), st.booleans())
    bad_images = st.builds(lambda b: HttpCase(CHAT, encode_json(b), (), "mutated", "bad images"),
                           _image_chat(vocab_size, False))
    mutated = st.builds(lambda b, h: HttpCase(CHAT, encode_json(b[0]), h, "mutated", b[1]),
                        mutated_body(True, vocab_size, big), _headers())
    return {"valid": valid, "mutated": st.one_of(bad_images, bad_images, mutated)}


