"""What a caller sends a replica and what streams back, through a Serve ``DeploymentHandle``.

A request carries its prompt as token ids, tokenized once by the caller (the ingress or
``PagodaClient``), for two reasons:

- the router hashes the prompt's full KV blocks with the engine's own ``hash_full_blocks`` to find
  the replica that already caches the prefix, and the router runs inside every handle owner
  (ingress proxies, other deployments) on a busy event loop: it should not load a tokenizer, apply
  a chat template, or spend milliseconds tokenizing on the routing path;
- the replica then serves exactly those ids, so the keys the router computed are the keys the
  engine caches (a second tokenization could differ: chat templates, special tokens).

Responses stream as ``GenerateChunk``s holding *delta* ``RequestOutput``s (only the new text and
tokens), so a long answer costs O(length) bytes on the wire, not O(length²). The prompt's token ids
go back once, in the first chunk; every chunk says how long the prompt was (``num_prompt_tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.errors import EngineDeadError
from pagoda.engine.request import RequestOutput
from pagoda.engine.sampling_params import SamplingParams

GENERATE_METHOD = "generate"  # the replica method the router scores by prefix and load
# How a generate request and its stream travel between a caller and a replica (PagodaClient, api.replica_transport):
# "grpc", Serve's inter-deployment gRPC; "ray", a Ray actor task (Serve's default).
TRANSPORTS = ("grpc", "ray")


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str  # unique per request; the replica aborts it by this id
    prompt_token_ids: list[int]  # the prompt, tokenized by the caller (see the module docstring)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower runs first (vLLM convention); < 0 is also routed by time to first token only
    prompt: str | None = None  # the prompt text, echoed back in outputs when given
    # Encoded images (PNG, JPEG, WebP bytes), in prompt order; prompt_token_ids hold ONE image placeholder
    # token per image, which the replica's engine expands to the image's tokens (the ids the router hashes
    # stay short, and a placeholder block never matches an engine block keyed by image content).
    images: tuple[bytes, ...] = ()
    # Whose share of the engine it spends (the "fair" scheduling policy); None: the default tenant. Checked by
    # the engine's ``check_tenant`` (the API front ends check it first, to name the field).
    tenant: str | None = None


@dataclass(frozen=True)
class GenerateChunk:
    output: RequestOutput  # what is new since the previous chunk (OutputKind.DELTA); prompt ids in the first only
    replica: str  # the serving replica's full Serve id (also its Ray actor name)
    num_prompt_tokens: int  # the prompt's length as the engine ran it (image placeholders expanded)


class ReplicaUnavailableError(EngineDeadError):
    """The replica serving a request died or its engine failed (gRPC UNAVAILABLE / HTTP 503).

    ``tokens_sent`` says whether the caller already got output: a request is retried on another
    replica only before its first token (an answer is never stitched from two replicas).
    """

    def __init__(self, message: str, tokens_sent: bool) -> None:
        super().__init__(message)
        self.tokens_sent = tokens_sent
