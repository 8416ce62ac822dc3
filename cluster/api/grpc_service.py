"""The ``pagoda.v1.Pagoda`` gRPC service (grpc.aio), with ``grpc.health.v1`` health and server reflection.

    server = await start_grpc_server(frontend, api_config)   # returns (grpc.aio.Server, bound port)

Status codes follow ``pagoda.cluster.api.errors``. A client deadline becomes the request's timeout (the
request is aborted in the engine when it passes); a client that cancels mid-stream cancels this
handler's task, which closes ``Frontend.generate`` and so aborts the request. The API key, when
set, is read from ``authorization: Bearer <key>`` metadata; health checks need no key.

Images: a chat turn carries them as ``ChatMessage.parts`` (encoded bytes), the text and token-id
forms as ``GenerateRequest.images`` with one placeholder token per image in the prompt; a bad one
is INVALID_ARGUMENT naming it (``messages[1].parts[0].image``, ``images[0]``).

``GenerateRequest.tenant``: empty is no tenant (proto3 has no unset string); a bad name is INVALID_ARGUMENT
naming ``tenant``, as over HTTP.

``SamplingParams.structured`` (JSON schema, JSON object, regex, EBNF, a named grammar, a choice) and
``graph`` / ``graph_encoding`` (chat prompts; ``Tokenize`` takes them too, so a client can see the tokens a
graph becomes) are read by ``grpc_request.py``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagoda.cluster.api import errors
from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.frontend import Frontend, Prompt
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb
from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2_grpc as pb_grpc
from pagoda.cluster.api.grpc_payload import DecodeErrorsAreInvalidArgument
from pagoda.cluster.api.grpc_request import graph_request, sampling_kwargs
from pagoda.engine.graph_request import GraphRequest

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Pagoda"].full_name  # "pagoda.v1.Pagoda"
_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT}
_CONTENT_PART = re.compile(r"(messages\[\d+\])\.content\[")  # the frontend's (OpenAI's) name for a ChatMessage part


class PagodaService(pb_grpc.PagodaServicer):
    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            self._admit(context, request.model)
            self.frontend.check_capacity()
            prompt = await self._prompt(request)
            params = self.frontend.sampling_params(**sampling_kwargs(request.sampling))
            stream = self.frontend.generate(prompt, params, request.request_id or None, request.priority,
                                            context.time_remaining(), tenant=request.tenant or None)
            sent, finished = 0, set()
            async for chunk in stream:
                out = chunk.output
                for c in out.outputs:
                    if c.index in finished or not (c.token_ids or c.text or c.finish_reason):
                        continue
                    sent += len(c.token_ids)
                    if c.finish_reason:
                        finished.add(c.index)
                    response = pb.GenerateResponse(
                        request_id=out.request_id, index=c.index, token_ids=c.token_ids, text=c.text,
                        logprobs=_logprobs(c), finish_reason=_FINISH.get(c.finish_reason, pb.FINISH_REASON_UNSPECIFIED))
                    if out.finished and len(finished) == len(out.outputs):
                        response.usage.CopyFrom(pb.Usage(prompt_tokens=chunk.num_prompt_tokens,
                                                         completion_tokens=sent, cached_tokens=out.num_cached_tokens))
                    yield response
        except Exception as exc:  # noqa: BLE001 — every failure leaves with its status (errors.py), never UNKNOWN
            await _abort(context, errors.to_api_error(exc))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            self._admit(context, request.model)
            which = request.WhichOneof("input")
            graph = graph_request(request.graph, request.graph_encoding)
            if which == "messages":
                prompt = await _chat_prompt(self.frontend, request.messages, graph)
            else:
                prompt = await self.frontend.prompt(text=request.text, graph=graph)
            mm = self.frontend.mm_processor
            ids = prompt.expanded_token_ids(mm.image_token_id if mm is not None else None)
            return pb.TokenizeResponse(token_ids=ids, count=len(ids), max_model_len=self.frontend.info.max_model_len)
        except Exception as exc:  # noqa: BLE001 — every failure leaves with its status (errors.py), never UNKNOWN
            await _abort(context, errors.to_api_error(exc))

    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            self._admit(context, request.model)
            i = self.frontend.info
            return pb.ModelInfoResponse(
                model=self.frontend.response_model(request.model), served_model_names=i.aliases, source=i.source,
                max_model_len=i.max_model_len, vocab_size=i.vocab_size, block_size=i.block_size,
                tensor_parallel_size=i.tensor_parallel_size, num_replicas=i.num_replicas,
                has_chat_template=i.has_chat_template, supports_images=i.supports_images)
        except Exception as exc:  # noqa: BLE001 — every failure leaves with its status (errors.py), never UNKNOWN
            await _abort(context, errors.to_api_error(exc))

    def _admit(self, context: grpc.aio.ServicerContext, model: str) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.frontend.check_key(metadata.get("authorization"))
        self.frontend.check_model(model)

    async def _prompt(self, request: pb.GenerateRequest) -> Prompt:
        which = request.WhichOneof("prompt")
        graph = graph_request(request.graph, request.graph_encoding)
        if which == "messages":
            if request.images:
                raise errors.invalid("images: a chat's images go inside its messages, as ChatMessage.parts", "images")
            return await _chat_prompt(self.frontend, request.messages, graph)
        images = [(f"images[{k}]", data) for k, data in enumerate(request.images)]
        if which == "token_ids":
            return await self.frontend.prompt(token_ids=list(request.token_ids.ids), images=images, graph=graph)
        return await self.frontend.prompt(text=request.text if which == "text" else None, images=images, graph=graph)


_MAX_PENDING_CALLS = 1 << 16


async def start_grpc_server(frontend: Frontend, api: ApiConfig) -> tuple[grpc.aio.Server, int]:
    """Serve pagoda.v1, health and reflection on ``api.host:api.grpc_port`` (TLS when configured)."""
    options = [("grpc.max_receive_message_length", api.max_message_bytes),
               ("grpc.max_send_message_length", api.max_message_bytes),
               ("grpc.so_reuseport", int(api.num_servers > 1)),  # else a taken port is an error, not a share
               # Calls that arrived but that the asyncio server has not picked up yet. gRPC core's defaults
               # (1,000 soft, 3,000 hard) cancel the excess of a burst: 3,000 streams at once on a bare
               # grpc.aio server (grpcio 1.85) lost 500-650 as CANCELLED. Admission is decided by
               # Frontend.check_capacity once a call is picked up, with a proper RESOURCE_EXHAUSTED.
               ("grpc.server.max_pending_requests", _MAX_PENDING_CALLS),
               ("grpc.server.max_pending_requests_hard_limit", _MAX_PENDING_CALLS)]
    server = grpc.aio.server(options=options, interceptors=[DecodeErrorsAreInvalidArgument()])
    pb_grpc.add_PagodaServicer_to_server(PagodaService(frontend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    address = f"{api.host}:{api.grpc_port or 0}"
    if api.tls_cert_file is not None:
        port = server.add_secure_port(address, _credentials(api))
    else:
        port = server.add_insecure_port(address)
    await server.start()
    server.health_servicer = health_servicer  # so the owner can report NOT_SERVING while draining
    return server, port


def _credentials(api: ApiConfig) -> grpc.ServerCredentials:
    key, cert = Path(api.tls_key_file).read_bytes(), Path(api.tls_cert_file).read_bytes()
    ca = Path(api.tls_client_ca_file).read_bytes() if api.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


async def _abort(context: grpc.aio.ServicerContext, exc: ApiError) -> None:
    if exc.retry_after_s is not None:
        context.set_trailing_metadata((("retry-after", str(exc.retry_after_s)),))
    await context.abort(exc.code, exc.message)


async def _chat_prompt(frontend: Frontend, m: pb.ChatMessages, graph: GraphRequest | None = None) -> Prompt:
    """The conversation's prompt; errors name parts as this protocol spells them (``messages[i].parts[j]``)."""
    try:
        prompt = await frontend.prompt(messages=_messages(m), graph=graph)
    except ApiError as exc:
        param = _parts(exc.param) if exc.param else exc.param
        raise dataclasses.replace(exc, message=_parts(exc.message), param=param) from None
    return dataclasses.replace(prompt, image_fields=tuple(_parts(f) for f in prompt.image_fields))


