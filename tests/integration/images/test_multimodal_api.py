"""Images through the front doors, end to end: the official ``openai`` client and the pagoda.v1 gRPC
stubs against a real local Ray cluster + Serve app (one CPU replica of the tiny random-weight
GLM-4.1V, shared with test_fuzz_images: conftest.py) on 127.0.0.1 — the requests Open-AutoGLM's phone
agent sends (a system prompt, then a screenshot as a base64 PNG data URL and the task). Every bad image
is a 400 / INVALID_ARGUMENT naming its part, whether the front end or the engine finds it, and leaves no
KV block behind; a text-only model (the embedded one) refuses image parts the same way."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import os

import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")
grpc = pytest.importorskip("grpc")
from PIL import Image, ImageDraw

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.frontend import build_frontend
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.config import AppConfig
from pagoda.engine.config import MultiModalConfig
from tests.integration.api_app import more_servers, wait_engine_idle
from tests.loopback_http import image_site as loopback_image_site

MODEL = "apitest"
SYSTEM = "You are a phone agent. Answer with the next action."
TASK = "Open the settings app."


def screenshot(width: int = 540, height: int = 1200) -> bytes:
    """A phone screen: status bar, a grid of app icons, a dock (PNG)."""
    image = Image.new("RGB", (width, height), (245, 245, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, 40), fill=(20, 20, 20))
    for row in range(5):
        for col in range(4):
            x, y = 30 + col * 125, 120 + row * 160
            draw.rounded_rectangle((x, y, x + 90, y + 90), radius=18, fill=(40 * col + 60, 30 * row + 80, 200))
    draw.rectangle((0, height - 140, width, height), fill=(210, 210, 220))
    return _png(image)


def noise_png(width: int, height: int) -> bytes:
    return _png(Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)), compress_level=1)


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


SCREEN = screenshot()
TRUNCATED = noise_png(64, 64)[:3000]  # its header reads fine; decoding fails, in the engine


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def agent_messages(*images: str, task: str = TASK) -> list[dict]:
    """Open-AutoGLM's request shape: a system prompt, then the screenshot(s) and the task."""
    content = [{"type": "image_url", "image_url": {"url": url}} for url in images] + [{"type": "text", "text": task}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def client(app):
    return openai.OpenAI(base_url=app[2].http_url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stub(app):
    with grpc.insecure_channel(app[2].grpc_target) as ch:
        yield pb_grpc.PagodaStub(ch)


def expected_prompt_tokens(servers, messages) -> int:
    """What the engine runs for ``messages``: the front end's count, image placeholders expanded."""
    return asyncio.run(servers.frontend.prompt(messages=messages)).num_tokens


def status_of(client, messages, max_tokens=4) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens)
    return info.value


# ---- OpenAI HTTP -------------------------------------------------------------------------------------


def test_streamed_chat_with_a_screenshot_answers(app, client):
    messages = agent_messages(data_url(SCREEN))
    chunks = list(client.chat.completions.create(  # Open-AutoGLM's sampling settings
        model=MODEL, messages=messages, max_tokens=8, temperature=0, top_p=0.85, frequency_penalty=0.2, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert usage.completion_tokens == 8
    assert usage.prompt_tokens == expected_prompt_tokens(app[2], messages)  # the image at its expanded size
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, top_p=0.85,
                                           frequency_penalty=0.2, extra_body={"ignore_eos": True})
    assert whole.choices[0].message.content == text and whole.usage.prompt_tokens == usage.prompt_tokens


def test_multi_turn_with_a_full_size_screenshot(app, client):
    big = noise_png(1080, 2400)  # a 1080x2400 screenshot at its worst: ~7.8 MB of PNG, ~10 MB as a data URL
    assert len(big) > 4 * 2**20
    messages = [  # Open-AutoGLM keeps earlier turns with their images removed (text-only part lists)
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": TASK}]},
        {"role": "assistant", "content": "do(action=\"Home\")"},
        {"role": "user", "content": [{"type": "text", "text": "** Screen Info **"},
                                     {"type": "image_url", "image_url": {"url": data_url(big), "detail": "high"}}]},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == expected_prompt_tokens(app[2], messages)


@pytest.mark.parametrize("messages, param, words", [
    (agent_messages(data_url(b"GIF89a, or not")), "messages[1].content[0].image_url", "not a decodable image"),
    (agent_messages(data_url(TRUNCATED)), "messages[1].content[0].image_url", "not a decodable image"),  # engine
    (agent_messages("https://example.com/screen.png"), "messages[1].content[0].image_url", "allow_image_urls"),
    (agent_messages(*[data_url(SCREEN)] * 9), "messages[1].content[8].image_url", "limit_images_per_prompt (8)"),
    ([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}}]}], "messages[0].content[0].type",
     "not supported"),
])
def test_bad_images_are_400_naming_the_part_and_leak_nothing(app, client, messages, param, words):
    e = status_of(client, messages)
    assert e.status_code == 400 and e.body["param"] == param and words in e.body["message"], e.body
    assert e.body["type"] == "invalid_request_error"
    wait_engine_idle(app[1], timeout_s=2.0)


