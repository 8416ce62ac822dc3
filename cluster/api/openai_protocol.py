"""OpenAI request bodies -> pagoda inputs, and pagoda outputs -> OpenAI response objects.

Pure functions over dicts (no web framework), so each shape is unit-testable. Field names follow
OpenAI's API (``max_tokens``/``max_completion_tokens``, ``stop``, ``n``, ``logprobs``, ``top_logprobs``,
``stream_options.include_usage``) plus vLLM's extensions (``top_k``, ``min_p``, ``repetition_penalty``,
``min_tokens``, ``ignore_eos``, ``stop_token_ids``, ``skip_special_tokens``, ``priority``). The plain sampling
fields and their names come from SamplingParams' field metadata (``engine/request_fields.py``);
``parse_request`` spells out the rest. pagoda adds ``tenant`` (a string: whose share of the engine the request
spends; ``Frontend.generate`` checks the name) and, on chat completions, ``graph`` and ``graph_encoding``
(``engine/graph_request.py``: the graph's text goes before the first user message's content).
``/v1/completions`` refuses a graph, naming the field: its prompt is the client's exact text (or token ids),
with no user message for the graph to go before.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from pagoda.cluster.api import errors
from pagoda.engine.graph_request import GraphRequest, GraphRequestError
from pagoda.engine.request import CompletionOutput
from pagoda.engine.request_fields import RequestField, plain_fields
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured import StructuredOutputError, from_openai


def _json_types(f: RequestField) -> tuple[type, ...]:
    """What JSON may carry a plain field: a list for a repeated one (items checked by SamplingParams), any
    number for a float, else the field's own type (never a bool for an int: ``_typed``)."""
    return (list,) if f.repeated else (int, float) if f.type is float else (f.type,)


# body field -> (SamplingParams field, accepted types); stop, logprobs and structured are parsed by hand below
_SAMPLING_FIELDS = {name: (f.name, _json_types(f)) for name, f in plain_fields(SamplingParams, "openai")}


_IMAGE_KEYS = ("images", "image", "image_url", "multi_modal_data")  # body fields a client may try for images
_IMAGES_GO = "send images to /v1/chat/completions as image_url content parts of a user message"


@dataclass
class ParsedRequest:
    chat: bool
    model: str | None
    prompt: dict  # keyword arguments of Frontend.prompt
    sampling: dict  # keyword arguments of SamplingParams
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    priority: int = 0  # lower runs first (vLLM's extension)
    tenant: str | None = None  # pagoda's extension: the fair-share policy's tenant; None is the default one
    top_logprobs: int = 0  # chat: alternatives per token (logprobs=True)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def parse_request(body, chat: bool) -> ParsedRequest:
    """A /v1/completions or /v1/chat/completions body; raises ApiError(400) naming the field."""
    if not isinstance(body, dict):
        raise errors.invalid("request body must be a JSON object", "body")
    model = _typed(body, "model", str)
    _no_unsupported(body)
    sampling = {}
    for name, (target, types) in _SAMPLING_FIELDS.items():
        value = _typed(body, name, types)
        if value is not None:
            sampling[target] = value
    if chat and body.get("max_completion_tokens") is not None:
        sampling["max_tokens"] = _typed(body, "max_completion_tokens", int)
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise errors.invalid("stop must be a string or a list of strings", "stop")
        sampling["stop"] = stop
    top = 0
    if chat:
        if _typed(body, "logprobs", bool):
            top = _typed(body, "top_logprobs", int) or 0
            sampling["logprobs"] = top
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise errors.invalid("messages must be a non-empty list", "messages")
        prompt = {"messages": messages}  # content: a string or text / image_url parts (Frontend.prompt)
        graph = _graph(body)
        if graph is not None:
            prompt["graph"] = graph
    else:
        logprobs = _typed(body, "logprobs", int)
        if logprobs is not None:
            sampling["logprobs"] = logprobs
        _no_images(body)
        _no_graph(body)
        prompt = _completion_prompt(body.get("prompt"))
    try:  # response_format (json_object, json_schema) or vLLM's structured_outputs (regex, grammar, ...)
        structured = from_openai(body)
    except StructuredOutputError as exc:
        raise errors.invalid(str(exc), exc.field) from None
    if structured is not None:
        sampling["structured"] = structured
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise errors.invalid("stream_options must be an object", "stream_options")
    return ParsedRequest(
        chat=chat, model=model, prompt=prompt, sampling=sampling,
        stream=bool(_typed(body, "stream", bool)), include_usage=bool(stream_options.get("include_usage")),
        priority=_typed(body, "priority", int) or 0, tenant=_typed(body, "tenant", str), top_logprobs=top,
    )


# OpenAI fields that change the answer and that pagoda does not implement, with the value that means
# "not used" (sent by some clients by default): anything else is a 400, never silently ignored.
_UNSUPPORTED = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {})}


def _no_unsupported(body: dict) -> None:
    for name, unused in _UNSUPPORTED.items():
        value = body.get(name)
        if not any(value == u and type(value) is type(u) for u in unused):
            raise errors.invalid(f"{name} is not supported by this server (got {errors.quoted(value)})", name)


