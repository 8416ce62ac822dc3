"""Images at the API edge, without Ray or a model: OpenAI content parts and gRPC ChatMessage parts
become a ``Prompt`` (token ids with one placeholder per image + the encoded images), and every bad
image is a 400 / INVALID_ARGUMENT naming its part. A fake tokenizer renders an image part as one
placeholder id; a fake processor counts one token per 28x28 tile, as GLM-4.1V does after its merge."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from pagoda.cluster.api import errors
from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.frontend import Frontend, Prompt
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.grpc_service import _chat_prompt, _messages
from pagoda.cluster.api.openai_protocol import parse_request
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import GenerateChunk
from pagoda.cluster.serve_cli import image_overrides, with_image_overrides
from pagoda.engine.cli import build_parser
from pagoda.engine.config import EngineConfig, MultiModalConfig
from pagoda.engine.llm import _named_image
from pagoda.engine.request import CompletionOutput, RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from tests.loopback_http import image_site

IMAGE_TOKEN = 999
LIMITS = MultiModalConfig(limit_images_per_prompt=2, max_image_bytes=200_000, max_input_image_pixels=1000 * 1000)


class FakeTokenizer:
    """Characters are tokens; the template writes `<img>` for an image part, which encodes to IMAGE_TOKEN."""

    chat_template = "fake"

    def __len__(self) -> int:
        return 1000

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        def content(c):
            return c if isinstance(c, str) else "".join("<img>" if p["type"] == "image" else p["text"] for p in c)

        return "".join(f"{m['role']}:{content(m['content'])}\n" for m in messages) + "assistant:"

    def __call__(self, text: str, add_special_tokens: bool = True):
        ids = []
        for k, piece in enumerate(text.split("<img>")):
            ids += ([IMAGE_TOKEN] if k else []) + [ord(c) % 900 for c in piece]
        return type("Encoding", (), {"input_ids": ids})()


class FakeProcessor:
    image_token_id = IMAGE_TOKEN

    def num_image_tokens(self, width: int, height: int) -> int:
        return max(1, width // 28) * max(1, height // 28)


class FakeClient:
    """Records what it is sent; fails like an engine would for a prompt with images and an "x"."""

    def __init__(self) -> None:
        self.sent: list[tuple] = []

    async def generate(self, token_ids, params, request_id, priority=0, images=(), tenant=None):
        self.sent.append((list(token_ids), tuple(images)))
        if images and ord("x") % 900 in token_ids:
            raise ValueError("multi_modal_data.image[1]: not a decodable image (OSError: image file is truncated)")
        yield GenerateChunk(RequestOutput(request_id, None, list(token_ids), [
            CompletionOutput(0, "ok", [1], finish_reason="stop")], True), "fake", len(token_ids))


PROCESSOR = FakeProcessor()


def frontend(mm=LIMITS, processor=PROCESSOR, max_model_len=256) -> Frontend:
    app = AppConfig(engine=EngineConfig(multimodal=mm))
    return Frontend(FakeClient(), FakeTokenizer(), app, ApiConfig(), max_model_len, processor)


def png(width: int = 56, height: int = 84, noise: bool = False) -> bytes:
    image = Image.effect_noise((width, height), 64).convert("RGB") if noise else Image.new("RGB", (width, height), "teal")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(*parts, system: str | None = "You are a phone agent.") -> list[dict]:
    """A system message, then one user message whose content is ``parts`` (urls become image_url parts)."""
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith("data:") or "://" in p else
               {"type": "text", "text": p} for p in parts]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def prompt(f: Frontend, **kwargs) -> Prompt:
    return asyncio.run(f.prompt(**kwargs))


def api_error(f: Frontend, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as info:
        prompt(f, **kwargs)
    assert info.value.http_status == 400 and info.value.code.name == "INVALID_ARGUMENT"
    return info.value


# ---- a chat with an image becomes ids with one placeholder + the encoded bytes -----------------------


def test_chat_image_part_becomes_one_placeholder_and_the_encoded_bytes():
    data = png(56, 84)
    p = prompt(frontend(), messages=chat(data_url(data), "What is on screen?"))
    assert p.token_ids.count(IMAGE_TOKEN) == 1 and p.images == (data,)
    assert p.image_fields == ("messages[1].content[0].image_url",) and p.image_tokens == (2 * 3,)
    assert p.num_tokens == len(p.token_ids) - 1 + 6
    expanded = p.expanded_token_ids(IMAGE_TOKEN)
    assert len(expanded) == p.num_tokens and expanded.count(IMAGE_TOKEN) == 6


def test_text_and_token_forms_take_images_beside_them():
    f = frontend()
    p = prompt(f, token_ids=[5, IMAGE_TOKEN, 6], images=[("images[0]", png())])
    assert p.images == (png(),) and p.image_fields == ("images[0]",)
    e = api_error(f, token_ids=[5, 6], images=[("images[0]", png())])
    assert e.param == "images[0]" and "0 image placeholder token(s)" in e.message
    e = api_error(f, text="look: <img>")  # a placeholder typed as text, with no image
    assert e.param == "prompt" and "1 image placeholder" in e.message
    e = api_error(f, messages=chat("hi"), images=[("images[0]", png())])
    assert e.param == "images"


@pytest.mark.parametrize("parts, param, words", [
    ((data_url(b"hello, not an image"),), "messages[1].content[0].image_url", "not a decodable image"),
    (("data:image/png;base64,@@@@",), "messages[1].content[0].image_url", "not valid base64"),
    ((data_url(png(400, 400, noise=True)),), "messages[1].content[0].image_url", "max_image_bytes (200000)"),
    ((data_url(png(2000, 600)),), "messages[1].content[0].image_url", "max_input_image_pixels (1000000)"),
    (("x", data_url(png()), data_url(png()), data_url(png())), "messages[1].content[3].image_url",
     "3 images, more than limit_images_per_prompt (2)"),
    (("http://127.0.0.1:9/a.png",), "messages[1].content[0].image_url", "allow_image_urls"),
    (("ftp://host/a.png",), "messages[1].content[0].image_url", "unsupported image URL scheme"),
    (("see <img>", data_url(png())), "messages[1].content[1].image_url", "2 image placeholder token(s)"),
])
def test_each_bad_image_is_a_400_naming_its_part(parts, param, words):
    e = api_error(frontend(), messages=chat(*parts))
    assert e.param == param and e.message.startswith(param + ":") and words in e.message, e.message


def test_an_image_the_model_cannot_resize_is_a_400():
    class StrictProcessor(FakeProcessor):  # refuses extreme aspect ratios, as GLM-4.1V's smart_resize does
        def num_image_tokens(self, width, height):
            if max(width, height) / min(width, height) > 200:
                raise ValueError("absolute aspect ratio must be smaller than 200")
            return super().num_image_tokens(width, height)

    e = api_error(frontend(processor=StrictProcessor()), messages=chat(data_url(png(28 * 300, 28))))
    assert e.param == "messages[1].content[0].image_url"
    assert e.message == "messages[1].content[0].image_url (8400x28): absolute aspect ratio must be smaller than 200"


def test_bad_parts_name_the_part():
    f = frontend()
    e = api_error(f, messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}])
    assert e.param == "messages[0].content[0].type" and "not supported" in e.message
    e = api_error(f, messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(png())}}]}])
    assert e.param == "messages[0]" and "user messages only" in e.message
    e = api_error(f, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}])
    assert e.param == "messages[0].content[0].image_url.url"


def test_text_only_model_refuses_images_and_joins_text_parts():
    f = frontend(processor=None)
    e = api_error(f, messages=chat("hi", data_url(png())))
    assert e.param == "messages[1].content[1].image_url" and "does not take images" in e.message
    e = api_error(f, token_ids=[1, 2], images=[("images[0]", png())])
    assert e.param == "images[0]"
    p = prompt(f, messages=chat("one", "two", system=None))  # a text-only template gets string content
    assert FakeTokenizer()("user:one\ntwo\nassistant:").input_ids == p.token_ids and not p.images


def test_context_length_counts_the_expanded_image_tokens():
    f = frontend(max_model_len=120)
    p = prompt(f, messages=chat(data_url(png(280, 280)), "hi"))  # 100 image tokens behind one placeholder
    assert len(p.token_ids) < 60 and p.num_tokens > 100
    with pytest.raises(ApiError) as info:
        f._check_fits(p, SamplingParams(max_tokens=16))
    assert info.value.param == "prompt" and "of which 100 for 1 image(s)" in info.value.message


def test_engine_image_errors_name_the_part_and_images_reach_the_client():
    f = frontend()
    messages = chat("a", data_url(png()), data_url(png(28, 28)), "x")

    async def run():
        p = await f.prompt(messages=messages)
        return [c async for c in f.generate(p, SamplingParams(max_tokens=4))]

    with pytest.raises(ApiError) as info:
        asyncio.run(run())
    assert info.value.http_status == 400 and info.value.param == "messages[1].content[2].image_url"
    assert info.value.message.startswith("messages[1].content[2].image_url: not a decodable image")
    ids, images = f.client.sent[-1]
    assert images == (png(), png(28, 28)) and ids.count(IMAGE_TOKEN) == 2


# ---- http(s) URLs: only when allowed, fetched on a worker thread -------------------------------------


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server: /slow.png answers after 0.3 s, anything else is 404."""
    with image_site({"/slow.png": png()}, delay_s=0.3) as url:
        yield url