def test_context_length_counts_image_tokens(app, client):
    messages = agent_messages(*[data_url(SCREEN)] * 8)  # 8 placeholders in the ids, 8 x 55 tokens in the engine
    assert len(asyncio.run(app[2].frontend.prompt(messages=messages)).token_ids) < 100
    e = status_of(client, messages, max_tokens=40)
    assert e.status_code == 400 and e.body["param"] == "max_tokens"
    assert "of which 440 for 8 image(s)) + max_tokens (40) must be <= max_model_len (512)" in e.body["message"]


def test_completions_take_no_images(client):
    with pytest.raises(openai.BadRequestError, match="/v1/chat/completions") as info:
        client.completions.create(model=MODEL, prompt="x", max_tokens=2,
                                  extra_body={"multi_modal_data": {"image": data_url(SCREEN)}})
    assert info.value.body["param"] == "multi_modal_data"


@pytest.fixture(scope="module")
def image_site():
    """A loopback web server: /screen.png is the screenshot, anything else 404."""
    with loopback_image_site({"/screen.png": SCREEN}) as url:
        yield url


@pytest.fixture(scope="module")
def strict(app):
    """Servers over the same replica with their own image limits: URLs allowed, one small image per prompt."""
    limits = MultiModalConfig(limit_images_per_prompt=1, max_image_bytes=50_000, max_input_image_pixels=600 * 1300,
                              allow_image_urls=True, image_fetch_timeout_s=5)
    config = dataclasses.replace(app[0], engine=dataclasses.replace(app[0].engine, multimodal=limits))
    servers = more_servers(app[2], config, ApiConfig(http_port=0, grpc_port=None))
    yield openai.OpenAI(base_url=servers.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    servers.stop()


def test_server_limits_and_url_images(app, strict, image_site):
    r = strict.chat.completions.create(model=MODEL, messages=agent_messages(image_site + "/screen.png"), max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == expected_prompt_tokens(app[2], agent_messages(data_url(SCREEN)))
    for messages, words in [
        (agent_messages(image_site + "/gone.png"), "HTTP 404"),
        (agent_messages(data_url(noise_png(200, 200))), "max_image_bytes (50000)"),
        (agent_messages(data_url(screenshot(700, 1200))), "max_input_image_pixels (780000)"),
        (agent_messages(data_url(SCREEN), image_site + "/screen.png"), "limit_images_per_prompt (1)"),
    ]:
        e = status_of(strict, messages)
        assert e.status_code == 400 and e.body["param"].startswith("messages[1].content[") and words in e.body["message"]
    wait_engine_idle(app[1], timeout_s=2.0)


# ---- gRPC --------------------------------------------------------------------------------------------


def agent_chat(*images: bytes, task: str = TASK) -> pb.ChatMessages:
    parts = [pb.ContentPart(image=data) for data in images] + [pb.ContentPart(text=task)]
    return pb.ChatMessages(messages=[pb.ChatMessage(role="system", content=SYSTEM),
                                     pb.ChatMessage(role="user", parts=parts)])


def grpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(call)
    return info.value


def test_grpc_generate_with_image_parts(app, stub):
    sampling = pb.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    responses = list(stub.Generate(pb.GenerateRequest(messages=agent_chat(SCREEN), sampling=sampling), timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 6 and responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
    expected = expected_prompt_tokens(app[2], agent_messages(data_url(SCREEN)))
    assert responses[-1].usage.prompt_tokens == expected
    tokens = stub.Tokenize(pb.TokenizeRequest(messages=agent_chat(SCREEN)), timeout=30)
    assert tokens.count == expected == len(tokens.token_ids)
    assert stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).supports_images


def test_grpc_text_form_with_images_beside_it(stub):
    text = "<|begin_of_image|><|image|><|end_of_image|>What is on the screen?"
    sampling = pb.SamplingParams(max_tokens=3, ignore_eos=True)
    responses = list(stub.Generate(pb.GenerateRequest(text=text, images=[SCREEN], sampling=sampling), timeout=60))
    assert sum(len(r.token_ids) for r in responses) == 3
    e = grpc_error(stub.Generate(pb.GenerateRequest(text="no placeholder", images=[SCREEN]), timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("images[0]: the prompt has 0")


@pytest.mark.parametrize("image, words", [(b"\x89PNG\r\n not really", "not a decodable image"),
                                          (TRUNCATED, "not a decodable image")])  # the second fails in the engine
def test_grpc_bad_image_is_invalid_argument_naming_the_part(app, stub, image, words):
    e = grpc_error(stub.Generate(pb.GenerateRequest(messages=agent_chat(image)), timeout=30))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.details().startswith("messages[1].parts[0].image: ") and words in e.details(), e.details()
    wait_engine_idle(app[1], timeout_s=2.0)


# ---- a text-only model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_only():
    """The embedded (text-only) model's front doors; image checks fail before any replica is asked."""
    api = ApiConfig(http_port=0, grpc_port=0)
    servers = ApiServers.from_frontend(build_frontend(None, AppConfig(), api), api)
    yield servers
    servers.stop()


def test_text_only_model_refuses_image_parts(text_only):
    client = openai.OpenAI(base_url=text_only.http_url + "/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="pagoda", messages=agent_messages(data_url(SCREEN)), max_tokens=4)
    e = info.value
    assert e.body["param"] == "messages[1].content[0].image_url" and "does not take images" in e.body["message"]
    with grpc.insecure_channel(text_only.grpc_target) as ch:
        stub = pb_grpc.PagodaStub(ch)
        e = grpc_error(stub.Generate(pb.GenerateRequest(messages=agent_chat(SCREEN)), timeout=30))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith("messages[1].parts[0].image:")
        assert not stub.ModelInfo(pb.ModelInfoRequest(), timeout=30).supports_images


# ---- offline: LLM.chat takes the same parts ------------------------------------------------------------


def test_offline_chat_with_image_url_and_pil_parts(tiny_glm4v):
    from pagoda import LLM, SamplingParams

    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", max_model_len=512, num_blocks=64)
    greedy = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    by_url = llm.chat(agent_messages(data_url(SCREEN)), greedy)[0]
    pil = Image.open(io.BytesIO(SCREEN))
    by_pil = llm.chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": [
        {"type": "image_pil", "image_pil": pil}, {"type": "text", "text": TASK}]}], greedy)[0]
    assert by_url.outputs[0].token_ids == by_pil.outputs[0].token_ids
    assert by_url.prompt_token_ids == by_pil.prompt_token_ids and len(by_url.prompt_token_ids) > 55
    with pytest.raises(ValueError, match=r"^messages\[1\]\.content\[0\]\.image_url: not a decodable image"):
        llm.chat(agent_messages(data_url(TRUNCATED)), greedy)
    llm.engine.kv.check_invariants()
    assert not llm.engine.has_unfinished_requests()
