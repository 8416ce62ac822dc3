"""``ApiIngress``: the API servers as a Ray Serve deployment, for clusters (KubeRay) where no
``pagoda serve`` process holds the handle.

    import_path: cluster.api.ingress:build_app
    args: { engine: {...}, deployment: {...}, router: {...}, autoscaling: {...},
            api: { host: 0.0.0.0, http_port: 8080, grpc_port: 50051, api_key: ... } }   # ApiConfig fields

The engine application is the same as ``cluster.app:build_app``; in front of it one ingress
replica (fixed ports: one per node at most) runs ``ApiServers`` over a handle to the engine
deployment, so requests still go through the KV-aware router and ``PagodaClient``.
"""

from __future__ import annotations

import dataclasses

from ray import serve

from cluster.api.config import ApiConfig
from cluster.api.server import ApiServers
from cluster.app import application
from cluster.config import AppConfig

INGRESS_SUFFIX = "-api"


class ApiIngress:
    def __init__(self, engine, config: dict, api: dict) -> None:
        self.servers = ApiServers.start(engine, AppConfig.from_dict(config), ApiConfig(**api))

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
    api_fields = args.pop("api", None) or {}
    if not isinstance(api_fields, dict):
        raise ValueError(f"api must be a mapping, got {type(api_fields).__name__}")
    known = {f.name for f in dataclasses.fields(ApiConfig)}
    unknown = sorted(set(api_fields) - known)
    if unknown:
        raise ValueError(f"api.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
    api = ApiConfig(**api_fields)
    config = AppConfig.from_dict(args)
    ingress = serve.deployment(ApiIngress).options(
        name=config.deployment.name + INGRESS_SUFFIX, num_replicas=1, ray_actor_options={"num_cpus": 0})
    return ingress.bind(application(config), config.to_dict(), dataclasses.asdict(api))
