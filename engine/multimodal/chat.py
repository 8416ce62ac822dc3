"""OpenAI chat messages with image parts -> messages for an HF chat template, plus the images.

A message's ``content`` may be a list of parts. Text parts stay ``{"type": "text", "text": ...}``;
each image part becomes ``{"type": "image"}`` (which VLM chat templates render as the model's image
placeholder) and its source is returned beside, in order, with the request field it came from so
that a bad image is reported where the client put it. Images are allowed in user messages only (as
in OpenAI's API); a text-only part list of any other role is joined into a string (with "\\n", as
vLLM does), since templates such as GLM-4.1V's print non-user content verbatim. For a text-only
model (``text_only``) user messages' text parts are joined too: its template expects a string.

Accepted image parts: OpenAI's ``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}``
(``image_url`` also as a plain string), and vLLM's offline ``{"type": "image_pil", "image_pil": PIL}``
and ``{"type": "image", "image": PIL | bytes | str}``.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

_IMAGE_TYPES = ("image_url", "image_pil", "image")
_PART_TYPES = ("text", *_IMAGE_TYPES)
_DETAILS = ("auto", "low", "high")


def split_images(messages: list[dict], text_only: bool = False) -> tuple[list[dict], list[tuple[str, object]]]:
    """``(messages for the chat template, [(field, image source), ...])``; ``messages`` is not modified.
    ValueError naming the part (``messages[i].content[j]...``) for a part pagoda cannot take.
    ``text_only``: the model takes no images, so text parts become one string in every role."""
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list, got {type(messages).__name__}")  # noqa: TRY004 - a 400
    images: list[tuple[str, object]] = []
    out = [_message(i, message, images, text_only) for i, message in enumerate(messages)]
    return out, images


def _message(i: int, message: Any, images: list[tuple[str, object]], text_only: bool) -> Any:
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return message  # a string, None or malformed content: the tokenizer's message check reports the last
    parts = [_part(f"messages[{i}].content[{j}]", part, images) for j, part in enumerate(message["content"])]
    role = message.get("role")
    has_images = any(p["type"] == "image" for p in parts)
    if has_images and role != "user":
        raise ValueError(f"messages[{i}]: images are allowed in user messages only, not in a {role!r} message")
    if role != "user" or (text_only and not has_images):
        return {**message, "content": "\n".join(p["text"] for p in parts)}
    return {**message, "content": parts}


def _part(where: str, part: Any, images: list[tuple[str, object]]) -> dict:
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise ValueError(f"{where} must be an object with a string 'type'")  # noqa: TRY004 - a 400
    kind = part["type"]
    if kind not in _PART_TYPES:
        raise ValueError(f"{where}.type {kind!r} is not supported (supported: {', '.join(_PART_TYPES)})")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text must be a string, got {type(part.get('text')).__name__}")
        return {"type": "text", "text": part["text"]}
    images.append(_image_source(where, kind, part))
    return {"type": "image"}


def _image_source(where: str, kind: str, part: dict) -> tuple[str, object]:
    value = part.get(kind)
    if kind == "image_url":
        if isinstance(value, dict):
            detail = value.get("detail")
            if detail is not None and detail not in _DETAILS:
                raise ValueError(f"{where}.image_url.detail must be one of {', '.join(_DETAILS)}, got {detail!r}")
            value = value.get("url")
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}.image_url.url is missing (expected a data:image/...;base64 or http(s) URL)")
        return f"{where}.image_url", value
    allowed = (Image.Image,) if kind == "image_pil" else (Image.Image, bytes, str)
    if not isinstance(value, allowed):
        names = "a PIL image" if kind == "image_pil" else "a PIL image, bytes or a URL string"
        raise ValueError(f"{where}.{kind} must be {names}, got {type(value).__name__}")  # noqa: TRY004 - a 400
    return f"{where}.{kind}", value
