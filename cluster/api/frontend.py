"""``Frontend``: what the gRPC service and the OpenAI HTTP API share, in front of ``PagodaClient``.

Both protocols reduce a request to the same steps — check the key and the model, turn the prompt
(text, token ids or chat messages) into token ids with the model's tokenizer, build
``SamplingParams``, take a concurrency slot, and stream ``GenerateChunk``s under a deadline. Every
failure leaves as an ``ApiError`` (``pagoda.cluster.api.errors``), which each protocol renders its way.

Cancellation: the stream is consumed through ``PagodaClient.generate``, which cancels the Serve
stream when its consumer stops — so a client that disconnects, cancels or runs out of time
aborts the request in the engine and its KV blocks return to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from pagoda.cluster.api import errors
from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import GenerateChunk
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.tokenizer import encode_chat


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]  # what the engine runs
    text: str | None  # the text form when the client sent text


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


class Frontend:
    def __init__(self, client, tokenizer, app: AppConfig, api: ApiConfig, max_model_len: int) -> None:
        self.client = client  # PagodaClient (or anything with its ``generate``)
        self.tokenizer = tokenizer
        self.api = api
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
        )
        self._in_flight = 0

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
            raise errors.not_found(f"model {model!r} is not served here (served: {', '.join(self.info.aliases)})")

    def response_model(self, model: str | None) -> str:
        """The name a response reports: the alias the request used, else the first served name."""
        return model if model in self.info.aliases else self.info.name

    # ---- requests -------------------------------------------------------------------------------

    def prompt(self, text: str | None = None, token_ids: Sequence[int] | None = None,
               messages: list[dict] | None = None) -> Prompt:
        """Exactly one of the three forms, as token ids; ValueErrors become INVALID_ARGUMENT."""
        given = [name for name, v in (("prompt", text), ("token_ids", token_ids), ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise errors.invalid(f"give exactly one prompt form (text, token ids or messages), got {given or 'none'}",
                                 "prompt")
        try:
            if messages is not None:
                return Prompt(encode_chat(self.tokenizer, messages), None)
            if token_ids is not None:
                ids = list(token_ids)
                bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < self.info.vocab_size), None)
                if bad is not None:
                    raise errors.invalid(f"prompt token ids must be in [0, {self.info.vocab_size}), got {bad!r}", "prompt")
                return Prompt(ids, None)
            if not isinstance(text, str):
                raise errors.invalid(f"prompt must be a string, got {type(text).__name__}", "prompt")
            return Prompt(list(self.tokenizer(text).input_ids), text)
        except ValueError as exc:
            raise errors.invalid(str(exc)) from None

    def sampling_params(self, **kwargs) -> SamplingParams:
        """SamplingParams from the fields the client set (None means the default)."""
        try:
            return SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
        except (ValueError, TypeError) as exc:
            raise errors.invalid(str(exc)) from None

    async def generate(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
                       priority: int = 0, timeout_s: float | None = None) -> AsyncIterator[GenerateChunk]:
        """Delta chunks until the request finishes; raises ApiError. ``timeout_s`` is the client's
        deadline: when it passes, the request is aborted in the engine and DEADLINE_EXCEEDED raised."""
        self._check_fits(prompt, params)
        with self._slot():
            loop = asyncio.get_running_loop()
            deadline = None if timeout_s is None else loop.time() + timeout_s
            rid = request_id or uuid.uuid4().hex
            stream = self.client.generate(prompt.token_ids, params, rid, priority)
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
                        raise errors.to_api_error(exc) from exc
                    yield chunk

    def _check_fits(self, prompt: Prompt, params: SamplingParams) -> None:
        """The engine checks this too; checking here spares a round trip and names the field."""
        total = len(prompt.token_ids) + params.max_tokens
        if not prompt.token_ids:
            raise errors.invalid("prompt must not be empty", "prompt")
        if total > self.info.max_model_len:
            raise errors.invalid(
                f"prompt length ({len(prompt.token_ids)}) + max_tokens ({params.max_tokens}) must be <= "
                f"max_model_len ({self.info.max_model_len})", "max_tokens" if len(prompt.token_ids) < self.info.max_model_len else "prompt")

    @contextlib.contextmanager
    def _slot(self):
        if self._in_flight >= self.api.max_concurrent_requests:
            raise errors.exhausted(
                f"too many requests in flight (max_concurrent_requests={self.api.max_concurrent_requests}); retry later")
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1


def build_frontend(client, app: AppConfig, api: ApiConfig, tokenizer=None) -> Frontend:
    """A Frontend over ``client`` with the model's tokenizer and resolved context length."""
    from pagoda.engine.config import resolve_max_model_len
    from pagoda.engine.loader import open_model

    model, tokenizer = open_model(app.engine.model, tokenizer)
    max_len = resolve_max_model_len(app.engine.model, model.hf_config)  # what the engine replicas enforce
    return Frontend(client, tokenizer, app, api, max_len)
