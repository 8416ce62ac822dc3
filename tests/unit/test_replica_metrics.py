"""ReplicaMetrics bookkeeping on fake outputs, with ray.util.metrics replaced by recorders (no Ray); and a real
LLMReplica on a tiny model handing a request's tenant to its engine and to these metrics."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
import ray.util.metrics as ray_metrics

from pagoda import SamplingParams
from pagoda.cluster import metrics as m
from pagoda.cluster.config import AppConfig
from pagoda.cluster.protocol import GenerateRequest

LOG: dict[str, list] = defaultdict(list)  # ray name -> [(value, tags)]


class _Recorder:
    def __init__(self, name, description="", tag_keys=(), boundaries=None) -> None:
        self.name, self.tag_keys = name, tag_keys

    def _record(self, value, tags) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        LOG[self.name].append((value, tags))

    set = observe = lambda self, value=1.0, tags=None: self._record(value, tags)

    def inc(self, value=1.0, tags=None) -> None:
        if value <= 0:  # as Ray's Counter.inc (2.60)
            raise ValueError(f"value must be >0, got {value}")
        self._record(value, tags)


@pytest.fixture
def metrics(monkeypatch):
    LOG.clear()
    for kind in ("Gauge", "Counter", "Histogram"):
        monkeypatch.setattr(ray_metrics, kind, _Recorder)
    return m.ReplicaMetrics("tiny", "r1", tenants=("team-a",))


def out(*token_counts, finished=False, reason="length"):
    return SimpleNamespace(finished=finished, outputs=[
        SimpleNamespace(token_ids=[0] * n, finish_reason=reason if finished else None) for n in token_counts])


def values(name: str) -> list[float]:
    return [v for v, _ in LOG[m.BY_NAME[name].ray_name]]


def test_a_request_records_ttft_itl_tokens_e2e_and_queue_time(metrics):
    metrics.request_started("a", priority=2, n=1)
    for chunk in (out(1), out(1), out(2), out(1, finished=True)):
        metrics.on_output("a", chunk, num_prompt_tokens=7)
    metrics.request_ended("a")
    assert len(values("pagoda:time_to_first_token_seconds")) == 1
    assert values("pagoda:prompt_tokens") == [7]
    assert sum(values("pagoda:generation_tokens")) == 5
    assert len(values("pagoda:inter_token_latency_seconds")) == 4  # every token after the first
    assert len(values("pagoda:e2e_request_latency_seconds")) == 1
    assert len(values("pagoda:request_queue_time_seconds")) == 1  # at the latest, the first token
    assert values("pagoda:request_success") == [1]
    tags = LOG[m.BY_NAME["pagoda:request_success"].ray_name][0][1]
    assert tags == {"model": "tiny", "replica": "r1", "priority": "2", "tenant": "default"}


def test_tenant_tag_is_a_configured_name_default_or_other():
    assert m.tenant_tag("team-a", {"team-a", "team-b"}) == "team-a"
    assert m.tenant_tag(None, {"team-a"}) == m.DEFAULT_TENANT_TAG == "default"
    assert m.tenant_tag("walk-in", {"team-a"}) == m.tenant_tag("x" * 128, ()) == m.OTHER_TENANT_TAG == "other"


def test_request_metrics_carry_priority_and_a_bounded_tenant_tag(metrics):
    for rid, priority, tenant in (("a", -1, "team-a"), ("b", 0, None), ("c", 0, "walk-in"), ("d", 0, "eve-4711")):
        metrics.request_started(rid, priority=priority, n=1, tenant=tenant)
        metrics.on_output(rid, out(2, finished=True), num_prompt_tokens=3)
        metrics.request_ended(rid)
    for spec in m.METRICS:
        assert spec.tag_keys in (m.REPLICA_TAGS, m.REQUEST_TAGS)
    tags = [tags for _, tags in LOG[m.BY_NAME["pagoda:generation_tokens"].ray_name]]
    assert [(t["priority"], t["tenant"]) for t in tags] == [("-1", "team-a"), ("0", "default"), ("0", "other"),
                                                            ("0", "other")]
    assert {t["tenant"] for name, log in LOG.items() for _, t in log if "tenant" in t} == {"team-a", "default",
                                                                                         "other"}


def test_aborted_requests_do_not_count_as_success(metrics):
    metrics.request_started("a", priority=0, n=1)
    metrics.on_output("a", out(1, finished=True, reason="abort"), num_prompt_tokens=3)
    assert values("pagoda:request_success") == []
    assert len(values("pagoda:e2e_request_latency_seconds")) == 1


def test_engine_counters_become_increments_and_admission_gives_queue_time(metrics):
    metrics.request_started("b", priority=0, n=2)
    stats = lambda q, h, p: SimpleNamespace(num_running=1, num_waiting=2, kv_cache_usage=0.5,
                                            prefix_cache_queries=q, prefix_cache_hits=h, num_preemptions=p)
    metrics.publish_engine(stats(10, 4, 0), running_ids=[])
    assert values("pagoda:request_queue_time_seconds") == []
    metrics.publish_engine(stats(25, 4, 1), running_ids=["b#1"])  # n=2: the engine runs "b#0", "b#1"
    metrics.publish_engine(stats(25, 4, 1), running_ids=["b#0", "b#1"])
    assert values("pagoda:prefix_cache_queries") == [10, 15]  # no increment of 0: Ray's Counter refuses it
    assert values("pagoda:num_preemptions") == [1]
    assert len(values("pagoda:request_queue_time_seconds")) == 1
    assert values("pagoda:kv_cache_usage_perc") == [0.5] * 3


def test_names_on_rays_endpoint_and_in_prometheus():
    spec = m.BY_NAME["pagoda:prompt_tokens"]
    assert spec.ray_name == "pagoda_prompt_tokens" and m.ray_series(spec) == ("ray_pagoda_prompt_tokens_total",)
    assert m.prometheus_series(spec) == ("pagoda:prompt_tokens_total",)
    ttft = "pagoda:time_to_first_token_seconds"
    assert m.prometheus_series(m.BY_NAME[ttft]) == (ttft + "_bucket", ttft + "_sum", ttft + "_count")
    assert m.prometheus_series(m.BY_NAME["pagoda:kv_cache_usage_perc"]) == ("pagoda:kv_cache_usage_perc",)
    assert all(":" not in s.ray_name and s.name.startswith("pagoda:") for s in m.METRICS)


def test_the_replica_hands_the_tenant_to_the_engine_and_the_metrics(monkeypatch, tiny_models):
    from pagoda.cluster.replica import LLMReplica

    LOG.clear()
    for kind in ("Gauge", "Counter", "Histogram"):
        monkeypatch.setattr(ray_metrics, kind, _Recorder)
    config = AppConfig.from_dict({"engine": {
        "model": str(tiny_models["llama"]), "dtype": "float32", "device": "cpu", "max_model_len": 256,
        "cpu_kv_cache_gib": 0.02, "tenant_weights": {"team-a": 2.0}}, "deployment": {"engine_core": "thread"}})
    replica = LLMReplica(config.to_dict())
    seen: list[str | None] = []  # the tenant of every request the engine queued
    add = replica.engine.engine.add_prepared
    monkeypatch.setattr(replica.engine.engine, "add_prepared",
                        lambda prepared, kind: (seen.append(prepared.tenant), add(prepared, kind))[1])
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def run(rid: str, tenant: str | None) -> int:
        return len([c async for c in replica.generate(GenerateRequest(rid, [5, 6, 7], params, tenant=tenant))])

    try:
        assert all(asyncio.run(run(rid, tenant)) for rid, tenant in (("a", "team-a"), ("b", None), ("c", "walk-in")))
        with pytest.raises(ValueError, match="^tenant may hold only"):
            asyncio.run(run("d", "two words"))
    finally:
        replica.__del__()
    assert seen == ["team-a", None, "walk-in"]
    tags = [tags["tenant"] for _, tags in LOG[m.BY_NAME["pagoda:request_success"].ray_name]]
    assert tags == ["team-a", "default", "other"]
