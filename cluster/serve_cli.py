"""`pagoda serve`: a local Ray cluster running the Serve application, until Ctrl-C.

    pagoda serve                          # embedded SmolLM2, one replica, on this machine
    pagoda serve --config deploy/pagoda.yaml
    pagoda serve --address auto           # deploy onto a running Ray cluster instead (removed at Ctrl-C)
    pagoda serve --http-port 8000 --grpc-port 50051   # the API front doors (defaults; 0 picks a port, -1 turns one off)
    pagoda serve --config glm4v.yaml --image-resize-max-pixels 5000000 --limit-images-per-prompt 1   # Open-AutoGLM

The config is the application YAML (``pagoda.cluster.config``) plus an optional ``api:`` section of
``ApiConfig`` fields (where the servers listen, the key, ``max_concurrent_requests``, ``num_servers``, TLS) — the same
file the KubeRay ingress reads; the API flags override that section. It is validated before Ray
starts, so a bad file fails in a second with the field named.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import threading


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the Ray Serve application (engine replicas behind the KV-aware router)")
    p.add_argument("--config", default=None, help="application YAML (default: embedded model, one replica)")
    p.add_argument("--address", default=None,
                   help="Ray cluster to deploy onto, e.g. 'auto'; default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--dashboard", action="store_true", help="start the Ray dashboard with the local cluster")
    # API flags override the config's `api:` section (ApiConfig fields), which overrides ApiConfig's defaults.
    p.add_argument("--host", default=None, help="interface the gRPC and HTTP APIs bind (default: loopback)")
    p.add_argument("--http-port", type=int, default=None, help="OpenAI-compatible HTTP port (default: 8000; -1: off)")
    p.add_argument("--grpc-port", type=int, default=None, help="pagoda.v1 gRPC port (default: 50051; -1: off)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: api.api_key, else $PAGODA_API_KEY; none: open)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="the model name(s) clients use; responses report the one a request used "
                        "(default: the application's name)")
    p.add_argument("--api-servers", type=int, default=None, dest="num_servers",
                   help="processes serving the APIs on the same ports (default: 1; like vLLM's --api-server-count)")
    p.add_argument("--tls-cert", default=None, help="gRPC TLS certificate chain (PEM)")
    p.add_argument("--tls-key", default=None, help="gRPC TLS private key (PEM)")
    p.add_argument("--tls-client-ca", default=None, help="gRPC mTLS: CA that client certificates must chain to")
    _add_image_flags(p)


# MultiModalConfig fields a flag overrides (flag default None: the YAML's `engine:` value, else the default)
_IMAGE_FLAGS = [  # (field, type, help)
    ("limit_images_per_prompt", int, "images one prompt may carry; more is a 400 (default: 8)"),
    ("max_image_bytes", int, "largest encoded image in bytes; larger is a 400 (default: 20 MiB)"),
    ("max_input_image_pixels", int, "largest decoded width x height; larger is a 400 (default: 7680 x 4320)"),
    ("image_resize_max_pixels", int,
     ("the processor scales larger images down to this many pixels (Open-AutoGLM serves with 5000000; "
      "default: the model's preprocessor_config.json)")),
    ("image_fetch_timeout_s", float, "seconds per http(s) image download (default: 10)"),
]


def _add_image_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("images (vision-language models; override the config's engine: keys)")
    for name, typ, help_text in _IMAGE_FLAGS:
        g.add_argument("--" + name.replace("_", "-"), type=typ, default=None, help=help_text)
    g.add_argument("--allow-image-urls", action=argparse.BooleanOptionalAction, default=None,
                   help="fetch http(s) image URLs in chat messages (default: off; data URLs always work)")


def image_overrides(args: argparse.Namespace) -> dict:
    """The MultiModalConfig fields the image flags set (those left out keep the config's values)."""
    names = [name for name, _, _ in _IMAGE_FLAGS] + ["allow_image_urls"]
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def with_image_overrides(config, overrides: dict):
    """``config`` (an AppConfig) with its engine's MultiModalConfig fields replaced; ValueError names the flag."""
    if not overrides:
        return config
    engine = config.engine
    try:
        multimodal = dataclasses.replace(engine.multimodal, **overrides)
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        raise ValueError(f"--{name.replace('_', '-')}: {exc}") from None
    return dataclasses.replace(config, engine=dataclasses.replace(engine, multimodal=multimodal))


def api_overrides(args: argparse.Namespace) -> dict:
    """The ApiConfig fields the API flags set (a port of -1 turns that server off)."""
    fields = {"host": args.host, "api_key": args.api_key, "served_model_name": args.served_model_name,
              "num_servers": getattr(args, "num_servers", None),
              "tls_cert_file": args.tls_cert, "tls_key_file": args.tls_key, "tls_client_ca_file": args.tls_client_ca}
    overrides = {k: v for k, v in fields.items() if v is not None}
    for name in ("http_port", "grpc_port"):
        port = getattr(args, name)
        if port is not None:
            overrides[name] = None if port < 0 else port
    return overrides


def load_serve_config(path: str | None, args: argparse.Namespace):
    """(AppConfig, ApiConfig) from the YAML (its `api:` section too) and the flags; ValueError names the field."""
    from pagoda.cluster.api.config import ApiConfig
    from pagoda.cluster.config import AppConfig, read_yaml

    sections = read_yaml(path) if path is not None else {}
    if not isinstance(sections, dict):
        raise ValueError(f"config must be a mapping of sections, got {type(sections).__name__}")
    api_section = sections.pop("api", None) or {}
    if not isinstance(api_section, dict):
        raise ValueError(f"api must be a mapping, got {type(api_section).__name__}")
    api = ApiConfig.from_dict({**api_section, **api_overrides(args)})
    if api.api_key is None and os.environ.get("PAGODA_API_KEY"):
        api = dataclasses.replace(api, api_key=os.environ["PAGODA_API_KEY"])
    return with_image_overrides(AppConfig.from_dict(sections), image_overrides(args)), api


def serve_main(args: argparse.Namespace) -> int:
    try:
        config, api = load_serve_config(args.config, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        import ray
        from ray import serve
    except ImportError:
        print("error: `pagoda serve` needs Ray Serve: pip install 'pagoda[cluster]'", file=sys.stderr)
        return 2
    from pagoda.cluster.api.server import ApiServers
    from pagoda.cluster.api.server_pool import start_more_servers, stop_servers
    from pagoda.cluster.app import deploy, deployment_name
    from pagoda.cluster.serve_state import remove_state, write_state

    if args.address is None:
        ray_ctx = ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=args.dashboard,
                           log_to_driver=False)
    else:
        ray_ctx = ray.init(address=args.address, log_to_driver=False)
    servers, more = None, []
    try:
        serve.start(proxy_location="Disabled")
        handle = deploy(config)  # Ctrl-C here raises KeyboardInterrupt
        if api.http_port is not None or api.grpc_port is not None:
            servers = ApiServers.start(handle, config, api)
            more = start_more_servers(handle, config, servers)  # api.num_servers - 1 more processes, same ports
        stop = _stop_on_signals()  # from now on Ctrl-C / SIGTERM end the wait below
        if args.address is None:  # our own cluster: `pagoda status` finds it here, not another on the host
            write_state(config.deployment.name, ray_ctx.address_info["gcs_address"])
        _print_endpoints(config, deployment_name(config), ray_ctx, servers)
        while not stop.wait(0.5):
            pass
        print("pagoda serve: shutting down", flush=True)
    except KeyboardInterrupt:
        print("pagoda serve: interrupted", flush=True)
    except Exception as exc:  # noqa: BLE001 — replicas failed to start: report it, still shut down
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        stop_servers(more)
        if servers is not None:
            servers.stop()
        if args.address is None:
            remove_state(config.deployment.name)
            serve.shutdown()  # our own cluster: everything goes
        else:
            serve.delete(config.deployment.name)  # someone else's cluster: only our application goes
        ray.shutdown()
    return 0


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _print_endpoints(config, deployment: str, ray_ctx, servers=None) -> None:
    d = config.deployment
    gcs = ray_ctx.address_info["gcs_address"]
    token = os.environ.get("RAY_AUTH_MODE", "").lower() == "token"  # Ray turns token auth on for local clusters
    scaling = config.autoscaling
    replicas = f"{scaling.min_replicas}-{scaling.max_replicas} (autoscaling)" if scaling.enabled else str(d.num_replicas)
    lines = [
        (f"pagoda serve: ready — application {d.name!r}, deployment {deployment!r} x {replicas} replica(s), "
         f"model {config.engine.model.model}, router {config.router.policy}"),
        f"  ray cluster:  {gcs}   (connect: {'RAY_AUTH_MODE=token, ' if token else ''}ray.init(address={gcs!r}))",
        f"  handle:       serve.get_app_handle({d.name!r})  ->  cluster.client.PagodaClient(handle)",
    ]
    processes = f", {servers.api.num_servers} processes" if servers is not None and servers.api.num_servers > 1 else ""
    if servers is not None and servers.http_port is not None:
        lines.append(f"  openai http:  {servers.http_url}/v1   (model {servers.frontend.info.name!r}{processes})")
    if servers is not None and servers.grpc_port is not None:
        tls = " (TLS)" if servers.api.tls_cert_file else ""
        lines.append(f"  grpc:         {servers.grpc_target}{tls}   (pagoda.v1.Pagoda, health, reflection{processes})")
    if ray_ctx.dashboard_url:
        lines.append(f"  dashboard:    http://{ray_ctx.dashboard_url}")
    lines.append("  Ctrl-C to stop")
    print("\n".join(lines), flush=True)
