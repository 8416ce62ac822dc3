"""Image sources in, decoded RGB images out, with every limit a request can break checked on the way.

A source is a ``PIL.Image.Image``, encoded ``bytes``, or a URL string: ``data:image/...;base64,...``
always, ``http(s)://`` only when ``MultiModalConfig.allow_image_urls`` is on. Every failure is a
ValueError whose message starts with the request field it came from and names the limit, so a
front end turns it into a 400 as is; nothing a client sends gets past here as another exception.

Order of the checks, cheapest first: encoded size (before base64-decoding or downloading past it),
then width x height from the image header (before decoding the pixels: decompression bombs), then
the decode itself. ``image_bytes`` and ``image_header_size`` are the first two steps on their own,
for a front end that forwards encoded bytes to a replica without decoding pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import time
import urllib.error
import urllib.request
from http.client import HTTPException

from PIL import Image, UnidentifiedImageError

from pagoda.engine.config import MultiModalConfig

# What Image.open may identify: the web's image formats (a phone's multi-picture JPEG opens as JPEG,
# then reads as MPO). Exotic formats are refused rather than handed to their decoders (EPS would run
# Ghostscript).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_URL_SCHEMES = ("http", "https")
_READ_CHUNK = 1 << 16


def load_image(source: object, config: MultiModalConfig, field: str) -> Image.Image:
    """``source`` decoded into a fully loaded RGB image within ``config``'s limits (transparency
    composited onto white). ValueError starting with ``field`` on any failure."""
    if isinstance(source, Image.Image):
        _check_pixels(source.size, config, field)
        return to_rgb(source, field)
    image = _open(image_bytes(source, config, field), field)
    _check_pixels(image.size, config, field)
    return to_rgb(image, field)


def image_bytes(source: object, config: MultiModalConfig, field: str) -> bytes:
    """The encoded image behind ``source``: bytes as given, a data URL's payload decoded, an http(s)
    URL downloaded; at most ``config.max_image_bytes``. A PIL image comes back PNG-encoded (lossless).
    Pixels are not decoded (see ``image_header_size`` for a cheap size check)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_bytes(len(data), config, field)
        return data
    if isinstance(source, Image.Image):
        _check_pixels(source.size, config, field)
        buffer = io.BytesIO()
        to_rgb(source, field).save(buffer, format="PNG")
        return buffer.getvalue()
    if not isinstance(source, str):
        raise ValueError(  # noqa: TRY004 - bad input is a ValueError (a 400)
            f"{field}: expected an image as a URL string, bytes or a PIL image, got {type(source).__name__}"
        )
    scheme = source.partition(":")[0].lower() if ":" in source else ""
    if scheme == "data":
        return _data_url_bytes(source, config, field)
    if scheme in _URL_SCHEMES:
        if not config.allow_image_urls:
            raise ValueError(
                f"{field}: image URLs are disabled on this server (enable them with allow_image_urls); "
                f"send the image inline as a data:image/...;base64 URL"
            )
        return _fetch(source, config, field)
    raise ValueError(
        f"{field}: unsupported image URL scheme {scheme or source[:16]!r}; expected a data:image/...;base64 URL"
        + (" or an http(s) URL" if config.allow_image_urls else "")
    )


def image_header_size(data: bytes, field: str) -> tuple[int, int]:
    """``(width, height)`` read from the image header alone (no pixels decoded)."""
    return _open(data, field).size


def _open(data: bytes, field: str) -> Image.Image:
    """The image, opened lazily: header parsed, pixels not yet decoded."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:  # PIL's own cap, above our max_input_image_pixels if raised
        raise ValueError(f"{field}: image has too many pixels to decode ({e})") from None
    except Exception as e:  # noqa: BLE001 - UnidentifiedImageError, or whatever a malformed header raises
        why = "unrecognized format" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(
            f"{field}: not a decodable image ({why}); supported formats: {', '.join(IMAGE_FORMATS)}"
        ) from None


def to_rgb(image: Image.Image, field: str) -> Image.Image:
    """A loaded RGB copy (or ``image`` itself when already RGB), alpha composited onto white as
    transformers' newer processors and vLLM do, so every transformers version sees the same pixels."""
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ValueError(f"{field}: image has too many pixels to decode ({e})") from None
    except Exception as e:  # noqa: BLE001 - truncated or corrupt pixel data, whatever the decoder raises
        raise ValueError(f"{field}: not a decodable image ({type(e).__name__}: {e})") from None


def _check_pixels(size: tuple[int, int], config: MultiModalConfig, field: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"{field}: image is empty ({width}x{height})")
    if width * height > config.max_input_image_pixels:
        raise ValueError(
            f"{field}: image is {width}x{height} = {width * height} pixels, "
            f"more than max_input_image_pixels ({config.max_input_image_pixels})"
        )


def _check_bytes(size: int, config: MultiModalConfig, field: str, what: str = "image is") -> None:
    if size > config.max_image_bytes:
        raise ValueError(f"{field}: {what} {size} bytes, more than max_image_bytes ({config.max_image_bytes})")


def _data_url_bytes(url: str, config: MultiModalConfig, field: str) -> bytes:
    """The payload of ``data:image/<type>;base64,<payload>``."""
    header, comma, payload = url[len("data:"):].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or not params[0].startswith("image/") or "base64" not in params[1:]:
        raise ValueError(f"{field}: a data URL must look like data:image/<type>;base64,<data>, got {url[:40]!r}")
    _check_bytes(len(payload) // 4 * 3, config, field, "data URL payload decodes to about")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{field}: data URL payload is not valid base64 ({e})") from None
    _check_bytes(len(data), config, field)
    return data


def _fetch(url: str, config: MultiModalConfig, field: str) -> bytes:
    """``url`` downloaded within ``image_fetch_timeout_s`` and ``max_image_bytes``."""
    timeout = config.image_fetch_timeout_s
    try:
        data = _download(url, timeout, config.max_image_bytes)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{field}: fetching the image failed: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):  # a connect timeout
            raise ValueError(  # noqa: TRY004 - a 400, not a type error
                f"{field}: fetching the image timed out (image_fetch_timeout_s={timeout})"
            ) from None
        raise ValueError(f"{field}: fetching the image failed: {e.reason}") from None
    except TimeoutError:
        raise ValueError(f"{field}: fetching the image timed out (image_fetch_timeout_s={timeout})") from None
    except (OSError, HTTPException, ValueError) as e:  # resets, bad status lines, malformed URLs
        raise ValueError(f"{field}: fetching the image failed: {type(e).__name__}: {e}") from None
    if data is None:
        raise ValueError(f"{field}: image download is more than max_image_bytes ({config.max_image_bytes})")
    return data


def _download(url: str, timeout: float, limit: int) -> bytes | None:
    """The body of ``url``; None once it passes ``limit`` bytes. Every network wait is bounded by
    ``timeout`` and the whole download by ``timeout`` too (checked between reads, so a trickle is cut)."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_HttpOnlyRedirects())  # built per call: proxies from the environment now
    request = urllib.request.Request(url, headers={"User-Agent": "pagoda", "Accept": "image/*"})
    with opener.open(request, timeout=timeout) as response:
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > limit:
            return None
        chunks, size = [], 0
        while chunk := response.read1(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            if time.monotonic() > deadline:
                raise TimeoutError
            chunks.append(chunk)
        return b"".join(chunks)


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) URLs only (urllib's default would also follow ftp://)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if newurl.partition(":")[0].lower() not in _URL_SCHEMES:
            raise urllib.error.HTTPError(newurl, code, f"redirect to a non-http(s) URL {newurl[:40]!r}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)
