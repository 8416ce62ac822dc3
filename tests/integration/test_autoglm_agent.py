"""Open-AutoGLM's phone agent against ``pagoda serve``, run as a user runs it: the CLI in its own
process (local Ray cluster, Serve app, OpenAI HTTP on 127.0.0.1), the official ``openai`` client
sending exactly what Open-AutoGLM's ``ModelClient`` sends — model ``autoglm-phone-9b``,
``stream=True``, ``temperature=0.0``, ``top_p=0.85``, ``frequency_penalty=0.2``,
``max_tokens=3000``, a system prompt, and a user turn of [screenshot as a PNG data URL, text] —
then a 5-step session the way its agent loop builds one: after each step the previous user turn
loses its image (only its text parts stay) and the reply joins the history.

The model is the tiny GLM-4.1V with its final norm zeroed (``terse``): every logit is 0, so
greedy answers are three tokens long and a step takes seconds, not the minutes 3,000 random tokens
would; the image path (decode, resize, vision tower, M-RoPE, prefix cache) runs in full.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image, ImageDraw

from pagoda.engine.multimodal.chat import split_images
from pagoda.engine.tokenizer import encode_chat, load_tokenizer
from tests.tiny_models import make_tiny_glm4v

openai = pytest.importorskip("openai")
pytest.importorskip("ray")

CLI = [sys.executable, "-m", "pagoda.engine.cli"]
BLOCK_SIZE = 16  # the engine's default KV block
SYSTEM = "You are a phone-operating agent. Think in <think></think>, then answer with do(action=...) or finish(message=...)."
# Open-AutoGLM's ModelConfig defaults
REQUEST = {"model": "autoglm-phone-9b", "max_tokens": 3000, "temperature": 0.0, "top_p": 0.85,
           "frequency_penalty": 0.2, "extra_body": {}, "stream": True}


def _screenshot(step: int) -> str:
    """A 1080x2400 phone screen (status bar, app grid, dock) as Open-AutoGLM sends it: a PNG data URL."""
    image = Image.new("RGB", (1080, 2400), (245, 245, 250))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, 1080, 80), fill=(20, 20, 20))
    for row in range(6):
        for col in range(4):
            x, y = 60 + col * 250, 240 + row * 320
            draw.rounded_rectangle((x, y, x + 180, y + 180), radius=36, fill=((40 * col + 50 * step) % 256, 80, 200))
    draw.rectangle((0, 2120, 1080, 2400), fill=(210, 210, 220))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _user(text: str, image_url: str | None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": image_url}}] if image_url else []
    return {"role": "user", "content": [*content, {"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedded_path):
    root = tmp_path_factory.mktemp("autoglm")
    model = make_tiny_glm4v(root / "model", embedded_path, terse=True)
    config = root / "serve.yaml"
    config.write_text(textwrap.dedent(f"""
        engine: {{model: {str(model)!r}, dtype: float32, device: cpu, max_model_len: 8192, cpu_kv_cache_gib: 0.05}}
        deployment: {{name: autoglm, num_replicas: 1}}
    """))
    port = 18000 + os.getpid() % 1000
    cmd = CLI + ["serve", "--config", str(config), "--num-cpus", "2", "--http-port", str(port), "--grpc-port", "-1",
                 "--served-model-name", "autoglm-phone-9b", "--image-resize-max-pixels", "5000000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_for(proc, "Ctrl-C to stop", timeout_s=240)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=120)
        yield client, load_tokenizer(model)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_for(proc: subprocess.Popen, marker: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if marker in line:
            return
        if not line and proc.poll() is not None:
            pytest.fail(f"pagoda serve exited with {proc.returncode}: {proc.stderr.read()[-3000:]}")
    pytest.fail(f"pagoda serve printed no {marker!r} within {timeout_s}s")


def _request(client, messages: list[dict], **extra) -> dict:
    """One step as Open-AutoGLM's ModelClient makes it: stream, time the first content token, keep the text."""
    start, first, text, finish, usage = time.perf_counter(), None, "", None, None
    for chunk in client.chat.completions.create(messages=messages, **REQUEST, **extra):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta.content is not None:
            first = first if first is not None else time.perf_counter() - start
            text += choice.delta.content
        finish = choice.finish_reason or finish
    return {"ttft_s": first, "text": text, "finish_reason": finish, "usage": usage}


def test_open_autoglm_request_is_answered(server):
    client, _ = server
    reply = _request(client, [{"role": "system", "content": SYSTEM}, _user("Open the settings app.", _screenshot(0))])
    assert reply["finish_reason"] == "stop"
    assert reply["ttft_s"] is not None  # content deltas streamed


def test_five_step_agent_session_reuses_its_history(server):
    """Each step: the whole history as text + one new screenshot. Step n+1 is served from the cache
    up to where step n's screenshot was (block-aligned): the system prompt and every earlier turn."""
    client, tokenizer = server
    history = [{"role": "system", "content": SYSTEM}]
    previous_ids, steps = None, []
    for step in range(5):
        task = "Open the settings app." if step == 0 else f'** Screen Info **\n{{"current_app": "Settings", "step": {step}}}'
        messages = [*history, _user(task, _screenshot(1 + step))]  # not the first test's screenshot
        reply = _request(client, messages, stream_options={"include_usage": True})
        assert reply["finish_reason"] == "stop", step
        usage = reply["usage"]
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        ids = encode_chat(tokenizer, split_images(messages)[0])  # what the server rendered, one token per image
        assert usage.prompt_tokens - len(ids) > 3000  # a full-size screenshot: ~3,100 image tokens
        if previous_ids is not None:
            common = next(i for i, (a, b) in enumerate(zip(previous_ids, ids)) if a != b)
            assert previous_ids.index(tokenizer.convert_tokens_to_ids("<|image|>")) >= common  # it diverges at or before that image
            steps.append((cached, common // BLOCK_SIZE * BLOCK_SIZE))
        previous_ids = ids
        history += [_user(task, None), {"role": "assistant", "content": reply["text"]}]  # the image dropped
    assert [cached for cached, _ in steps] == [expected for _, expected in steps], steps
    assert steps[-1][0] > steps[0][0] > 0  # the reused prefix grows with the history