def test_url_images_are_fetched_without_blocking_the_event_loop(image_server):
    f = frontend(mm=MultiModalConfig(allow_image_urls=True, image_fetch_timeout_s=5))

    async def run():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        p = await f.prompt(messages=chat(image_server + "/slow.png", "what is it?"))
        task.cancel()
        return p, ticks

    p, ticks = asyncio.run(run())
    assert p.images == (png(),) and ticks >= 10  # the loop kept turning during the 0.3 s download
    e = api_error(f, messages=chat(image_server + "/missing.png"))
    assert e.param == "messages[1].content[0].image_url" and "HTTP 404" in e.message


# ---- protocol shapes: /v1/completions stays text-only; gRPC parts --------------------------------------


def test_chat_body_passes_content_parts_through():
    messages = chat(data_url(png()), "hi")
    assert parse_request({"messages": messages}, chat=True).prompt == {"messages": messages}


@pytest.mark.parametrize("body, param", [
    ({"prompt": [{"type": "image_url", "image_url": {"url": "data:..."}}]}, "prompt"),
    ({"prompt": [[{"type": "text", "text": "x"}]]}, "prompt"),
    ({"prompt": "x", "multi_modal_data": {"image": "data:..."}}, "multi_modal_data"),
    ({"prompt": "x", "images": ["data:..."]}, "images"),
])
def test_completions_refuse_anything_image_like(body, param):
    with pytest.raises(ApiError) as info:
        parse_request(body, chat=False)
    assert info.value.http_status == 400 and info.value.param == param
    assert "/v1/chat/completions" in info.value.message


