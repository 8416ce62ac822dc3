"""``PagodaClient``: stream completions from the engine replicas through a Serve handle.

    client = PagodaClient(serve.get_app_handle("pagoda"), tokenizer)
    async for chunk in client.generate("The capital of France is", SamplingParams(max_tokens=16)):
        print(chunk.output.outputs[0].text, end="")

What it adds to ``handle.options(stream=True).generate.remote(...)``:

- tokenizes the prompt (locally when given a tokenizer, else on a replica), so the request carries
  token ids for the prefix-aware router (see ``pagoda.cluster.protocol``);
- sends over Serve's gRPC transport to the replica by default (``transport="grpc"``), not as a Ray actor
  task: every streamed chunk then arrives as a message on one HTTP/2 stream instead of an object the
  replica reports to the caller's core worker (``transport="ray"``, Serve's default). On 2 CPU cores
  the two hops of a lone request took 5.1 ms as a Ray task and 3.0 ms over gRPC in a bare Serve
  deployment, and pagoda's first token came 1.5-2 ms sooner (``bench/results/serving_cpu_transport.*``).
  A request with images goes as a Ray task (the replica's gRPC server takes messages up to 4 MiB), and
  any other that the replica refuses as too large is re-sent that way;
- cancels the Serve stream as soon as its consumer stops (``break``, task cancellation, an
  exception), which aborts the request in the engine — a Serve stream that is merely dropped keeps
  generating on the replica;
- turns a replica that dies mid-request into ``ReplicaUnavailableError`` instead of a raw Ray
  error, and retries on another replica only if no token was sent yet.

Retries are counted (``PagodaClient.retries``) and each is logged as a WARNING starting with
``RETRY_LOG`` on the ``pagoda.client`` logger: the client lives wherever the API servers run (an
ingress Serve replica on KubeRay), so its log is how an operator, or ``bench.chaos`` reading the Ray
session's logs, sees them from outside — the counter alone dies with an ingress replica.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from pagoda.cluster.protocol import TRANSPORTS, GenerateChunk, GenerateRequest, ReplicaUnavailableError
from pagoda.engine.sampling_params import SamplingParams

_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
RETRY_LOG = "pagoda retry:"  # every retry's log line starts with it (bench/chaos.py counts them)

logger = logging.getLogger("pagoda.client")


@dataclass(frozen=True)
class Completion:
    """A finished single completion, assembled from its chunks."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None
    replica: str  # who served it
    num_cached_tokens: int  # prompt tokens served from the replica's prefix cache
    ttft_s: float  # seconds from the call to the first output token
    latency_s: float  # seconds from the call to the last chunk


class PagodaClient:
    def __init__(self, handle, tokenizer=None, max_retries: int = 2, transport: str = "grpc") -> None:
        """``transport``: ``"grpc"`` (Serve's inter-deployment gRPC) or ``"ray"`` (a Ray actor task) for
        ``generate`` streams; other calls keep the handle's own."""
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
        self.handle = handle
        self.tokenizer = tokenizer
        self.max_retries = max_retries  # re-sends of a request whose replica died before its first token
        self.transport = transport
        self.retries = 0  # such re-sends so far, over all requests of this client

    async def token_ids(self, prompt: str | Sequence[int]) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if self.tokenizer is not None:
            return list(self.tokenizer(prompt).input_ids)
        return await self.handle.tokenize.remote(prompt)

    async def generate(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        images: Sequence[bytes] = (),
        tenant: str | None = None,
    ) -> AsyncIterator[GenerateChunk]:
        """Delta chunks until the request finishes. Raises what the engine raises (ValueError,
        QueueFullError) and ReplicaUnavailableError when the serving replica dies. ``images`` are encoded
        images for a vision-language model; the prompt holds one image placeholder token per image.
        ``priority``: lower runs first (< 0 also routes to the least-loaded replica); ``tenant``: whose share
        of the engine the request spends (``GenerateRequest.tenant``)."""
        request = GenerateRequest(
            request_id or uuid.uuid4().hex, await self.token_ids(prompt), params or SamplingParams(), priority,
            prompt if isinstance(prompt, str) else None, tuple(images), tenant=tenant,
        )
        # Images (megabytes each) go as a Ray task: the replica's gRPC server takes messages up to 4 MiB
        # (RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH); any other request over it is re-sent that way.
        by_reference = self.transport == "ray" or bool(request.images)
        attempt = 0
        while True:
            stream = self.handle.options(stream=True, _by_reference=by_reference).generate.remote(request)
            sent = finished = False
            try:
                async for chunk in stream:
                    sent = True
                    finished = chunk.output.finished
                    yield chunk
                return
            except _REPLICA_GONE as exc:
                if sent or attempt == self.max_retries:
                    raise ReplicaUnavailableError(
                        f"request {request.request_id!r}: the serving replica died "
                        f"({'after' if sent else 'before'} its first token; {attempt + 1} attempt(s)): "
                        f"{type(exc).__name__}", tokens_sent=sent,
                    ) from exc
                attempt += 1
                self.retries += 1
                logger.warning("%s request %r: its replica died before the first token (%s); re-sent to another "
                               "replica (attempt %d of %d)", RETRY_LOG, request.request_id, type(exc).__name__,
                               attempt + 1, self.max_retries + 1)
            except grpc.aio.AioRpcError as exc:
                if sent or by_reference or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                by_reference = True  # refused before the replica saw it: too large for the gRPC transport
            finally:
                if not finished:  # consumer left early or the request failed: abort it on the replica
                    with contextlib.suppress(Exception):  # a request that never reached one re-raises its error here
                        stream.cancel()

    async def complete(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, request_id: str | None = None,
        priority: int = 0, tenant: str | None = None,
    ) -> Completion:
        """Run one request (n=1) to the end and assemble its text and tokens."""
        start = time.perf_counter()
        first = None
        text, token_ids, finish_reason, replica, cached, rid = [], [], None, "", 0, request_id
        async for chunk in self.generate(prompt, params, request_id, priority, tenant=tenant):
            out = chunk.output
            completion = out.outputs[0]
            if first is None and completion.token_ids:
                first = time.perf_counter()
            text.append(completion.text)
            token_ids.extend(completion.token_ids)
            finish_reason = completion.finish_reason or finish_reason
            replica, cached, rid = chunk.replica, out.num_cached_tokens, out.request_id
        end = time.perf_counter()
        return Completion(rid or "", "".join(text), token_ids, finish_reason, replica, cached,
                          (first or end) - start, end - start)
