"""One application for both API modules of this package: a local Ray cluster, one CPU replica of the embedded
model and the API servers on loopback (``api_app.running_app``, the configuration both test), started once
(about 17 s on a 2-core machine) and torn down once (about 3 s) instead of once per module.

No test depends on what another left in the shared replica: each asserts on its own responses; a test that
cancels, times out or holds a request waits until the engine is idle again (``wait_engine_idle``); servers with
other limits are built over the same replica by a test's own fixture (``more_servers``) and stopped with it;
the two prefix-cache tests write their graph in different encodings (adjacency, triples), so neither's second
prompt was cached by the other. Nothing here reads metrics or the replica's cumulative counters."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from tests.integration.api_app import running_app


@pytest.fixture(scope="package")
def app(embedded_path):
    with running_app(str(embedded_path)) as (config, handle, servers):
        yield config, handle, servers
