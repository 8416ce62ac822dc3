"""``ApiConfig``: where the gRPC and OpenAI HTTP front doors listen and what they let through."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pagoda.cluster.protocol import TRANSPORTS

EVENT_LOOPS = ("auto", "uvloop", "asyncio")


@dataclass(frozen=True)
class ApiConfig:
    host: str = "127.0.0.1"  # interface both servers bind
    http_port: int | None = 8000  # OpenAI-compatible HTTP; 0 picks a free port, None turns it off
    grpc_port: int | None = 50051  # pagoda.v1 gRPC; 0 picks a free port, None turns it off
    # The `model` names clients may use, like vLLM's --served-model-name: one name or several (a str, or
    # a list in YAML, kept as a tuple); responses echo the name a request used, else the first.
    # None: the application's name.
    served_model_name: str | tuple[str, ...] | None = None
    api_key: str | None = None  # when set: `Authorization: Bearer <key>` (HTTP header, gRPC metadata)
    # Generations in flight in this server process; beyond: 429 / RESOURCE_EXHAUSTED with Retry-After, at
    # once. None: follow the deployment's capacity — every replica's max_ongoing_requests (what its engine
    # runs and queues) plus max_queued_requests waiting here for a replica to have room.
    max_concurrent_requests: int | None = None
    # Requests held in this process (FIFO, for whichever replica frees first) while every replica is full.
    # Counted here, not by Serve's max_queued_requests: Serve counts a burst's not-yet-assigned requests as
    # queued and refused 16 of 24 while the replicas had 8 free places (measured, Ray 2.60).
    max_queued_requests: int = 1024
    # Largest request body / gRPC message. Images ride inside: a 1080x2400 phone screenshot is 1-3 MB as
    # PNG, 1.33x that as a base64 data URL, and Open-AutoGLM sends one per step with the history. 32 MiB
    # lets one image at MultiModalConfig.max_image_bytes (20 MiB) through as a data URL (27 MiB).
    max_message_bytes: int = 32 * 1024 * 1024
    # Processes serving both APIs on the same ports (SO_REUSEPORT: the kernel spreads connections over them),
    # like vLLM's --api-server-count. One Python process tops out near a few thousand small requests or
    # stream events a second; a burst's refusals and a large batch's token streams then queue behind each
    # other. Each process admits its share (1/num_servers) of the capacity above. The first runs where the
    # handle is (`pagoda serve`'s process, an ingress replica); the others are Ray actors (replicas) on the
    # same node.
    num_servers: int = 1
    # The loop both servers (and the Serve handle's calls) run on: "asyncio" (the standard library's),
    # "uvloop" (libuv: uvicorn's fast configuration), or "auto": uvloop where it is installed.
    event_loop: str = "asyncio"
    # How generate requests and their streams travel to the engine replicas: "grpc" (Serve's inter-deployment
    # gRPC, one HTTP/2 stream a request) or "ray" (a Ray actor task whose items the replica reports one by
    # one, Serve's default). gRPC took 1.5-2 ms off a lone request's first token on CPU (README "Served path").
    replica_transport: str = "grpc"
    tls_cert_file: str | None = None  # gRPC TLS: the server's PEM certificate chain
    tls_key_file: str | None = None  # gRPC TLS: its PEM private key
    tls_client_ca_file: str | None = None  # gRPC mTLS: clients must present a certificate signed by this CA

    @classmethod
    def from_dict(cls, data: dict | None) -> ApiConfig:
        """From a YAML ``api:`` section; ValueError names the field (``api.http_port: unknown field``)."""
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ValueError(f"api must be a mapping, got {type(data).__name__}")  # noqa: TRY004 — a config error
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"api.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            message = str(exc)  # messages start with the field they are about
            raise ValueError(f"api.{message}" if message.split(" ", 1)[0] in known else f"api: {message}") from None

    def __post_init__(self) -> None:
        names = self.served_model_name
        if names is not None:
            names = (names,) if isinstance(names, str) else tuple(names)
            if not names or not all(isinstance(n, str) and n.strip() for n in names):
                raise ValueError(
                    f"served_model_name must be a non-empty name or list of names, got {self.served_model_name!r}"
                )
            if len(set(names)) != len(names):
                raise ValueError(f"served_model_name has a name twice: {list(names)}")
            object.__setattr__(self, "served_model_name", names)
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535] or None, got {port}")
        if self.max_concurrent_requests is not None and self.max_concurrent_requests < 1:
            raise ValueError(f"max_concurrent_requests must be >= 1, got {self.max_concurrent_requests}")
        if self.max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {self.max_queued_requests}")
        if not 1 <= self.num_servers <= 256:
            raise ValueError(f"num_servers must be in [1, 256], got {self.num_servers}")
        if self.event_loop not in EVENT_LOOPS:
            raise ValueError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}, got {self.event_loop!r}")
        if self.replica_transport not in TRANSPORTS:
            raise ValueError(f"replica_transport must be one of {', '.join(TRANSPORTS)}, "
                             f"got {self.replica_transport!r}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be given together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file")
