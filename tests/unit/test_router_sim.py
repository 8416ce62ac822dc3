"""The routing simulator runs every policy to completion on pagoda's real scheduler and KV manager."""

from __future__ import annotations

import pytest

from bench.router import skewed_workload
from bench.router_sim import ReplicaSpec, simulate

SPEC = ReplicaSpec(num_blocks=256, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=4096)
SMALL = {"num_prefixes": 4, "prefix_len": (64, 128), "long_prompt": (300, 600), "long_output": (20, 60),
         "user_len": (10, 40), "short_output": (5, 20)}


@pytest.mark.parametrize("router", ["pagoda", "pow2", "round_robin"])
def test_every_request_gets_a_first_token_and_finishes(router):
    workload = skewed_workload(120, rate=40.0, seed=3, **SMALL)
    result = simulate(workload, router, num_replicas=3, spec=SPEC, stats_period_s=0.2, seed=1)
    assert set(result.ttft_s) == set(result.latency_s) == {r.request_id for r in workload}
    assert all(0 < result.ttft_s[r] <= result.latency_s[r] for r in result.ttft_s)
    assert len(set(result.served_by.values())) == 3  # the pools' invariants were checked inside simulate


def test_simulation_is_deterministic():
    workload = skewed_workload(60, rate=30.0, seed=5, **SMALL)
    a = simulate(workload, "pagoda", num_replicas=2, spec=SPEC, seed=2)
    b = simulate(workload, "pagoda", num_replicas=2, spec=SPEC, seed=2)
    assert a.ttft_s == b.ttft_s and a.served_by == b.served_by


def test_pagoda_keeps_a_prefix_on_fewer_replicas_than_round_robin():
    workload = skewed_workload(150, rate=20.0, seed=7, **SMALL)
    shared = [r for r in workload if r.kind == "shared"]

    def spread(result) -> float:
        by_prefix: dict[tuple, set] = {}
        for r in shared:
            by_prefix.setdefault(tuple(r.token_ids[:16]), set()).add(result.served_by[r.request_id])
        return sum(len(v) for v in by_prefix.values()) / len(by_prefix)

    pagoda = simulate(workload, "pagoda", num_replicas=4, spec=SPEC, seed=1)
    rr = simulate(workload, "round_robin", num_replicas=4, spec=SPEC, seed=1)
    assert spread(pagoda) < spread(rr)
    assert pagoda.prefix_hit_tokens > rr.prefix_hit_tokens