def _no_images(body: dict) -> None:
    """/v1/completions is text-only (as in OpenAI's and vLLM's servers): anything image-like is a 400
    that says where images go, rather than being ignored."""
    for name in _IMAGE_KEYS:
        if body.get(name) is not None:
            raise errors.invalid(f"{name}: /v1/completions takes no images; {_IMAGES_GO}", name)
    prompt = body.get("prompt")
    items = prompt if isinstance(prompt, list) else [prompt]
    if any(isinstance(item, dict) or (isinstance(item, list) and any(isinstance(x, dict) for x in item))
           for item in items):
        raise errors.invalid(f"prompt must be a string or a list of token ids, not content parts; {_IMAGES_GO}",
                             "prompt")


def _graph(body: dict) -> GraphRequest | None:
    """Chat: ``graph`` and ``graph_encoding``, checked and rendered; a 400 names the element (``graph.edges[0].target``)."""
    try:
        return GraphRequest.from_fields(body.get("graph"), body.get("graph_encoding"))
    except GraphRequestError as exc:
        raise errors.invalid(str(exc), exc.field) from None


def _no_graph(body: dict) -> None:
    """/v1/completions: a graph is a 400, never ignored. Its prompt is the client's exact text or token ids,
    with no user message to put the graph before (``graph_request``'s rule), so the client writes the graph
    where it wants it (``pagoda.engine.graph_prompt.render``) or sends it to /v1/chat/completions."""
    for name in ("graph", "graph_encoding"):
        if body.get(name) is not None:
            raise errors.invalid(f"{name}: /v1/completions takes no graph (its prompt is your exact text); send "
                                 "the graph to /v1/chat/completions, where it goes before the first user message",
                                 name)


def _completion_prompt(prompt) -> dict:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return {"text": prompt}
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return {"token_ids": prompt}
    raise errors.invalid("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def _typed(body: dict, name: str, types):
    value = body.get(name)
    if value is None:
        return None
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types:
        value = None  # true is not an int here
    if value is None or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise errors.invalid(f"{name} must be {wanted}, got {errors.quoted(body[name])}", name)
    return value


# ---------------------------------------------------------------------------------------- responses


class Accumulator:
    """Collects the delta chunks of one request into n full choices (non-streaming responses)."""

    def __init__(self, n: int) -> None:
        self.text = [""] * n
        self.token_ids: list[list[int]] = [[] for _ in range(n)]
        self.logprobs: list[list] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def add(self, chunk) -> None:
        """One ``GenerateChunk`` (a delta)."""
        output = chunk.output
        self.prompt_tokens = chunk.num_prompt_tokens
        self.cached_tokens = output.num_cached_tokens
        for c in output.outputs:
            self.text[c.index] += c.text
            self.token_ids[c.index].extend(c.token_ids)
            self.logprobs[c.index].extend(_entries(c))
            self.finish[c.index] = c.finish_reason or self.finish[c.index]

    def usage(self) -> dict:
        return usage(self.prompt_tokens, sum(len(t) for t in self.token_ids), self.cached_tokens)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def response_id(chat: bool, request_id: str) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + request_id


def completion_response(req: ParsedRequest, model: str, acc: Accumulator) -> dict:
    return {
        "id": response_id(req.chat, req.request_id), "object": "chat.completion" if req.chat else "text_completion",
        "created": int(time.time()), "model": model,
        "choices": [_choice(req, i, acc.text[i], acc.logprobs[i], acc.finish[i], final=True) for i in range(len(acc.text))],
        "usage": acc.usage(),
    }


def stream_chunk(req: ParsedRequest, model: str, choices: list[dict], usage_: dict | None = None) -> dict:
    chunk = {"id": response_id(req.chat, req.request_id),
             "object": "chat.completion.chunk" if req.chat else "text_completion",
             "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def stream_choice(req: ParsedRequest, c: CompletionOutput, first: bool) -> dict:
    choice = _choice(req, c.index, c.text, _entries(c), c.finish_reason, final=False)
    if req.chat and first:
        choice["delta"]["role"] = "assistant"
    return choice


def _choice(req: ParsedRequest, index: int, text: str, entries: list, finish: str | None, final: bool) -> dict:
    wants = "logprobs" in req.sampling
    if req.chat:
        body = {"message" if final else "delta": {"role": "assistant", "content": text} if final else {"content": text}}
        logprobs = {"content": [_chat_logprob(e, req.top_logprobs) for e in entries]} if wants else None
    else:
        body = {"text": text}
        logprobs = _completion_logprobs(entries) if wants else None
    return {"index": index, **body, "logprobs": logprobs, "finish_reason": finish}


def _entries(c: CompletionOutput) -> list[tuple[int, dict]]:
    """(sampled token id, {token id: Logprob}) per token of this delta."""
    if c.logprobs is None:
        return []
    return list(zip(c.token_ids, c.logprobs))


def _chat_logprob(entry, top: int) -> dict:
    token_id, by_id = entry
    sampled = by_id[token_id]
    ranked = sorted((lp for lp in by_id.values() if lp.rank is not None), key=lambda lp: lp.rank)[:top]
    return {"token": sampled.decoded_token, "logprob": sampled.logprob,
            "bytes": list((sampled.decoded_token or "").encode()),
            "top_logprobs": [{"token": lp.decoded_token, "logprob": lp.logprob,
                              "bytes": list((lp.decoded_token or "").encode())} for lp in ranked]}


def _completion_logprobs(entries) -> dict:
    tokens, token_logprobs, top = [], [], []
    for token_id, by_id in entries:
        sampled = by_id[token_id]
        tokens.append(sampled.decoded_token)
        token_logprobs.append(sampled.logprob)
        top.append({lp.decoded_token: lp.logprob for lp in by_id.values()})
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": []}
