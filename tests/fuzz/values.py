"""The leaves of fuzz requests: odd JSON values and unicode, edge numbers, deep nesting, images good and bad.

Every strategy factory is cached: building a Hypothesis strategy costs more than drawing from it.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import struct
import zlib
from dataclasses import dataclass

from hypothesis import strategies as st


@dataclass(frozen=True)
class RawJson:
    """JSON text placed as is where a value goes: numbers Python's json cannot write, nesting it cannot survive."""

    text: str


def encode_json(value, ascii_only: bool = True) -> bytes:
    """``value`` as JSON bytes, RawJson spliced in; lone surrogates become \\udxxx escapes when ``ascii_only``,
    else invalid UTF-8 bytes."""
    raws: list[str] = []

    def sub(v):
        if isinstance(v, RawJson):
            raws.append(v.text)
            return f"@@raw{len(raws) - 1}@@"
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        if isinstance(v, list):
            return [sub(x) for x in v]
        return v

    text = json.dumps(sub(value), ensure_ascii=ascii_only, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@raw{i}@@"', raw, 1)
    return text.encode("utf-8", "surrogatepass")


EDGE_INTS = (-(2**63) - 1, -(2**31), -2, -1, 0, 1, 2, 3, 16, 17, 20, 21, 63, 64, 65, 255, 256, 511, 512, 513,
             49151, 49152, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30)
EDGE_FLOATS = (0.0, -0.0, 5e-324, 1e-9, 0.5, 0.999999, 1.0000001, 1.5, 2.0000001, -2.0000001, 99.99, 100.00001,
               1e38, 3.5e38, 1e308, -1e308)
RAW_NUMBERS = ("1e999", "-1e999", "1e-999", "NaN", "Infinity", "-Infinity", "-0", "1.0e+308", "1" + "0" * 5000,
               "0.1e1", "1E400")
LONE_SURROGATES = ("\ud800", "x\udfffy", "\udbff\udc00\ud800")  # \udxxx escapes in JSON; no UTF-8 form
NESTING = (10, 100, 500, 900, 950, 980, 990, 995, 999, 1000, 1500, 5000, 100_000)  # around Python's recursion limit
SPECIAL_TEXT = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|image|>", "<s>", "</s>", "{{ 7*7 }}",
                "{% raise_exception('x') %}", "\\u0000", "\x00", "\u202e", "\ufeff", "\U0010ffff", "e\u0301",
                "😀", "中文", "\r\n", " ")

_CHARS = st.one_of(st.characters(codec="utf-8"), st.sampled_from([c for c in SPECIAL_TEXT if len(c) == 1]))


@functools.cache
def text(max_size: int = 40, min_size: int = 0, surrogates: bool = False) -> st.SearchStrategy[str]:
    """Odd but encodable unicode (control characters, RTL marks, emoji, combining marks, special tokens);
    with ``surrogates``, sometimes a lone surrogate too (a \\ud800 escape in JSON, no UTF-8 form)."""
    chars = st.one_of(_CHARS, st.characters(categories=["Cs"])) if surrogates else _CHARS
    plain = st.text(chars, min_size=min_size, max_size=max_size)
    special = st.lists(st.sampled_from(SPECIAL_TEXT), min_size=max(1, min_size), max_size=4).map("".join)
    return st.one_of(plain, plain, special)


@functools.cache
def huge_text(big: int) -> st.SearchStrategy[str]:
    """A long string (up to ``big`` characters): long prompts, stop strings, model names."""
    units = st.sampled_from(["a", "é", "😀", " ", "<|im_start|>", "ab "])
    return st.builds(lambda unit, length: unit * max(1, length // len(unit)), units,
                     st.sampled_from([257, 1000, 4000, big]))


@functools.cache
def nested_junk() -> st.SearchStrategy[RawJson]:
    """Lists or objects nested ``d`` deep (json.loads stops near Python's recursion limit, 1000)."""
    lists = st.sampled_from(NESTING).map(lambda d: RawJson("[" * d + "1" + "]" * d))
    objects = st.sampled_from(NESTING).map(lambda d: RawJson('{"a":' * d + "1" + "}" * d))
    return st.one_of(lists, objects)


@functools.cache
def junk(big: int = 100_000) -> st.SearchStrategy:
    """Any JSON value a client might put where it should not."""
    scalars = st.one_of(
        st.none(), st.booleans(), st.integers(), st.sampled_from(EDGE_INTS),
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(EDGE_FLOATS),
        st.sampled_from(RAW_NUMBERS).map(RawJson), text(surrogates=True),
    )
    containers = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) |
                              st.dictionaries(text(8, surrogates=True), kids, max_size=4), max_leaves=8)
    return st.one_of(scalars, scalars, containers, nested_junk(), huge_text(big))


