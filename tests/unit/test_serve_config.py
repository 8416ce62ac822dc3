"""`pagoda serve --config`: the application sections and the `api:` section, flags over the file."""

from __future__ import annotations

import argparse

import pytest

from pagoda.cluster.serve_cli import add_serve_parser, load_serve_config


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_api_section_is_read_and_flags_override_it(tmp_path, monkeypatch):
    monkeypatch.delenv("PAGODA_API_KEY", raising=False)
    cfg = tmp_path / "app.yaml"
    cfg.write_text("engine: {max_num_seqs: 8}\napi: {http_port: 9001, grpc_port: 9002, max_concurrent_requests: 7}\n")
    config, api = load_serve_config(str(cfg), _args())
    assert config.engine.scheduler.max_num_seqs == 8
    assert (api.http_port, api.grpc_port, api.max_concurrent_requests) == (9001, 9002, 7)
    _, api = load_serve_config(str(cfg), _args("--http-port", "9100", "--grpc-port", "-1"))
    assert (api.http_port, api.grpc_port, api.num_servers) == (9100, None, 1)
    assert load_serve_config(str(cfg), _args("--api-servers", "4"))[1].num_servers == 4


def test_defaults_without_a_file(monkeypatch):
    monkeypatch.setenv("PAGODA_API_KEY", "from-env")
    config, api = load_serve_config(None, _args())
    assert (api.host, api.http_port, api.grpc_port) == ("127.0.0.1", 8000, 50051)
    assert api.api_key == "from-env" and api.max_concurrent_requests is None
    assert config.deployment.num_replicas == 1


@pytest.mark.parametrize("text, message", [
    ("api: {port: 1}\n", r"api\.port: unknown field"),
    ("api: {http_port: 70000}\n", r"api\.http_port must be in \[0, 65535\]"),
    ("api: {max_concurrent_requests: 0}\n", r"api\.max_concurrent_requests must be >= 1"),
    ("api: {num_servers: 0}\n", r"api\.num_servers must be in \[1, 256\]"),
    ("api: {event_loop: trio}\n", r"api\.event_loop must be one of auto, uvloop, asyncio, got 'trio'"),
    ("api: [1]\n", r"api must be a mapping"),
    ("[1, 2]\n", r"config must be a mapping"),
])
def test_bad_api_section_names_the_field(tmp_path, text, message):
    cfg = tmp_path / "app.yaml"
    cfg.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_serve_config(str(cfg), _args())


def test_admission_follows_the_deployment_unless_capped():
    from pagoda.cluster.api.config import ApiConfig
    from pagoda.cluster.api.frontend import Frontend
    from pagoda.cluster.config import AppConfig

    app = AppConfig.from_dict({"engine": {"max_num_seqs": 8, "max_waiting": 24}, "deployment": {"num_replicas": 3}})
    frontend = Frontend(None, [0] * 10, app, ApiConfig(max_queued_requests=5), max_model_len=64)
    assert frontend.max_in_flight == 3 * (8 + 24) + 5  # every replica's run + queue, then the API's own queue
    capped = Frontend(None, [0] * 10, app, ApiConfig(max_concurrent_requests=7), max_model_len=64)
    assert capped.max_in_flight == 7
    # several API processes on the same ports: each admits its share, rounded up (the sum covers the whole)
    shared = Frontend(None, [0] * 10, app, ApiConfig(max_queued_requests=5, num_servers=4), max_model_len=64)
    assert shared.max_in_flight == 26
    assert Frontend(None, [0] * 10, app, ApiConfig(max_concurrent_requests=7, num_servers=2),
                    max_model_len=64).max_in_flight == 4


def test_event_loop_kinds():
    from pagoda.cluster.api.server import new_event_loop

    uvloop = pytest.importorskip("uvloop")  # ray[serve] installs it (uvicorn[standard])
    for kind, is_uvloop in (("auto", True), ("uvloop", True), ("asyncio", False)):
        loop = new_event_loop(kind)
        try:
            assert isinstance(loop, uvloop.Loop) == is_uvloop, kind
        finally:
            loop.close()
