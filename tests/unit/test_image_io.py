"""Image sources -> decoded RGB images, and every way a request's image can break a limit."""

from __future__ import annotations

import base64
import http.server
import io
import re
import socket
import struct
import threading
import zlib

import numpy as np
import pytest
from PIL import Image

from pagoda.engine.config import MultiModalConfig
from pagoda.engine.multimodal.image_io import image_bytes, image_header_size, load_image

FIELD = "messages[1].content[0].image_url"


def _png(width: int = 40, height: int = 30, mode: str = "RGB", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.squeeze(-1) if mode == "L" else pixels, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width x height`` (its pixel data is far too short)."""
    data = bytearray(_png(1, 1))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])))
    return bytes(data)


def _raises(match: str, source, config: MultiModalConfig | None = None) -> str:
    with pytest.raises(ValueError, match=match) as info:
        load_image(source, config or MultiModalConfig(), FIELD)
    message = str(info.value)
    assert message.startswith(FIELD + ": "), message
    return message


def test_bytes_data_url_and_pil_give_the_same_rgb_pixels():
    data = _png()
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    for source in (data, _data_url(data), Image.open(io.BytesIO(data))):
        image = load_image(source, MultiModalConfig(), FIELD)
        assert image.mode == "RGB" and image.size == (40, 30)
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_jpeg():
    buffer = io.BytesIO()
    Image.open(io.BytesIO(_png())).save(buffer, format="JPEG")
    image = load_image(_data_url(buffer.getvalue(), "image/jpeg"), MultiModalConfig(), FIELD)
    assert image.mode == "RGB" and image.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(buffer.getvalue()))))


def test_transparency_is_composited_onto_white_and_grey_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (10, 20, 30, 0))  # fully transparent
    image = load_image(rgba, MultiModalConfig(), FIELD)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255) and image.getpixel((1, 1)) == (10, 20, 30)
    grey = load_image(_png(mode="L"), MultiModalConfig(), FIELD)
    assert grey.mode == "RGB" and grey.size == (40, 30)


@pytest.mark.parametrize("url, match", [
    ("data:image/png,AAAA", "data:image/<type>;base64"),  # not base64
    ("data:text/plain;base64,AAAA", "data:image/<type>;base64"),  # not an image media type
    ("data:image/png;base64", "data:image/<type>;base64"),  # no payload
    ("data:image/png;base64,@@@@", "not valid base64"),
    ("data:image/png;base64,AAA", "not valid base64"),  # bad padding
])
def test_malformed_data_urls(url, match):
    _raises(match, url)


def test_too_many_bytes_names_the_limit():
    data = _png(64, 64)
    config = MultiModalConfig(max_image_bytes=len(data) - 1)
    assert f"max_image_bytes ({len(data) - 1})" in _raises("more than max_image_bytes", data, config)
    _raises("more than max_image_bytes", _data_url(data), config)
    # a data URL far over the limit is refused before its payload is decoded
    _raises("data URL payload decodes to about", "data:image/png;base64," + "A" * 10_000, MultiModalConfig(max_image_bytes=100))


def test_not_an_image():
    assert "(unrecognized format); supported formats: PNG, JPEG" in _raises("not a decodable image", b"not an image")
    _raises("not a decodable image", _data_url(b"GIF89a-but-not-really"))
    truncated = _png(64, 64)[:200]  # the header survives, the pixel data does not
    assert image_header_size(truncated, FIELD) == (64, 64)
    _raises("not a decodable image", truncated)


def test_too_many_pixels_is_checked_on_the_header_before_decoding():
    bomb = _png_claiming(8000, 5000)  # 40M pixels claimed, 1 pixel of data: decoding would fail
    assert image_header_size(bomb, FIELD) == (8000, 5000)
    message = _raises("8000x5000 = 40000000 pixels", bomb)
    assert "max_input_image_pixels (33177600)" in message
    small = MultiModalConfig(max_input_image_pixels=1000)
    _raises(r"40x30 = 1200 pixels, more than max_input_image_pixels \(1000\)", _png(), small)
    _raises("40x30 = 1200 pixels", Image.open(io.BytesIO(_png())), small)  # PIL images too


def test_pils_own_decompression_bomb_error_is_a_value_error():
    # over twice PIL's MAX_IMAGE_PIXELS: Image.open itself refuses, even when our limit is higher
    _raises("too many pixels to decode", _png_claiming(20000, 20000), MultiModalConfig(max_input_image_pixels=10**9))
    with pytest.raises(ValueError, match="^f: image has too many pixels"):
        image_header_size(_png_claiming(20000, 20000), "f")


def test_image_header_size_and_image_bytes():
    data = _png(40, 30)
    assert image_header_size(data, FIELD) == (40, 30)
    with pytest.raises(ValueError, match=f"^{re.escape(FIELD)}: not a decodable image"):
        image_header_size(b"nope", FIELD)
    config = MultiModalConfig()
    assert image_bytes(_data_url(data), config, FIELD) == data
    assert image_bytes(data, config, FIELD) == data
    encoded = image_bytes(Image.open(io.BytesIO(data)), config, FIELD)  # a PIL image comes back as lossless PNG
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(encoded))), np.asarray(Image.open(io.BytesIO(data))))


@pytest.mark.parametrize("source, match", [
    ("http://127.0.0.1:9/x.png", "image URLs are disabled.*allow_image_urls"),
    ("https://example.com/x.png", "image URLs are disabled.*allow_image_urls"),
    ("ftp://example.com/x.png", "unsupported image URL scheme 'ftp'"),
    ("file:///etc/passwd", "unsupported image URL scheme 'file'"),
    ("just some text", "unsupported image URL scheme"),
    (12345, "expected an image as a URL string, bytes or a PIL image, got int"),
])
def test_unsupported_sources(source, match):
    _raises(match, source)


class _Handler(http.server.BaseHTTPRequestHandler):
    png = _png(40, 30)
    release = threading.Event()  # set when the test ends: a stalled handler returns

    def do_GET(self):  # http.server's name
        if self.path == "/img.png":
            self._reply(self.png)
        elif self.path == "/big.png":
            self._reply(b"\x00" * 5000)
        elif self.path == "/big-no-length.png":  # HTTP/1.0: the body ends when the connection closes
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"\x00" * 5000)
        elif self.path == "/stall.png":  # accepts, then never answers
            self.release.wait(10)
        elif self.path == "/trickle.png":  # answers, then sends a byte every 50 ms
            self.send_response(200)
            self.end_headers()
            for _ in range(200):
                if self.release.wait(0.05):
                    return
                self.wfile.write(b"\x00")
                self.wfile.flush()
        else:
            self.send_error(404)

    def _reply(self, body: bytes):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # a proxy from the environment must not see loopback requests
    monkeypatch.setenv("NO_PROXY", "*")
    _Handler.release.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.block_on_close = False
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def test_fetch_http_url(server):
    config = MultiModalConfig(allow_image_urls=True)
    image = load_image(f"{server}/img.png", config, FIELD)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(_Handler.png))))
    assert image_bytes(f"{server}/img.png", config, FIELD) == _Handler.png
    _raises("fetching the image failed: HTTP 404", f"{server}/missing.png", config)


def test_fetch_stops_at_max_image_bytes(server):
    config = MultiModalConfig(allow_image_urls=True, max_image_bytes=1000)
    _raises(r"more than max_image_bytes \(1000\)", f"{server}/big.png", config)  # by Content-Length
    _raises(r"more than max_image_bytes \(1000\)", f"{server}/big-no-length.png", config)  # by counting


def test_fetch_times_out(server):
    config = MultiModalConfig(allow_image_urls=True, image_fetch_timeout_s=0.3)
    _raises(r"timed out \(image_fetch_timeout_s=0.3\)", f"{server}/stall.png", config)  # no answer
    # an answer that would take 10 s: cut at the deadline (else its 200 bytes would fail as "not decodable")
    _raises(r"timed out \(image_fetch_timeout_s=0.3\)", f"{server}/trickle.png", config)


def test_fetch_connection_refused(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = MultiModalConfig(allow_image_urls=True, image_fetch_timeout_s=2)
    _raises("fetching the image failed", f"http://127.0.0.1:{port}/x.png", config)
