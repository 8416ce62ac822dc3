"""Replica metrics as Prometheus stores them: a local Ray cluster exports on 127.0.0.1, one replica of the
embedded model serves a known load, the scrape goes through the PodMonitor's metricRelabelings (read
from the rendered manifests, applied with Prometheus' semantics), and every ``pagoda:`` metric is there
with counts equal to that load.

The KV cache is kept tiny so that concurrent requests preempt each other (the preemption counter
moves), and the prompts share a prefix longer than a block (prefix-cache hits move).
"""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
from prometheus_client.parser import text_string_to_metric_families
from ray import serve

from pagoda import SamplingParams
from pagoda.cluster.app import deploy
from pagoda.cluster.client import PagodaClient
from pagoda.cluster.config import AppConfig
from pagoda.cluster.metrics import BY_NAME, METRICS, RAY_EXPORT_PREFIX, prometheus_series
from pagoda.engine.tokenizer import load_tokenizer
from tests.relabel import metric_relabelings, relabel

MAX_TOKENS = 56
PREFIX = "You are a careful assistant. Answer in one short sentence, and never repeat the question back. "
PROMPTS = [PREFIX + q for q in ("Name a color.", "Name a fruit.", "Name a river.", "Name a mountain.")]
PRIORITIES = [0, 1, 0, 1]
TENANTS = ["team-a", None, "walk-in", "team-a"]  # team-a has a weight (its own series); walk-in has none ("other")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(embedded_path):
    metric_relabelings()  # skips before Ray starts if the manifests cannot be rendered (no kubectl)
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=port, _system_config={"metrics_report_interval_ms": 500})
    try:
        serve.start(proxy_location="Disabled")
        config = AppConfig.from_dict({
            "engine": {"model": str(embedded_path), "dtype": "float32", "device": "cpu", "max_model_len": 128,
                       "cpu_kv_cache_gib": 0.0075, "max_num_seqs": 8, "max_num_batched_tokens": 256,
                       "tenant_weights": {"team-a": 2.0}},
            "deployment": {"name": "metrics", "num_replicas": 1, "graceful_shutdown_timeout_s": 1},
        })
        handle = deploy(config)
        yield port, str(embedded_path), handle, PagodaClient(handle, load_tokenizer(embedded_path))
    finally:
        serve.shutdown()
        ray.shutdown()


def scrape(port: int, model: str) -> dict[str, dict[tuple, float]]:
    """series name as Prometheus stores it -> {labels (without Ray's own) -> value}, for pagoda's series
    of ``model``: every scraped sample goes through the PodMonitor's metricRelabelings first."""
    rules = metric_relabelings()
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = relabel({**sample.labels, "__name__": sample.name}, rules)
            name = labels["__name__"]
            assert not name.startswith(RAY_EXPORT_PREFIX + "pagoda_"), f"{sample.name} kept Ray's name"
            if name.startswith("pagoda:") and labels.get("model") == model:
                key = tuple(sorted((k, v) for k, v in labels.items() if k in ("priority", "tenant", "le", "replica")))
                out.setdefault(name, {})[key] = sample.value
    return out


def total(series: dict[str, dict[tuple, float]], name: str, **where) -> float:
    return sum(v for labels, v in series.get(name, {}).items()
               if all((k, str(w)) in labels for k, w in where.items()) and not any(k == "le" for k, _ in labels))


def test_every_metric_is_exported_with_counts_equal_to_the_load(served):
    port, model, handle, client = served
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)

    async def load():
        ids = [await client.token_ids(p) for p in PROMPTS]
        outs = await asyncio.gather(*(client.complete(i, params, priority=p, tenant=t)
                                      for i, p, t in zip(ids, PRIORITIES, TENANTS)))
        return ids, outs, await handle.stats.remote()

    prompt_ids, outs, engine = asyncio.run(load())
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs)
    expected = {
        "pagoda:request_success_total": len(PROMPTS),
        "pagoda:generation_tokens_total": len(PROMPTS) * MAX_TOKENS,
        "pagoda:prompt_tokens_total": sum(len(i) for i in prompt_ids),
        "pagoda:time_to_first_token_seconds_count": len(PROMPTS),
        "pagoda:e2e_request_latency_seconds_count": len(PROMPTS),
        "pagoda:request_queue_time_seconds_count": len(PROMPTS),
        "pagoda:inter_token_latency_seconds_count": len(PROMPTS) * (MAX_TOKENS - 1),
        "pagoda:prefix_cache_queries_total": engine["prefix_cache_queries"],
        "pagoda:prefix_cache_hits_total": engine["prefix_cache_hits"],
        "pagoda:num_preemptions_total": engine["num_preemptions"],
    }
    assert engine["prefix_cache_hits"] > 0 and engine["num_preemptions"] > 0, engine  # the load exercised both

    deadline, series = time.monotonic() + 30, {}
    while time.monotonic() < deadline:  # Ray exports every 0.5 s here; the poll thread every 0.25 s
        series = scrape(port, model)
        if all(total(series, name) == value for name, value in expected.items()) and \
                total(series, "pagoda:num_requests_running") == 0:
            break
        time.sleep(0.5)
    got = {name: total(series, name) for name in expected}
    assert got == expected

    for spec in METRICS:  # every defined metric is stored under its vLLM-style name
        for name in prometheus_series(spec):
            assert name in series, f"{spec.name}: {name} not among the relabeled series"
    per_priority = {p: total(series, "pagoda:request_success_total", priority=p) for p in (0, 1)}
    assert per_priority == {0: 2, 1: 2}
    per_tenant = {t: total(series, "pagoda:request_success_total", tenant=t) for t in ("team-a", "default", "other")}
    assert per_tenant == {"team-a": 2, "default": 1, "other": 1}
    gauges = ("pagoda:num_requests_running", "pagoda:num_requests_waiting", "pagoda:kv_cache_usage_perc")
    assert all(g in series for g in gauges), sorted(series)  # total() reads a missing series as 0
    assert total(series, "pagoda:num_requests_waiting") == 0
    assert 0 <= total(series, "pagoda:kv_cache_usage_perc") <= 1
    buckets = series["pagoda:time_to_first_token_seconds_bucket"]
    assert sum(v for labels, v in buckets.items() if ("le", "+Inf") in labels) == len(PROMPTS)
    assert BY_NAME["pagoda:time_to_first_token_seconds"].tag_keys == ("model", "replica", "priority", "tenant")


def test_status_reports_replicas_kv_and_queues(served):
    from pagoda.cluster.status_cli import collect_status, format_status

    status = collect_status("metrics")
    assert status.status == "RUNNING" and status.replica_states == {"RUNNING": 1}
    (replica,) = status.replicas
    assert replica["num_running"] == 0 and replica["num_waiting"] == 0 and 0 <= replica["kv_cache_usage"] <= 1
    table = format_status(status)
    assert "application 'metrics': RUNNING" in table and "1 running" in table
    assert collect_status("no-such-app") is None


def test_pagoda_status_command_against_the_running_cluster(served):
    import json
    import subprocess
    import sys

    gcs = ray.get_runtime_context().gcs_address
    cmd = [sys.executable, "-m", "pagoda.engine.cli", "status", "--address", gcs, "--app", "metrics", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    status = json.loads(out.stdout)
    assert status["deployment"] == "metrics-engine" and len(status["replicas"]) == 1
    missing = subprocess.run(cmd[:-3] + ["--app", "nope"], capture_output=True, text=True, timeout=120, check=False)
    assert missing.returncode == 1 and "no Serve application 'nope'" in missing.stderr
