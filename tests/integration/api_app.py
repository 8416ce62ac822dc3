"""A local Ray cluster + the Serve application (one CPU replica of the embedded model) + the API
servers on loopback — for the test modules that serve through the API (one per module, or one per package of
modules that share it: api/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.app import deploy
from pagoda.cluster.config import AppConfig


def app_config(model: str) -> AppConfig:
    return AppConfig.from_dict({
        "engine": {"model": model, "dtype": "float32", "device": "cpu", "max_model_len": 512,
                   "cpu_kv_cache_gib": 0.05, "max_num_seqs": 16, "max_num_batched_tokens": 512},
        "deployment": {"name": "apitest", "num_replicas": 1, "health_check_period_s": 2,
                       "graceful_shutdown_timeout_s": 1},
        "router": {"stats_period_s": 0.5},
    })


@contextlib.contextmanager
def running_app(model: str, api: ApiConfig | None = None):
    """Yields (AppConfig, DeploymentHandle, ApiServers); everything is torn down afterwards."""
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    servers = None
    try:
        serve.start(proxy_location="Disabled")
        app = app_config(model)
        handle = deploy(app)
        servers = ApiServers.start(handle, app, api or ApiConfig(http_port=0, grpc_port=0))
        yield app, handle, servers
    finally:
        if servers is not None:
            servers.stop()
        serve.shutdown()
        ray.shutdown()


def wait_engine_idle(handle, timeout_s: float = 1.0) -> tuple[float, dict]:
    """Polls the replica until nothing runs or waits and no KV block is used; (seconds taken, last stats).
    Raises AssertionError with the stats when ``timeout_s`` passes first."""
    start = time.monotonic()
    while True:
        stats = handle.stats.remote().result()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_cache_usage"] == 0:
            return time.monotonic() - start, stats
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"engine still busy {timeout_s}s after the client left: {stats}")
        time.sleep(0.02)


def wait_engine_busy(handle, timeout_s: float = 30.0) -> dict:
    """Until the replica runs a request (the client's stream reached the engine)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = handle.stats.remote().result()
        if stats["num_running"] > 0:
            return stats
        time.sleep(0.02)
    raise AssertionError("no request started running")


def run(coro):
    return asyncio.run(coro)


def more_servers(servers: ApiServers, app: AppConfig, api: ApiConfig) -> ApiServers:
    """Another pair of servers, with their own limits (``api``, and ``app``'s image limits), over the same
    replica, tokenizer and image processor."""
    from pagoda.cluster.api.frontend import Frontend

    f = servers.frontend
    frontend = Frontend(f.client, f.tokenizer, app, api, f.info.max_model_len, f.mm_processor)
    return ApiServers.from_frontend(frontend, api)
