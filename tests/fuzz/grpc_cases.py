"""pagoda.v1 gRPC requests: messages over each field's whole range, colliding request ids, and bytes that are
no message at all (``grpc_cases``); chat turns and prompts with images for a vision-language model
(``image_grpc_cases``)."""

from __future__ import annotations

import functools

from hypothesis import strategies as st

from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from tests.fuzz.cases import GRPC_METHODS, MAX_VALID_TOKENS, MODEL, GrpcCase
from tests.fuzz.values import GOOD_IMAGES, IMAGE_BYTES, PLACEHOLDER, huge_text, image_bytes, no_placeholder, text

UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 8, 16, 20, 21, 64, 65, 512, 513, 2**31,
                                                                2**32 - 1]))
INT32 = st.one_of(st.integers(-(2**31), 2**31 - 1), st.sampled_from([-(2**31), -2, -1, 0, 1, 2**31 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
FLOAT = st.one_of(st.floats(width=32), st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e-45,
                                                        3.4e38, 2.0000002, -2.0000002, 100.00001, 0.0]))
_PROTO_TEXT = st.one_of(text(40), st.sampled_from(["", MODEL, "gpt-17"]))


@functools.cache
def _sampling_message(valid: bool, vocab_size: int) -> st.SearchStrategy[pb.SamplingParams]:
    """Valid: every field in range, max_tokens 1..8. Else: each field anywhere in its proto type, max_tokens
    maybe unset (the engine's default)."""
    if valid:
        fields = {
            "n": st.integers(1, 3), "temperature": st.floats(0, 2, width=32), "top_p": st.floats(0.25, 1, width=32),
            "top_k": st.one_of(st.just(-1), st.integers(1, 50)), "min_p": st.floats(0, 1, width=32),
            "repetition_penalty": st.floats(0.5, 2, width=32), "presence_penalty": st.floats(-2, 2, width=32),
            "frequency_penalty": st.floats(-2, 2, width=32), "seed": st.integers(0, 2**63 - 1),
            "stop": st.lists(text(8, min_size=1), max_size=4),
            "stop_token_ids": st.lists(st.integers(0, vocab_size - 1), max_size=4), "ignore_eos": st.booleans(),
            "logprobs": st.integers(0, 5),
        }
    else:
        fields = {
            "n": UINT32, "temperature": FLOAT, "top_p": FLOAT, "top_k": INT32, "min_p": FLOAT,
            "repetition_penalty": FLOAT, "presence_penalty": FLOAT, "frequency_penalty": FLOAT, "seed": UINT64,
            "min_tokens": UINT32, "ignore_eos": st.booleans(), "logprobs": UINT32,
            "stop": st.lists(st.one_of(_PROTO_TEXT, huge_text(1000)), max_size=20),
            "stop_token_ids": st.lists(UINT32, max_size=70),
        }
    picked = st.fixed_dictionaries({}, optional=fields)
    tokens = st.integers(1, MAX_VALID_TOKENS) if valid else st.one_of(st.none(), UINT32)  # None: unset
    return st.builds(lambda kw, m: pb.SamplingParams(**kw, **({} if m is None else {"max_tokens": m})), picked, tokens)


@functools.cache
def _chat_message(valid: bool, big: int) -> st.SearchStrategy[pb.ChatMessages]:
    role = st.sampled_from(["user", "system", "assistant"]) if valid else st.one_of(
        st.sampled_from(["user", "system", "assistant", "", "tool", "USER"]), text(10))
    part = st.one_of(st.builds(lambda t: pb.ContentPart(text=t), text(20)),
                     st.builds(lambda b: pb.ContentPart(image=b), image_bytes()), st.just(pb.ContentPart()))
    content = text(40) if valid else st.one_of(text(40), huge_text(big))
    plain = st.builds(lambda r, c: pb.ChatMessage(role=r, content=c), role, content)
    with_parts = st.builds(lambda r, c, p: pb.ChatMessage(role=r, content=c, parts=p), role,
                           st.sampled_from(["", "x"]), st.lists(part, max_size=3))
    turns = st.lists(plain, min_size=1, max_size=2) if valid else st.lists(st.one_of(plain, with_parts), max_size=3)
    end = st.builds(lambda c: pb.ChatMessage(role="user", content=c), text(40))
    return st.builds(lambda ts, e: pb.ChatMessages(messages=[*ts, e] if valid else ts), turns, end)


@functools.cache
def _generate(vocab_size: int, valid: bool, big: int) -> st.SearchStrategy[pb.GenerateRequest]:
    if valid:
        prompt = st.one_of(
            st.builds(lambda t: {"text": t}, text(40, min_size=1)),
            st.builds(lambda ids: {"token_ids": pb.TokenIds(ids=ids)},
                      st.lists(st.integers(0, vocab_size - 1), min_size=1, max_size=32)),
            st.builds(lambda m: {"messages": m}, _chat_message(True, big)))
        extra = st.fixed_dictionaries({}, optional={"model": st.sampled_from(["", MODEL]),
                                                    "priority": st.integers(-10, 10)})
    else:
        ids = st.one_of(st.lists(st.one_of(st.integers(0, vocab_size + 10), UINT32), max_size=40),
                        st.builds(lambda k: list(range(k)), st.sampled_from([600, 5000])))  # past max_model_len
        prompt = st.one_of(
            st.just({}), st.builds(lambda t: {"text": t}, st.one_of(_PROTO_TEXT, huge_text(big))),
            st.builds(lambda x: {"token_ids": pb.TokenIds(ids=x)}, ids),
            st.builds(lambda m: {"messages": m}, _chat_message(False, big)))
        extra = st.fixed_dictionaries({}, optional={
            "model": st.one_of(_PROTO_TEXT, huge_text(big)), "priority": INT32,
            "images": st.lists(image_bytes(), max_size=3),
            "request_id": st.one_of(st.sampled_from(["", "dup", "dup"]), text(20), huge_text(1000))})
    sampling = _sampling_message(valid, vocab_size)
    return st.builds(lambda p, s, kw: pb.GenerateRequest(sampling=s, **p, **kw), prompt, sampling, extra)


@functools.cache
def _tokenize(valid: bool, big: int) -> st.SearchStrategy[pb.TokenizeRequest]:
    if valid:
        form = st.one_of(st.builds(lambda t: {"text": t}, text(40)),
                         st.builds(lambda m: {"messages": m}, _chat_message(True, big)))
        return st.builds(lambda f, m: pb.TokenizeRequest(model=m, **f), form, st.sampled_from(["", MODEL]))
    form = st.one_of(st.just({}), st.builds(lambda t: {"text": t}, st.one_of(_PROTO_TEXT, huge_text(big))),
                     st.builds(lambda m: {"messages": m}, _chat_message(False, big)))
    return st.builds(lambda f, m: pb.TokenizeRequest(model=m, **f), form, st.one_of(_PROTO_TEXT, huge_text(big)))


def _wire_field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _varint(value: int) -> bytes:
    value &= (1 << 70) - 1
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@functools.cache
def _hand_wire() -> st.SearchStrategy[bytes]:
    """Fields encoded by hand: wrong wire types, varints past 64 bits, lengths past the end, bad UTF-8."""
    one = st.one_of(
        st.builds(lambda n, w, b: _wire_field(n, w, b), st.integers(1, 20), st.integers(0, 7), st.binary(max_size=12)),
        st.builds(lambda n, v: _wire_field(n, 0, _varint(v)), st.integers(1, 20),
                  st.sampled_from([2**32, 2**63, 2**64 - 1, 2**64, 2**70 - 1])),
        st.builds(lambda n: _wire_field(n, 2, b"\x05ab"), st.integers(1, 20)),  # length 5, two bytes follow
        st.builds(lambda n, b: _wire_field(n, 2, _varint(len(b)) + b), st.integers(1, 12),
                  st.sampled_from([b"\xff\xfe", b"\xed\xa0\x80", b"\xc0\x80", b"ok"])),  # invalid UTF-8 strings
        st.just(_wire_field(6, 2, _varint(3) + _wire_field(12, 0, _varint(2**40)))),  # max_tokens past uint32
    )
    return st.lists(one, min_size=1, max_size=4).map(b"".join)


def _corrupt(message_bytes: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    def flip(b: bytes, i: int, x: int) -> bytes:
        if not b:
            return bytes([x])
        i %= len(b)
        return b[:i] + bytes([b[i] ^ x]) + b[i + 1:]

    return st.one_of(
        st.builds(flip, message_bytes, st.integers(0, 10**6), st.integers(1, 255)),
        st.builds(lambda b, k: b[: k % (len(b) or 1)], message_bytes, st.integers(0, 10**6)),
        st.builds(lambda b, tail: b + tail, message_bytes, st.binary(min_size=1, max_size=16)),
    )


COLLIDING_IDS = ("fz", "fz#0", "fz#1", "fz#2", "fz#1#0")  # "fz" with n=3 runs in the engine as fz#0, fz#1, fz#2


@functools.cache
def _colliding_ids() -> st.SearchStrategy[pb.GenerateRequest]:
    """Requests, valid alone, whose client-chosen request_id equals another's or one of another's completion
    ids; long enough (ignore_eos) to overlap in flight."""
    return st.builds(lambda rid, n, k, t: pb.GenerateRequest(request_id=rid, text=t, sampling=pb.SamplingParams(
        n=n, max_tokens=k, ignore_eos=True)), st.sampled_from(COLLIDING_IDS), st.integers(1, 3), st.integers(32, 128),
        text(20, min_size=1))


def grpc_cases(vocab_size: int, big: int = 100_000) -> dict[str, st.SearchStrategy[GrpcCase]]:
    """pagoda.v1.Pagoda calls, by kind: "valid", "mutated" (messages over the whole range of each field's
    type; request ids that collide), "raw" (random bytes, corrupted messages, hand-made wire format). In the
    last two the client sometimes sets a short deadline or cancels a stream."""
    deadline = st.one_of(st.none(), st.none(), st.none(), st.none(), st.floats(0.001, 2))
    cancel = st.one_of(st.none(), st.none(), st.none(), st.none(), st.integers(0, 3))

    def calls(method: str, kind: str, messages, note: str = "message", client: bool = True):
        """GrpcCases of ``messages`` (or payload bytes); ``client``: with the fuzzer's deadlines and cancels."""
        def make(message, t, c):
            payload = message if isinstance(message, bytes) else message.SerializeToString()
            return GrpcCase(method, payload, kind, note, t, c if method == "Generate" else None)

        return st.builds(make, messages, deadline if client else st.none(), cancel if client else st.none())

    generate = _generate(vocab_size, False, big)
    valid = st.one_of(
        calls("Generate", "valid", _generate(vocab_size, True, big), "", client=False),
        calls("Tokenize", "valid", _tokenize(True, big), "", client=False),
        calls("ModelInfo", "valid", st.builds(pb.ModelInfoRequest, model=st.sampled_from(["", MODEL])), "",
              client=False),
    )
    mutated = st.one_of(
        calls("Generate", "mutated", generate),
        calls("Tokenize", "mutated", _tokenize(False, big)),
        calls("ModelInfo", "mutated", st.builds(pb.ModelInfoRequest, model=st.one_of(_PROTO_TEXT, huge_text(big)))),
        calls("Generate", "mutated", _colliding_ids(), "request id collision", client=False),  # a hang must show
    )
    payloads = {"random bytes": st.binary(max_size=64),
                "corrupted message": _corrupt(generate.map(lambda m: m.SerializeToString())),
                "hand-made wire format": _hand_wire()}
    raw = st.one_of(*(calls(method, "raw", payload, note) for method in GRPC_METHODS
                      for note, payload in payloads.items()))
    return {"valid": valid, "mutated": mutated, "raw": raw}


# ---- images, for a vision-language model -------------------------------------------------------------------


@functools.cache
def _image_parts_message(valid: bool) -> st.SearchStrategy[pb.ChatMessages]:
    good = st.sampled_from([IMAGE_BYTES[k] for k in GOOD_IMAGES])
    image = st.builds(lambda b: pb.ContentPart(image=b), good if valid else st.one_of(good, image_bytes()))
    words = st.builds(lambda t: pb.ContentPart(text=t), text(20).map(no_placeholder) if valid else text(20))
    parts = st.lists(image, min_size=1, max_size=2) if valid else st.lists(
        st.one_of(image, image, words, st.just(pb.ContentPart())), max_size=10)
    role = st.just("user") if valid else st.sampled_from(["user", "user", "system", "assistant", ""])
    content = st.just("") if valid else st.sampled_from(["", "", "", "x"])
    turn = st.builds(lambda r, c, p, w: pb.ChatMessage(role=r, content=c, parts=[*p, w]), role, content, parts, words)
    return st.builds(lambda t: pb.ChatMessages(messages=[t]), turn)


def image_grpc_cases(vocab_size: int, big: int = 100_000) -> dict[str, st.SearchStrategy[GrpcCase]]:
    """Generate and Tokenize with images, by kind ("valid", "mutated"): chat turns with image parts, and text
    prompts with ``images`` and as many (or, mutated, a different number of) ``<|image|>`` placeholders."""
    good = st.sampled_from([IMAGE_BYTES[k] for k in GOOD_IMAGES])

    def generate(kind: str, prompts, sampling, note: str):
        """``prompts``: GenerateRequest fields (a prompt form, images)."""
        return st.builds(lambda p, s: GrpcCase("Generate", pb.GenerateRequest(sampling=s, **p).SerializeToString(),
                                               kind, note), prompts, sampling)

    def tokenize(kind: str, messages):
        return st.builds(lambda m: GrpcCase("Tokenize", pb.TokenizeRequest(messages=m).SerializeToString(), kind,
                                            "images"), messages)

    chat = {valid: st.builds(lambda m: {"messages": m}, _image_parts_message(valid)) for valid in (True, False)}
    placeholders = st.lists(good, min_size=1, max_size=2).map(
        lambda images: {"text": "describe " + PLACEHOLDER * len(images), "images": images})
    wrong_count = st.builds(lambda images, k, t: {"text": t + PLACEHOLDER * k, "images": images},
                            st.lists(st.one_of(good, image_bytes()), max_size=10), st.integers(0, 10), text(20))
    sampling = {valid: _sampling_message(valid, vocab_size) for valid in (True, False)}
    valid = st.one_of(generate("valid", chat[True], sampling[True], "images"),
                      generate("valid", placeholders, sampling[True], "images"),
                      tokenize("valid", _image_parts_message(True)))
    mutated = st.one_of(generate("mutated", chat[False], sampling[True], "images"),
                        generate("mutated", wrong_count, sampling[False], "image count"),
                        tokenize("mutated", _image_parts_message(False)))
    return {"valid": valid, "mutated": mutated}
