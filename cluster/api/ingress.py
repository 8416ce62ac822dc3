"""``ApiIngress``: the API servers as a Ray Serve deployment, for clusters (KubeRay) where no
``pagoda serve`` process holds the handle.

    import_path: pagoda.cluster.api.ingress:build_app
    args: { engine: {...}, deployment: {...}, router: {...}, autoscaling: {...},
            api: { host: 0.0.0.0, http_port: 8001, grpc_port: 50051 } }   # ApiConfig fields

The engine application is the same as ``pagoda.cluster.app:build_app``; in front of it one ingress
replica runs ``ApiServers`` over a handle to the engine deployment, so requests still go through
the KV-aware router and ``PagodaClient`` — what ``pagoda serve`` runs in its own process. The
replica is pinned to the Ray head node: its ports are fixed, and on Kubernetes the head pod's
service is the one that carries them (deploy/k8s). With ``api.num_servers`` > 1 there are that many
ingress replicas, all on the head node, sharing the ports (SO_REUSEPORT; ``server_pool.py``). As with ``pagoda serve``, a missing
``api.api_key`` falls back to ``$PAGODA_API_KEY`` (of the replica's process: the head pod's env).
"""

from __future__ import annotations

import dataclasses
import os

from ray import serve

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.server import ApiServers
from pagoda.cluster.app import application
from pagoda.cluster.config import AppConfig

INGRESS_SUFFIX = "-api"
API_KEY_ENV = "PAGODA_API_KEY"
# Ray gives every head node this resource (ray._common.constants.HEAD_NODE_RESOURCE_NAME); Serve pins
# its controller with the same 0.001 of it.
HEAD_NODE_RESOURCE = "node:__internal_head__"


class ApiIngress:
    def __init__(self, engine, config: dict, api: dict) -> None:
        api_config = ApiConfig(**api)
        if api_config.api_key is None:
            api_config = dataclasses.replace(api_config, api_key=os.environ.get(API_KEY_ENV) or None)
        self.servers = ApiServers.start(engine, AppConfig.from_dict(config), api_config)

    def endpoints(self) -> dict:
        """Where this replica listens (ports resolved when the config asked for 0)."""
        s = self.servers
        return {"http": s.http_url if s.http_port is not None else None,
                "grpc": s.grpc_target if s.grpc_port is not None else None}

    def check_health(self) -> None:
        if not self.servers._thread.is_alive():
            raise RuntimeError("the API servers' thread has stopped")

    def __del__(self) -> None:
        servers = getattr(self, "servers", None)
        if servers is not None:
            servers.stop()


def build_app(args: dict | None = None):
    """Serve builder: the engine application behind the API ingress (``api`` holds ApiConfig fields)."""
    args = dict(args or {})
    api = ApiConfig.from_dict(args.pop("api", None))
    config = AppConfig.from_dict(args)
    if api.num_servers > 1 and 0 in (api.http_port, api.grpc_port):
        raise ValueError("api.num_servers > 1 needs fixed ports (the ingress replicas share them), not 0")
    ingress = serve.deployment(ApiIngress).options(
        name=config.deployment.name + INGRESS_SUFFIX, num_replicas=api.num_servers,
        ray_actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
    return ingress.bind(application(config), config.to_dict(), dataclasses.asdict(api))
