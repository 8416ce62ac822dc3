"""``PagodaRouter``, the Serve adapter around the routing policy, on fake replicas and requests (no Ray
cluster): a generate call's prompt and priority reach the ranking."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from pagoda.cluster.protocol import GenerateRequest
from pagoda.cluster.router import PagodaRouter
from pagoda.cluster.routing_stats import ReplicaStats
from pagoda.engine.kv_cache.block_hash import hash_full_blocks

BS = 16
PREFIX = list(range(1000, 1000 + 20 * BS))
ReplicaId = namedtuple("ReplicaId", "unique_id")  # hashable, like Serve's ReplicaID


def fake_replica(name: str, **stats) -> SimpleNamespace:
    base = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "num_blocks": 1000, "block_size": BS,
            "max_num_seqs": 32, "max_num_batched_tokens": 512, "pending_prefill_tokens": 0, "num_preemptions": 0}
    return SimpleNamespace(replica_id=ReplicaId(name), routing_stats=ReplicaStats(**{**base, **stats}).to_wire())


def pending(request: GenerateRequest) -> SimpleNamespace:
    metadata = SimpleNamespace(call_method="generate", internal_request_id=request.request_id)
    return SimpleNamespace(metadata=metadata, args=(request,), kwargs={})


def test_the_generate_calls_priority_reaches_the_ranking():
    router = PagodaRouter(DeploymentID(name="engine", app_name="pagoda"), DeploymentHandleSource.UNKNOWN)
    router.initialize_state(block_size=BS)
    holder = fake_replica("holder", num_running=20, num_waiting=4, kv_usage=0.1,
                          cached_block_hashes=frozenset(hash_full_blocks(PREFIX, BS)))
    idle = fake_replica("idle")

    def first_choice(request_id: str, priority: int) -> str:
        request = GenerateRequest(request_id, PREFIX + [7, 8, 9], priority=priority)
        ranked = asyncio.run(router.choose_replicas([idle, holder], pending(request)))
        router.on_request_completed(ranked[0][0].replica_id, request_id)  # forget it: the next call sees the same load
        return ranked[0][0].replica_id.unique_id

    assert first_choice("bulk", 0) == "holder"  # follows its prefix
    assert first_choice("urgent", -1) == "idle"  # the soonest first token
