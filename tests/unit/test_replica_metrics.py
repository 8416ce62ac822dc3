"""ReplicaMetrics bookkeeping on fake outputs, with ray.util.metrics replaced by recorders (no Ray)."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
import ray.util.metrics as ray_metrics

from pagoda.cluster import metrics as m

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
    return m.ReplicaMetrics("tiny", "r1")


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
    assert tags == {"model": "tiny", "replica": "r1", "priority": "2"}


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
