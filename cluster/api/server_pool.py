"""More API processes on the same ports (``ApiConfig.num_servers`` > 1), like vLLM's ``--api-server-count``.

One Python process parses, admits and streams every request of its servers; past a few thousand
small requests or stream events a second that loop is the ceiling, and a burst's refusals wait
behind each other. So ``num_servers - 1`` more processes run the same ``ApiServers`` over the same
Serve handle: Ray actors pinned to the node of the first, binding its ports with SO_REUSEPORT, so
the kernel spreads incoming connections over all of them (a gRPC channel is one connection: its
calls stay with one process). Each admits its share of the capacity (``Frontend.max_in_flight``).

    first = ApiServers.start(handle, config, api)
    more = start_more_servers(handle, config, first)    # [] when api.num_servers == 1
    ...
    stop_servers(more)
"""

from __future__ import annotations

import dataclasses

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.config import AppConfig

START_TIMEOUT_S = 120.0  # each process loads the tokenizer (and the image processor) before it listens


class ApiServerProcess:
    """One more process of the API servers (a Ray actor): its own Frontend and PagodaClient over the handle."""

    def __init__(self, handle, config: dict, api: dict) -> None:
        self.servers = ApiServers.start(handle, AppConfig.from_dict(config), ApiConfig(**api))

    def ports(self) -> tuple[int | None, int | None]:
        return self.servers.http_port, self.servers.grpc_port

    def stop(self) -> None:
        self.servers.stop()


def start_more_servers(handle, config: AppConfig, first: ApiServers) -> list:
    """The other ``first.api.num_servers - 1`` processes, on this node and ``first``'s resolved ports; returns
    once every one listens (raises, having stopped those that started, if one cannot)."""
    more = first.api.num_servers - 1
    if more == 0:
        return []
    api = dataclasses.replace(first.api, http_port=first.http_port, grpc_port=first.grpc_port)
    actor = ray.remote(num_cpus=0, max_restarts=0)(ApiServerProcess).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False))
    actors = [actor.remote(handle, config.to_dict(), dataclasses.asdict(api)) for _ in range(more)]
    try:
        ports = ray.get([a.ports.remote() for a in actors], timeout=START_TIMEOUT_S)
    except BaseException:
        stop_servers(actors)
        raise
    want = (api.http_port, api.grpc_port)
    if any(p != want for p in ports):  # cannot happen with SO_REUSEPORT; a wrong port would serve nobody
        stop_servers(actors)
        raise RuntimeError(f"API processes listen on {ports}, not on {want}")
    return actors


def stop_servers(actors: list, grace_s: float = 1.0) -> None:
    """Stop the processes' servers (in-flight streams get ``grace_s``), then the actors."""
    try:
        ray.get([a.stop.remote() for a in actors], timeout=grace_s + 15)
    except Exception:  # noqa: BLE001 — a process that died or hangs is killed below all the same
        pass
    for a in actors:
        ray.kill(a)