def test_grpc_parts_become_content_parts():
    m = pb.ChatMessages(messages=[
        pb.ChatMessage(role="system", content="be brief"),
        pb.ChatMessage(role="user", parts=[pb.ContentPart(text="what is this?"), pb.ContentPart(image=b"\x89PNG")]),
    ])
    assert _messages(m) == [{"role": "system", "content": "be brief"},
                            {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                         {"type": "image", "image": b"\x89PNG"}]}]
    both = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="x", parts=[pb.ContentPart(text="y")])])
    with pytest.raises(ApiError, match="content or parts") as info:
        _messages(both)
    assert info.value.param == "messages[0]"
    empty = pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(text="y"), pb.ContentPart()])])
    with pytest.raises(ApiError) as info:
        _messages(empty)
    assert info.value.param == "messages[0].parts[1]"


def test_grpc_errors_and_fields_name_parts_its_way():
    f = frontend()
    good = pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(image=png())])])
    assert asyncio.run(_chat_prompt(f, good)).image_fields == ("messages[0].parts[0].image",)
    bad = pb.ChatMessages(messages=[pb.ChatMessage(role="user", parts=[pb.ContentPart(text="a"),
                                                                      pb.ContentPart(image=b"not an image")])])
    with pytest.raises(ApiError) as info:
        asyncio.run(_chat_prompt(f, bad))
    assert info.value.param == "messages[0].parts[1].image" and info.value.code == errors.invalid("x").code
    assert info.value.message.startswith("messages[0].parts[1].image: not a decodable image")


# ---- configuration: YAML engine keys, serve flags; offline naming ---------------------------------------


def test_yaml_engine_keys_and_serve_flags_set_the_image_limits():
    app = AppConfig.from_dict({"engine": {"limit_images_per_prompt": 1, "allow_image_urls": True}})
    assert app.engine.multimodal.limit_images_per_prompt == 1 and app.engine.multimodal.allow_image_urls
    assert AppConfig.from_dict(app.to_dict()) == app  # what replicas rebuild from
    with pytest.raises(ValueError, match="engine.image_resize_max_pixels must be >= 784"):
        AppConfig.from_dict({"engine": {"image_resize_max_pixels": 100}})
    args = build_parser().parse_args(["serve", "--image-resize-max-pixels", "5000000", "--no-allow-image-urls",
                                      "--image-fetch-timeout-s", "2.5"])
    merged = with_image_overrides(app, image_overrides(args)).engine.multimodal
    assert (merged.image_resize_max_pixels, merged.allow_image_urls, merged.image_fetch_timeout_s,
            merged.limit_images_per_prompt) == (5_000_000, False, 2.5, 1)
    with pytest.raises(ValueError, match="--max-image-bytes: max_image_bytes must be >= 1"):
        with_image_overrides(app, {"max_image_bytes": 0})


def test_offline_chat_names_the_part_of_an_engine_image_error():
    msg = "multi_modal_data.image[1]: not a decodable image"
    fields = [["messages[0].content[0].image_url", "messages[0].content[2].image_pil"]]
    assert _named_image(msg, fields) == "messages[0].content[2].image_pil: not a decodable image"
    assert _named_image(msg, [fields[0], fields[0]]) == msg  # several conversations: whose image is unknown
    assert _named_image("max_tokens must be >= 1", fields) == "max_tokens must be >= 1"
