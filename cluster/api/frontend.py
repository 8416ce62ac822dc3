"""``Frontend``: what the gRPC service and the OpenAI HTTP API share, in front of ``PagodaClient``.

Both protocols reduce a request to the same steps — check the key and the model, turn the prompt
(text, token ids or chat messages) into token ids with the model's tokenizer, build
``SamplingParams``, take a concurrency slot, and stream ``GenerateChunk``s under a deadline. Every
failure leaves as an ``ApiError`` (``pagoda.cluster.api.errors``), which each protocol renders its way.

Images (vision-language models): chat messages may hold image parts; the chat template writes one
placeholder token per image and the encoded images travel beside the token ids to a replica, whose
engine decodes them and expands each placeholder to the image's tokens. What can be checked without
decoding pixels is checked here, each a 400 naming the part (``messages[1].content[0].image_url``):
the model takes images at all, their number, their encoded size, the header's width x height, and
the context length with every image counted at its expanded size. URL downloads and base64 decoding
run on worker threads, never on the event loop.

Cancellation: the stream is consumed through ``PagodaClient.generate``, which cancels the Serve
stream when its consumer stops — so a client that disconnects, cancels or runs out of time
aborts the request in the engine and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pagoda.cluster.api import errors
from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import GenerateChunk
from pagoda.engine.graph_request import GraphRequest, GraphRequestError
from pagoda.engine.input_processor import check_tenant
from pagoda.engine.multimodal.chat import split_images
from pagoda.engine.multimodal.image_io import image_bytes, image_header_size
from pagoda.engine.multimodal.processor import expand_placeholders
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.tokenizer import encode_chat

_ENGINE_IMAGE_FIELD = re.compile(r"multi_modal_data\.image\[(\d+)\]")  # how the engine names image k
_FIELD_PATH = re.compile(r"[a-z_]+(\[\d+\])*(\.[a-z_]+(\[\d+\])*)*")


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # what the replica receives: ONE image placeholder token per image
    text: str | None  # the text form when the client sent text
    images: tuple[bytes, ...] = ()  # encoded images (PNG, JPEG, WebP, ...), in prompt order
    image_fields: tuple[str, ...] = ()  # the request field each image came from, for error messages
    image_tokens: tuple[int, ...] = ()  # tokens each image's placeholder expands to in the engine

    @property
    def num_tokens(self) -> int:
        """Prompt tokens the engine runs: every image placeholder expanded."""
        return len(self.token_ids) - len(self.images) + sum(self.image_tokens)

    def expanded_token_ids(self, image_token_id: int | None) -> list[int]:
        """The token ids the engine runs: each placeholder repeated as many times as its image has tokens."""
        if not self.images:
            return list(self.token_ids)
        return expand_placeholders(self.token_ids, image_token_id, self.image_tokens)[0]


@dataclass(frozen=True)
class ModelInfo:
    name: str  # the served model name, reported when a request names none of the aliases
    aliases: tuple[str, ...]  # every name clients may use (name first)
    source: str  # the engine's `model` setting
    max_model_len: int
    vocab_size: int
    block_size: int
    tensor_parallel_size: int
    num_replicas: int
    has_chat_template: bool
    supports_images: bool  # a vision-language model: prompts may carry images


class Frontend:
    def __init__(self, client, tokenizer, app: AppConfig, api: ApiConfig, max_model_len: int,
                 mm_processor=None) -> None:
        self.client = client  # PagodaClient (or anything with its ``generate``)
        self.tokenizer = tokenizer
        self.api = api
        self.mm_processor = mm_processor  # the model's MultiModalProcessor; None for a text-only model
        self.mm_config = app.engine.multimodal
        aliases = api.served_model_name or (app.deployment.name,)
        self.info = ModelInfo(
            name=aliases[0],
            aliases=aliases,
            source=app.engine.model.model,
            max_model_len=max_model_len,
            vocab_size=len(tokenizer),
            block_size=app.engine.cache.block_size,
            tensor_parallel_size=app.engine.parallel.tensor_parallel_size,
            num_replicas=app.deployment.num_replicas,
            has_chat_template=getattr(tokenizer, "chat_template", None) is not None,
            supports_images=mm_processor is not None,
        )
        self._in_flight = 0
        # Admission: the cap, else what the replicas hold (running + their engines' queues) plus the queue here;
        # this process's share of it when several serve the same ports (api.num_servers).
        total = (api.max_concurrent_requests if api.max_concurrent_requests is not None
                 else app.max_replicas * app.max_ongoing_requests + api.max_queued_requests)
        self.max_in_flight = -(-total // api.num_servers)

    # ---- checks ---------------------------------------------------------------------------------

    def check_key(self, authorization: str | None) -> None:
        """``authorization`` is the header / metadata value, ``Bearer <key>``."""
        if self.api.api_key is None:
            return
        expected = f"Bearer {self.api.api_key}".encode()
        if authorization is None or not hmac.compare_digest(authorization.strip().encode(), expected):
            raise errors.unauthenticated()

    def check_model(self, model: str | None) -> None:
        """Empty means the default model."""
        if model and model not in (*self.info.aliases, self.info.source):
            served = ", ".join(self.info.aliases)
            raise errors.not_found(f"model {errors.quoted(model)} is not served here (served: {served})")

    def response_model(self, model: str | None) -> str:
        """The name a response reports: the alias the request used, else the first served name."""
        return model if model in self.info.aliases else self.info.name

    # ---- requests -------------------------------------------------------------------------------

    async def prompt(self, text: str | None = None, token_ids: Sequence[int] | None = None,
                     messages: list[dict] | None = None, images: Sequence[tuple[str, bytes]] = (),
                     graph: GraphRequest | None = None) -> Prompt:
        """Exactly one of the three forms, as token ids; ValueErrors become INVALID_ARGUMENT.

        ``messages``: OpenAI chat messages, whose content may be a list of text and image parts.
        ``images``: (request field, encoded image) pairs for the text and token-id forms, whose prompt
        holds one image placeholder token per image. ``graph``: the request's checked graph, written
        before the first user message's content (chat messages only; see ``engine/graph_request.py``)."""
        given = [name for name, v in (("prompt", text), ("token_ids", token_ids), ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise errors.invalid(f"give exactly one prompt form (text, token ids or messages), got {given or 'none'}",
                                 "prompt")
        if graph is not None and messages is None:
            raise errors.invalid("graph: only chat messages take a graph (it goes before the first user message); "
                                 "a text or token-id prompt is sent as is", "graph")
        try:
            if messages is not None:
                if images:
                    raise errors.invalid("images: a chat's images go inside its messages, as image parts", "images")
                try:
                    messages, images = split_images(messages, text_only=self.mm_processor is None)
                    messages = graph.into(messages) if graph is not None else messages
                except GraphRequestError as exc:
                    raise errors.invalid(str(exc), exc.field) from None
                except ValueError as exc:  # names the part: messages[1].content[0].image_url.detail
                    raise errors.invalid(str(exc), _leading_field(str(exc))) from None
                self._check_image_count(images)
                return await self._with_images(Prompt(encode_chat(self.tokenizer, messages), None), images)
            self._check_image_count(images)
            if token_ids is not None:
                ids = list(token_ids)
                bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.info.vocab_size), None)
                if bad is not None:
                    raise errors.invalid(
                        f"prompt token ids must be in [0, {self.info.vocab_size}), got {errors.quoted(bad)}", "prompt")
                return await self._with_images(Prompt(ids, None), images)
            if not isinstance(text, str):
                raise errors.invalid(f"prompt must be a string, got {type(text).__name__}", "prompt")
            return await self._with_images(Prompt(list(self.tokenizer(text).input_ids), text), images)
        except ValueError as exc:
            raise errors.invalid(str(exc)) from None

    def _check_image_count(self, images: Sequence[tuple[str, object]]) -> None:
        """The model takes images, and no more than ``limit_images_per_prompt`` (before any is loaded)."""
        if not images:
            return
        field = images[0][0]
        if self.mm_processor is None:
            raise errors.invalid(f"{field}: this model does not take images (a text-only model); send text only",
                                 field)
        limit = self.mm_config.limit_images_per_prompt
        if len(images) > limit:
            field = images[limit][0]
            raise errors.invalid(
                f"{field}: the prompt has {len(images)} images, more than limit_images_per_prompt ({limit})", field)

    async def _with_images(self, prompt: Prompt, images: Sequence[tuple[str, object]]) -> Prompt:
        """``prompt`` with its images loaded and measured (in parallel, on worker threads), and its
        placeholders checked: exactly one per image, so a literal ``<|image|>`` typed as text fails here."""
        if self.mm_processor is None:
            return prompt
        image_token = self.mm_processor.image_token_id
        placeholders = sum(1 for t in prompt.token_ids if t == image_token)
        if placeholders != len(images):
            where = images[0][0] if images else "prompt"
            raise errors.invalid(
                f"{where}: the prompt has {placeholders} image placeholder token(s) (id {image_token}) but "
                f"{len(images)} image(s); each image needs exactly one placeholder, and text may not contain one",
                where)
        if not images:
            return prompt
        loaded = await asyncio.gather(*(asyncio.to_thread(self._load, f, s) for f, s in images), return_exceptions=True)
        failed = next((x for x in loaded if isinstance(x, BaseException)), None)
        if failed is not None:
            raise failed
        return dataclasses.replace(prompt, images=tuple(data for data, _ in loaded),
                                   image_fields=tuple(f for f, _ in images),
                                   image_tokens=tuple(n for _, n in loaded))

    def _load(self, field: str, source: object) -> tuple[bytes, int]:
        """(encoded bytes, expanded tokens) of one image, without decoding its pixels (a worker thread)."""
        try:
            data = image_bytes(source, self.mm_config, field)  # data URL decoded, URL fetched, size checked
            width, height = image_header_size(data, field)
            limit = self.mm_config.max_input_image_pixels
            if width * height > limit:
                raise ValueError(f"{field}: image is {width}x{height} = {width * height} pixels, "
                                 f"more than max_input_image_pixels ({limit})")
            try:
                return data, self.mm_processor.num_image_tokens(width, height)
            except ValueError as exc:  # e.g. an aspect ratio the model's resize refuses
                raise ValueError(f"{field} ({width}x{height}): {exc}") from None
        except ValueError as exc:
            raise errors.invalid(str(exc), field) from None

    def sampling_params(self, **kwargs) -> SamplingParams:
        """SamplingParams from the fields the client set (None means the default)."""
        try:
            return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
        except (ValueError, TypeError) as exc:
            raise errors.invalid(str(exc)) from None

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, timeout_s: float | None = None, *,
                       tenant: str | None = None) -> AsyncIterator[GenerateChunk]:
        """Delta chunks until the request finishes; raises ApiError. ``timeout_s`` is the client's
        deadline: when it passes, the request is aborted in the engine and DEADLINE_EXCEEDED raised.
        ``tenant``: whose share of the engine it spends (None: the default tenant)."""
        self._check_fits(prompt, params)
        check_request_tenant(tenant)
        with self._slot():
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            rid = request_id or uuid.uuid4().hex
            extra = {"images": prompt.images} if prompt.images else {}
            stream = self.client.generate(prompt.token_ids, params, rid, priority, tenant=tenant, **extra)
            async with contextlib.aclosing(stream):  # closing it cancels the Serve stream: the engine aborts
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except (asyncio.CancelledError, GeneratorExit):
                        raise
                    except BaseException as exc:
                        raise _named_images(errors.to_api_error(exc, rid), prompt) from exc
                    yield chunk

    def _check_fits(self, prompt: Prompt, params: SamplingParams) -> None:
        """The engine checks this too; checking here spares a round trip and names the field."""
        length = prompt.num_tokens
        if not prompt.token_ids:
            raise errors.invalid("prompt must not be empty", "prompt")
        if length + params.max_tokens > self.info.max_model_len:
            images = f", of which {sum(prompt.image_tokens)} for {len(prompt.images)} image(s)" if prompt.images else ""
            raise errors.invalid(
                f"prompt length ({length}{images}) + max_tokens ({params.max_tokens}) must be <= "
                f"max_model_len ({self.info.max_model_len})", "max_tokens" if length < self.info.max_model_len else "prompt")

    def at_capacity(self) -> bool:
        """No place is free for another request (``check_capacity`` would refuse it)."""
        return self._in_flight >= self.max_in_flight

    def check_capacity(self) -> None:
        """Refuse at once when no place is free: before the body is parsed or the prompt tokenized, so a
        burst's refusals cost next to nothing (``generate`` takes the place itself)."""
        if self.at_capacity():
            cap = self.api.max_concurrent_requests
            why = (f"max_concurrent_requests={cap}" if cap is not None else
                   "every replica's queue is full and so is the API's (api.max_queued_requests="
                   f"{self.api.max_queued_requests})")
            if self.api.num_servers > 1:
                why += f"; this is one of {self.api.num_servers} API processes, each admits its share"
            raise errors.exhausted(f"too many requests in flight ({self._in_flight}: {why}); retry later")

    @contextlib.contextmanager
    def _slot(self):
        self.check_capacity()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1


