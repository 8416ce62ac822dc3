"""One application for the image modules of this package: a local Ray cluster, one CPU replica of the tiny
random-weight GLM-4.1V and the API servers on loopback (``api_app.running_app``, the configuration both test),
started once (about 20 s on a 2-core machine) and torn down once (about 3 s) instead of once per module. The
fuzz module puts servers with its own body limit over the same replica (``more_servers``).

No test depends on what another left in the shared replica: each asserts on its own responses; the fuzz runs
and the tests that send bad images check that the engine is idle again afterwards; servers with other limits are
built over the same replica by a module's own fixture and stopped with it. Nothing here reads metrics, prefix-cache
hits or the replica's cumulative counters."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from tests.integration.api_app import running_app


@pytest.fixture(scope="package")
def app(tiny_glm4v):
    with running_app(str(tiny_glm4v)) as (config, handle, servers):
        yield config, handle, servers
