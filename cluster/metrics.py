"""Replica metrics through ``ray.util.metrics``: the Ray dashboard and Ray's Prometheus endpoint see them.

Names follow vLLM's (``vllm:num_requests_running`` -> ``pagoda:num_requests_running``), and that is
what Prometheus stores and dashboards query. Ray 2.60 deprecates ':' in metric names
(``ray/util/metrics.py``, ``Metric.__init__``: "Metric name {name} contains a : character, which is
no longer allowed. Please migrate to the new metric name format. This will be an error in the
future." — a ``FutureWarning``), so each metric is registered as ``pagoda_<x>`` and Ray's exporter
adds its ``ray_`` prefix. The PodMonitor (``deploy/k8s/base/podmonitor.yaml``) renames them back at
scrape time (``metricRelabelings``: ``__name__`` ``ray_pagoda_(.+)`` -> ``pagoda:$1``), keeping the
suffixes of the Prometheus text format::

    spec.name (kind)                      on Ray's endpoint (ray_series)            in Prometheus (prometheus_series)
    pagoda:num_requests_running (gauge)   ray_pagoda_num_requests_running           pagoda:num_requests_running
    pagoda:prompt_tokens (counter)        ray_pagoda_prompt_tokens_total            pagoda:prompt_tokens_total
    pagoda:time_to_first_token_seconds    ray_pagoda_time_to_first_token_seconds_   pagoda:time_to_first_token_seconds_
      (histogram)                           {bucket,sum,count}                        {bucket,sum,count}

The relabeling rule is the only place the renaming is written down; tests apply it to a live scrape
and to ``ray_series`` and expect ``prometheus_series``.

Labels: ``model`` and ``replica`` everywhere (Ray adds its own, e.g. ``SessionName``, ``NodeAddress``);
request metrics also carry ``priority`` and ``tenant``. Tenants are names clients choose, and every
label value is a series Prometheus keeps, so the ``tenant`` label takes a bounded set of values
(``tenant_tag``): the tenant's own name when it is one of the engine's configured ``tenant_weights``,
``default`` for a request without a tenant, ``other`` for any other tenant. (A configured tenant
named ``default`` or ``other`` shares that series.)

Sources: per-request metrics (tokens, latencies) are taken by the replica as its stream yields
(``on_output``); engine state (queues, KV usage, prefix cache, preemptions) is polled from the
engine's latest ``EngineSnapshot`` (``AsyncLLMEngine.snapshot()``, published by the engine thread
after each step) by a thread every ``POLL_PERIOD_S`` (``publish_engine``), cumulative engine counters
turned into counter increments. Queue time is arrival at the replica until the engine admits the
request into its running batch, as seen by that poll (resolution ``POLL_PERIOD_S``; never later
than the first output).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Collection
from dataclasses import dataclass

POLL_PERIOD_S = 0.25

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)  # vLLM's TTFT buckets
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)  # vLLM's e2e buckets

RAY_EXPORT_PREFIX = "ray_"  # what Ray's exporter puts before an application metric's name
REPLICA_TAGS = ("model", "replica")
REQUEST_TAGS = ("model", "replica", "priority", "tenant")
DEFAULT_TENANT_TAG = "default"  # the tenant label of requests without a tenant
OTHER_TENANT_TAG = "other"  # ... and of those whose tenant has no configured weight


@dataclass(frozen=True)
class MetricSpec:
    name: str  # vLLM style, "pagoda:<x>": the name Prometheus stores (see the module docstring)
    kind: str  # "gauge" | "counter" | "histogram"
    description: str
    tag_keys: tuple[str, ...] = REPLICA_TAGS
    boundaries: tuple[float, ...] = ()  # histograms only

    @property
    def ray_name(self) -> str:
        """The name given to ``ray.util.metrics`` (no ':', which Ray 2.60 deprecates)."""
        return self.name.replace(":", "_")


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("pagoda:num_requests_running", "gauge", "Requests in the engine's running batch."),
    MetricSpec("pagoda:num_requests_waiting", "gauge", "Requests waiting for admission (queued or preempted)."),
    MetricSpec("pagoda:kv_cache_usage_perc", "gauge", "Fraction of KV cache blocks in use, 0 to 1."),
    MetricSpec("pagoda:prefix_cache_queries", "counter", "Prompt tokens looked up in the prefix cache."),
    MetricSpec("pagoda:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    MetricSpec("pagoda:num_preemptions", "counter", "Requests preempted (recomputed) for lack of KV blocks."),
    MetricSpec("pagoda:prompt_tokens", "counter", "Prompt tokens of requests that were prefilled.", REQUEST_TAGS),
    MetricSpec("pagoda:generation_tokens", "counter", "Generated tokens.", REQUEST_TAGS),
    MetricSpec("pagoda:request_success", "counter", "Requests that finished (stop or length).", REQUEST_TAGS),
    MetricSpec("pagoda:time_to_first_token_seconds", "histogram", "Arrival at the replica to first token.",
               REQUEST_TAGS, _LATENCY_BUCKETS),
    MetricSpec("pagoda:inter_token_latency_seconds", "histogram", "Time between consecutive output tokens.",
               REQUEST_TAGS, _ITL_BUCKETS),
    MetricSpec("pagoda:e2e_request_latency_seconds", "histogram", "Arrival at the replica to the last token.",
               REQUEST_TAGS, _REQUEST_BUCKETS),
    MetricSpec("pagoda:request_queue_time_seconds", "histogram", "Arrival at the replica to admission into the batch.",
               REQUEST_TAGS, _REQUEST_BUCKETS),
)
BY_NAME = {m.name: m for m in METRICS}


def ray_series(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names ``spec`` has on Ray's Prometheus endpoint (Ray's exporter prefixes ``ray_``)."""
    return _samples(RAY_EXPORT_PREFIX + spec.ray_name, spec.kind)