def _parts(text: str) -> str:
    return _CONTENT_PART.sub(r"\1.parts[", text)


def _messages(m: pb.ChatMessages) -> list[dict]:
    """OpenAI-shaped messages: ``content`` a string, or (``parts``) a list of text and image parts."""
    out = []
    for i, x in enumerate(m.messages):
        if not x.parts:
            out.append({"role": x.role, "content": x.content})
            continue
        if x.content:
            raise errors.invalid(f"messages[{i}]: give content or parts, not both", f"messages[{i}]")
        out.append({"role": x.role, "content": [_part(i, j, part) for j, part in enumerate(x.parts)]})
    return out


def _part(i: int, j: int, part: pb.ContentPart) -> dict:
    which = part.WhichOneof("part")
    if which == "text":
        return {"type": "text", "text": part.text}
    if which == "image":
        return {"type": "image", "image": part.image}  # encoded bytes, loaded like an image_url's payload
    raise errors.invalid(f"messages[{i}].parts[{j}] is empty: set text or image", f"messages[{i}].parts[{j}]")


def _logprobs(c) -> list[pb.TokenLogprob]:
    if c.logprobs is None:
        return []
    out = []
    for token_id, by_id in zip(c.token_ids, c.logprobs):
        s = by_id[token_id]
        top = sorted((lp_id, lp) for lp_id, lp in by_id.items() if lp.rank is not None)
        out.append(pb.TokenLogprob(
            token_id=token_id, logprob=s.logprob, token=s.decoded_token or "",
            top=[pb.TopLogprob(token_id=t, logprob=lp.logprob, token=lp.decoded_token or "", rank=lp.rank)
                 for t, lp in sorted(top, key=lambda x: x[1].rank)]))
    return out
