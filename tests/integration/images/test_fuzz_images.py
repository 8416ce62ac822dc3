"""Fuzzing the image paths of both front doors: 500 generated chat requests with images per protocol against a
real local Ray cluster + Serve app (one CPU replica of the tiny random-weight GLM-4.1V, shared with
test_multimodal_api: conftest.py) on 127.0.0.1 — good images, and bad ones in every place a client can put them
(truncated and header-only PNGs, decompression-bomb headers, wrong data URLs, images in system turns, too many
images, placeholder counts that do not match). tests/integration/test_fuzz_api.py fuzzes the rest against a
text-only model, which refuses every image up front; here the images are decoded, measured and run, in the front
end and in the engine. Same contract and checks (tests/fuzz/contract.py), same fixed-seed drawing
(tests/fuzz/cases.py)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray")
pytest.importorskip("grpc")
pytest.importorskip("aiohttp")
pytest.importorskip("hypothesis")

from pagoda.cluster.api.config import ApiConfig
from tests.fuzz import known_bugs
from tests.fuzz.cases import draw_mix
from tests.fuzz.clients import fuzz_grpc, fuzz_http
from tests.fuzz.grpc_cases import image_grpc_cases
from tests.fuzz.http_cases import image_http_cases
from tests.fuzz.review import ServerLog, explain, review
from tests.integration.api_app import more_servers

REQUESTS = 500  # per protocol
SEED = 0
MIX = {"valid": 1, "mutated": 2}
CONCURRENCY = 8
HANG_S = 20.0  # an answer slower than this is a hang
BODY_LIMIT = 64 * 1024
IDLE_S = 5.0


@pytest.fixture(scope="module")
def fuzzed(app):
    """The package's replica (conftest.py) behind servers of this module's own, with a small body limit."""
    config, handle, servers = app
    mine = more_servers(servers, config, ApiConfig(http_port=0, grpc_port=0, max_message_bytes=BODY_LIMIT))
    yield config, handle, mine
    mine.stop()


def _review(outcomes, log: ServerLog, handle, http_url: str | None, grpc_target: str | None) -> dict:
    result, problems = review(outcomes, log.records, lambda: handle.stats.remote().result(), http_url, grpc_target,
                              IDLE_S, known_bugs.set_aside)
    assert not problems, explain(result, problems)
    return result


def test_http_image_fuzz(fuzzed):
    _, handle, servers = fuzzed
    cases = draw_mix(image_http_cases(servers.frontend.info.vocab_size, big=BODY_LIMIT + 1000), REQUESTS, SEED, MIX)
    with ServerLog() as log:
        outcomes = asyncio.run(fuzz_http(servers.http_url, cases, CONCURRENCY, HANG_S, keep_alive=False))
    assert len(outcomes) == REQUESTS
    assert {"200", "400"} <= set(_review(outcomes, log, handle, servers.http_url, None)["statuses"])


def test_grpc_image_fuzz(fuzzed):
    _, handle, servers = fuzzed
    cases = draw_mix(image_grpc_cases(servers.frontend.info.vocab_size, big=BODY_LIMIT + 1000), REQUESTS, SEED, MIX)
    with ServerLog() as log:
        outcomes = asyncio.run(fuzz_grpc(servers.grpc_target, cases, CONCURRENCY, HANG_S))
    assert len(outcomes) == REQUESTS
    assert {"OK", "INVALID_ARGUMENT"} <= set(_review(outcomes, log, handle, None, servers.grpc_target)["statuses"])