def prometheus_series(spec: MetricSpec) -> tuple[str, ...]:
    """The sample names Prometheus stores for ``spec`` once the PodMonitor renamed Ray's (vLLM's names)."""
    return _samples(spec.name, spec.kind)


def tenant_tag(tenant: str | None, known: Collection[str]) -> str:
    """The ``tenant`` label of a request: its tenant if ``known`` (configured), else one of two fixed values,
    so a client inventing tenant names cannot create series without bound."""
    if tenant is None:
        return DEFAULT_TENANT_TAG
    return tenant if tenant in known else OTHER_TENANT_TAG


def _samples(base: str, kind: str) -> tuple[str, ...]:
    """A metric's sample names in the Prometheus text format."""
    if kind == "counter":
        return (base + "_total",)
    if kind == "histogram":
        return (base + "_bucket", base + "_sum", base + "_count")
    return (base,)


@dataclass
class _Live:
    """One request in flight on this replica (monotonic times)."""

    arrival: float
    tags: dict[str, str]  # the request metrics' labels: model, replica, priority, tenant
    engine_ids: tuple[str, ...]  # the engine's ids for it (one per completion when n > 1)
    admitted: bool = False
    first_token: float | None = None
    last_token: float | None = None


class ReplicaMetrics:
    """The metrics of one replica. Request hooks run on the replica's event loop, ``publish_engine``
    on the poll thread; a lock guards the in-flight table they share. ``tenants``: the engine's configured
    tenant names, the only ones that label a series of their own (``tenant_tag``)."""

    def __init__(self, model: str, replica: str, tenants: Collection[str] = ()) -> None:
        from ray.util import metrics as ray_metrics

        kinds = {"gauge": ray_metrics.Gauge, "counter": ray_metrics.Counter, "histogram": ray_metrics.Histogram}
        self._m = {}
        for spec in METRICS:
            kwargs = {"boundaries": list(spec.boundaries)} if spec.kind == "histogram" else {}
            self._m[spec.name] = kinds[spec.kind](spec.ray_name, description=spec.description,
                                                  tag_keys=spec.tag_keys, **kwargs)
        self._tags = {"model": model, "replica": replica}
        self._tenants = frozenset(tenants)
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._engine_totals = {"pagoda:prefix_cache_queries": 0, "pagoda:prefix_cache_hits": 0,
                               "pagoda:num_preemptions": 0}

    # ---- per request (replica event loop) --------------------------------------------------------

    def request_started(self, request_id: str, priority: int, n: int, tenant: str | None = None) -> None:
        from pagoda.engine.output_processor import child_ids

        tags = {**self._tags, "priority": str(priority), "tenant": tenant_tag(tenant, self._tenants)}
        with self._lock:
            self._live[request_id] = _Live(time.monotonic(), tags, tuple(child_ids(request_id, n)))

    def on_output(self, request_id: str, output, num_prompt_tokens: int) -> None:
        """A delta output streamed for ``request_id``: tokens, TTFT, inter-token latency, and at the end e2e."""
        t = time.monotonic()
        with self._lock:
            live = self._live.get(request_id)
        if live is None:
            return
        new_tokens = sum(len(c.token_ids) for c in output.outputs)
        if new_tokens:
            if live.first_token is None:
                live.first_token = t
                self._observe("pagoda:time_to_first_token_seconds", t - live.arrival, live)
                self._inc("pagoda:prompt_tokens", num_prompt_tokens, live)
                self._admit(live, t)
            elif live.last_token is not None:
                gap = (t - live.last_token) / new_tokens
                for _ in range(new_tokens):
                    self._observe("pagoda:inter_token_latency_seconds", gap, live)
            live.last_token = t
            self._inc("pagoda:generation_tokens", new_tokens, live)
        if output.finished:
            self._observe("pagoda:e2e_request_latency_seconds", t - live.arrival, live)
            if all(c.finish_reason in ("stop", "length") for c in output.outputs):
                self._inc("pagoda:request_success", 1, live)

    def request_ended(self, request_id: str) -> None:
        with self._lock:
            self._live.pop(request_id, None)

    # ---- engine state (poll thread) --------------------------------------------------------------

    def publish_engine(self, stats, running_ids=()) -> None:
        """Gauges from an ``EngineStats`` snapshot; its cumulative counters become increments;
        requests now in the running batch (``running_ids``, engine ids) get their queue time."""
        self._m["pagoda:num_requests_running"].set(stats.num_running, tags=self._tags)
        self._m["pagoda:num_requests_waiting"].set(stats.num_waiting, tags=self._tags)
        self._m["pagoda:kv_cache_usage_perc"].set(stats.kv_cache_usage, tags=self._tags)
        for name, total in (("pagoda:prefix_cache_queries", stats.prefix_cache_queries),
                            ("pagoda:prefix_cache_hits", stats.prefix_cache_hits),
                            ("pagoda:num_preemptions", stats.num_preemptions)):
            delta, self._engine_totals[name] = total - self._engine_totals[name], total
            if delta > 0:  # Ray's Counter.inc raises on 0: a counter's series appears with its first increment
                self._m[name].inc(delta, tags=self._tags)
        running, t = set(running_ids), time.monotonic()
        with self._lock:
            live = list(self._live.values())
        for request in live:
            if not request.admitted and running.intersection(request.engine_ids):
                self._admit(request, t)

    # ---- helpers ---------------------------------------------------------------------------------

    def _admit(self, live: _Live, t: float) -> None:
        if not live.admitted:
            live.admitted = True
            self._observe("pagoda:request_queue_time_seconds", t - live.arrival, live)

    def _inc(self, name: str, value: float, live: _Live) -> None:
        self._m[name].inc(value, tags=live.tags)

    def _observe(self, name: str, value: float, live: _Live) -> None:
        self._m[name].observe(max(0.0, value), tags=live.tags)


class EnginePoller:
    """A daemon thread publishing the state of ``engine`` (an ``AsyncLLMEngine``: its ``snapshot()``) into
    ``metrics`` every ``period_s`` until ``stop()``."""

    def __init__(self, engine, metrics: ReplicaMetrics, period_s: float = POLL_PERIOD_S) -> None:
        self._engine, self._metrics, self._period = engine, metrics, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pagoda-metrics", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            self.poll()

    def poll(self) -> None:
        snapshot = self._engine.snapshot()  # frozen: no torn reads while the engine thread steps
        self._metrics.publish_engine(snapshot.stats, snapshot.running_ids)

    def stop(self) -> None:
        self._stop.set()
