"""``ApiServers``: the gRPC service and the OpenAI HTTP API on one asyncio loop in a background thread.

    servers = ApiServers.start(handle, app_config, ApiConfig(http_port=8000, grpc_port=50051))
    servers.http_url, servers.grpc_target
    servers.stop()

Both run in the process that holds the Serve ``DeploymentHandle`` (``pagoda serve``, a test, a
benchmark); requests reach the replicas through ``PagodaClient`` and the KV-aware router.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import Future

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.frontend import Frontend, build_frontend
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig


def new_event_loop(kind: str) -> asyncio.AbstractEventLoop:
    """A loop of ``kind`` (``ApiConfig.event_loop``)."""
    if kind == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        if kind == "uvloop":
            raise ValueError("api.event_loop 'uvloop' needs the uvloop package (pip install uvloop)") from None
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ApiServers:
    def __init__(self, frontend: Frontend, api: ApiConfig) -> None:
        self.frontend = frontend
        self.api = api
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._loop = new_event_loop(api.event_loop)
        self._thread = threading.Thread(target=self._loop.run_forever, name="pagoda-api", daemon=True)
        self._uvicorn = None
        self._grpc = None

    @classmethod
    def start(cls, handle, app: AppConfig, api: ApiConfig | None = None, tokenizer=None) -> ApiServers:
        """Build the frontend over ``handle`` and start the servers; returns once both listen."""
        api = api or ApiConfig()
        frontend = build_frontend(PagodaClient(handle, tokenizer, transport=api.replica_transport), app, api, tokenizer)
        frontend.client.tokenizer = frontend.tokenizer  # tokenize locally, never on a replica
        return cls.from_frontend(frontend, api)

    @classmethod
    def from_frontend(cls, frontend: Frontend, api: ApiConfig) -> ApiServers:
        servers = cls(frontend, api)
        servers._thread.start()
        try:
            servers._call(servers._start()).result(timeout=60)
        except BaseException:
            servers.stop()
            raise
        return servers

    @property
    def http_url(self) -> str:
        return f"http://{self.api.host}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"{self.api.host}:{self.grpc_port}"

    def stop(self, grace_s: float = 1.0) -> None:
        if self._thread.is_alive():
            try:
                self._call(self._stop(grace_s)).result(timeout=grace_s + 10)
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)

    # ---- on the loop ----------------------------------------------------------------------------

    def _call(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _start(self) -> None:
        if self.api.grpc_port is not None:
            from pagoda.cluster.api.grpc_service import start_grpc_server

            self._grpc, self.grpc_port = await start_grpc_server(self.frontend, self.api)
        if self.api.http_port is not None:
            await self._start_http()

    async def _start_http(self) -> None:
        import uvicorn

        from pagoda.cluster.api.openai_http import create_app

        # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that name it, and accepted sockets
        # inherit it. Without it Nagle holds each SSE event until the client ACKs the one before, and
        # the client delays that ACK by up to 40 ms: +43 ms TTFT on every reused keep-alive connection.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.api.num_servers > 1:  # every API process binds the port; the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.api.host, self.api.http_port))
        self.http_port = sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.frontend), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1)
        self._uvicorn = uvicorn.Server(config)
        self._uvicorn_task = asyncio.ensure_future(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._uvicorn_task.done():
                self._uvicorn_task.result()  # raises why it could not start
            await asyncio.sleep(0.01)

    async def _stop(self, grace_s: float) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
            await asyncio.wait_for(self._uvicorn_task, timeout=grace_s + 5)
        if self._grpc is not None:
            await self._grpc.stop(grace_s)