# ---- images, good and bad (a text-only model refuses them all; a VLM takes GOOD_IMAGES) -------------------


def _png(width: int, height: int, pixels: bool = True) -> bytes:
    """A PNG of width x height; with ``pixels`` False its IHDR claims that size but its IDAT holds one pixel
    (the header reads fine; decoding fails unless the image is 1x1)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = b"".join(b"\x00" + b"\x7f\x10\xe0" * width for _ in range(height)) if pixels else b"\x00\x7f\x10\xe0"
    return head + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _gif() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 10, 10)).save(out, format="GIF")
    return out.getvalue()


IMAGE_BYTES = {
    "png 4x4": _png(4, 4), "png 28x28": _png(28, 28), "truncated png": _png(28, 28)[:40],
    "png header 100000x100000": _png(100_000, 100_000, pixels=False), "png header 0x0": _png(0, 0, pixels=False),
    "png header 1x100000": _png(1, 100_000, pixels=False), "png header 5000x5000": _png(5000, 5000, pixels=False),
    "png header 1x1": _png(1, 1, pixels=False), "png header 28x3": _png(28, 3, pixels=False),
    "png 1x1": _png(1, 1), "png 300x2": _png(300, 2), "gif": _gif(), "empty": b"", "not an image": b"hello world",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n", "jpeg magic only": b"\xff\xd8\xff\xe0" + b"\x00" * 20,
}


@functools.cache
def image_bytes() -> st.SearchStrategy[bytes]:
    return st.one_of(st.sampled_from(list(IMAGE_BYTES.values())), st.binary(max_size=64))


@functools.cache
def image_url() -> st.SearchStrategy[str]:
    b64 = image_bytes().map(lambda b: base64.b64encode(b).decode())
    return st.one_of(
        b64.map(lambda s: "data:image/png;base64," + s), b64.map(lambda s: "data:image/jpeg;base64," + s),
        b64.map(lambda s: "data:;base64," + s), b64.map(lambda s: "DATA:IMAGE/PNG;BASE64," + s[:-2]),
        st.sampled_from(["data:image/png;base64,!!!notbase64***", "data:image/png;base64,", "data:image/png,abc",
                         "data:text/plain,hello", "data:", "http://127.0.0.1:9/x.png", "https://example.invalid/a.png",
                         "file:///etc/passwd", "ftp://x/y.png", "", "javascript:alert(1)", "//x"]),
        st.builds(lambda k: "data:image/png;base64," + "A" * k, st.sampled_from([4, 70_000])),
        text(20, surrogates=True),
    )


@functools.cache
def image_part() -> st.SearchStrategy[dict]:
    detail = st.sampled_from(["auto", "low", "high", "ultra", None, 3])
    return st.one_of(
        st.builds(lambda u, d: {"type": "image_url", "image_url": {"url": u, "detail": d}}, image_url(), detail),
        st.builds(lambda u: {"type": "image_url", "image_url": u}, image_url()),
        st.builds(lambda v: {"type": "image_url", "image_url": v}, junk(1000)),
        st.builds(lambda v: {"type": "image", "image": v}, st.one_of(image_url(), junk(1000))),
        st.builds(lambda v: {"type": "image_pil", "image_pil": v}, junk(1000)),
        st.builds(lambda t: {"type": t, "text": "x"},
                  st.sampled_from(["input_audio", "video_url", "file", "", "TEXT"])),
    )


GOOD_IMAGES = ("png 4x4", "png 28x28", "png 1x1", "png header 1x1", "gif")  # IMAGE_BYTES a VLM must take
PLACEHOLDER = "<|image|>"  # GLM-4.1V's image token: text that holds it is refused (one per image, from the template)


def no_placeholder(value):
    """``value`` with every PLACEHOLDER in its strings defused (a valid request's text must not hold one)."""
    if isinstance(value, str):
        return value.replace(PLACEHOLDER, "<|img|>")
    if isinstance(value, list):
        return [no_placeholder(v) for v in value]
    if isinstance(value, dict):
        return {k: no_placeholder(v) for k, v in value.items()}
    return value