def build_frontend(client, app: AppConfig, api: ApiConfig, tokenizer=None) -> Frontend:
    """A Frontend over ``client`` with the model's tokenizer, resolved context length and image processor."""
    from pagoda.engine.config import resolve_max_model_len
    from pagoda.engine.loader import open_model
    from pagoda.engine.multimodal.processor import make_mm_processor

    model, tokenizer = open_model(app.engine.model, tokenizer)
    max_len = resolve_max_model_len(app.engine.model, model.hf_config)  # what the engine replicas enforce
    mm = make_mm_processor(model.path, model.hf_config, app.engine.multimodal)  # the replicas' own settings
    return Frontend(client, tokenizer, app, api, max_len, mm)


def check_request_tenant(tenant: str | None) -> None:
    """The engine's rule for tenant names (``check_tenant``), as a 400 / INVALID_ARGUMENT naming ``tenant``."""
    try:
        check_tenant(tenant)
    except ValueError as exc:
        raise errors.invalid(str(exc), "tenant") from None


def _leading_field(message: str) -> str | None:
    """The field path a message starts with: 'messages[1].content[0].type 'x' is not ...' -> 'messages[1].content[0].type'."""
    match = _FIELD_PATH.match(message)
    return match.group(0) if match else None


def _named_images(exc: errors.ApiError, prompt: Prompt) -> errors.ApiError:
    """An engine error about ``multi_modal_data.image[k]`` renamed to the request field image k came from."""
    match = _ENGINE_IMAGE_FIELD.search(exc.message)
    if match is None or int(match.group(1)) >= len(prompt.image_fields):
        return exc
    field = prompt.image_fields[int(match.group(1))]
    return dataclasses.replace(exc, message=_ENGINE_IMAGE_FIELD.sub(field, exc.message, count=1), param=field)
