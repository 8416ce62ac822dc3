"""OpenAI chat messages with image parts -> template-ready messages and the images, in order."""

from __future__ import annotations

import copy
import re

import jinja2
import pytest
from PIL import Image

from pagoda.engine.multimodal.chat import split_images
from tests.tiny_models import GLM4V_CHAT_TEMPLATE

PIL_IMAGE = Image.new("RGB", (8, 8))
URL = "data:image/png;base64,AAAA"


def _user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def test_image_parts_become_placeholders_and_images_come_out_in_order():
    messages = [
        {"role": "system", "content": "be brief"},
        _user({"type": "text", "text": "compare"}, {"type": "image_url", "image_url": {"url": URL, "detail": "low"}}),
        {"role": "assistant", "content": "ok"},
        _user(
            {"type": "image_url", "image_url": "https://example.com/a.png"},  # image_url as a plain string
            {"type": "image_pil", "image_pil": PIL_IMAGE},
            {"type": "image", "image": b"\x89PNG"},
            {"type": "text", "text": "and these", "extra": "dropped"},
        ),
    ]
    before = copy.deepcopy(messages)
    out, images = split_images(messages)
    assert messages == before  # the caller's messages are left alone
    assert out[0] == messages[0] and out[2] == messages[2]
    assert out[1] == _user({"type": "text", "text": "compare"}, {"type": "image"})
    assert out[3] == _user({"type": "image"}, {"type": "image"}, {"type": "image"}, {"type": "text", "text": "and these"})
    assert images == [
        ("messages[1].content[1].image_url", URL),
        ("messages[3].content[0].image_url", "https://example.com/a.png"),
        ("messages[3].content[1].image_pil", PIL_IMAGE),
        ("messages[3].content[2].image", b"\x89PNG"),
    ]


def test_text_only_part_lists_of_other_roles_become_strings():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        _user({"type": "text", "text": "hi"}),
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
    ]
    out, images = split_images(messages)
    assert out == [{"role": "system", "content": "a\nb"}, _user({"type": "text", "text": "hi"}), messages[2]]
    assert images == []


def test_a_text_only_model_gets_user_text_parts_as_one_string():
    user = _user({"type": "text", "text": "What is"}, {"type": "text", "text": "the capital of France?"})
    out, _ = split_images([user], text_only=True)
    assert out == [{"role": "user", "content": "What is\nthe capital of France?"}]
    assert split_images([user])[0] == [user]  # a vision-language template renders the parts itself


@pytest.mark.parametrize("part, match", [
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, r"\.type 'input_audio' is not supported"),
    ({"type": "video_url", "video_url": {"url": "x"}}, r"\.type 'video_url' is not supported"),
    ({"type": "file", "file": {"file_id": "f"}}, r"\.type 'file' is not supported"),
    ({"type": "refusal", "refusal": "no"}, r"\.type 'refusal' is not supported \(supported: text, image_url, image_pil"),
    ({"text": "no type"}, r" must be an object with a string 'type'"),
    ("a bare string", r" must be an object with a string 'type'"),
    ({"type": "text", "text": 5}, r"\.text must be a string, got int"),
    ({"type": "text"}, r"\.text must be a string, got NoneType"),
    ({"type": "image_url", "image_url": {}}, r"\.image_url\.url is missing"),
    ({"type": "image_url", "image_url": {"url": ""}}, r"\.image_url\.url is missing"),
    ({"type": "image_url"}, r"\.image_url\.url is missing"),
    ({"type": "image_url", "image_url": {"url": URL, "detail": "ultra"}}, r"\.image_url\.detail must be one of auto, low, high"),
    ({"type": "image_pil", "image_pil": b"bytes"}, r"\.image_pil must be a PIL image, got bytes"),
    ({"type": "image", "image": 3}, r"\.image must be a PIL image, bytes or a URL string, got int"),
])
def test_bad_parts_are_named(part, match):
    messages = [{"role": "system", "content": "s"}, _user({"type": "text", "text": "t"}, part)]
    with pytest.raises(ValueError, match="^" + re.escape("messages[1].content[1]") + match):
        split_images(messages)


def test_images_only_in_user_messages():
    messages = [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": URL}}]}]
    with pytest.raises(ValueError, match=r"^messages\[0\]: images are allowed in user messages only"):
        split_images(messages)
    with pytest.raises(ValueError, match="messages must be a list"):
        split_images({"role": "user", "content": "hi"})


def test_glm4v_template_renders_one_placeholder_per_image_where_the_part_was():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "sys"}]},
        _user({"type": "text", "text": "A"}, {"type": "image_url", "image_url": {"url": URL}},
              {"type": "text", "text": "B"}, {"type": "image_pil", "image_pil": PIL_IMAGE}),
    ]
    out, images = split_images(messages)
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(GLM4V_CHAT_TEMPLATE)  # as HF's
    text = template.render(messages=out, add_generation_prompt=True)
    image = "<|begin_of_image|><|image|><|end_of_image|>"
    assert text == f"[gMASK]<sop><|system|>\nsys<|user|>\nA{image}B{image}<|assistant|>\n"
    assert len(images) == 2
