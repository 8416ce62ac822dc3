"""The Grafana dashboard parses, and every series it queries is one Prometheus stores: a series
cluster/metrics.py exports on Ray's endpoint, renamed by the PodMonitor's metricRelabelings (read from
the rendered manifests), with labels those metrics carry; every pagoda metric has a panel."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pagoda.cluster.metrics import METRICS, prometheus_series, ray_series
from tests.relabel import metric_relabelings, stored_name

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "pagoda.json"
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_PROMQL_WORDS = {"sum", "max", "min", "avg", "by", "without", "rate", "irate", "increase", "histogram_quantile",
                 "clamp_min", "label_values", "le"}
_LABELS = re.compile(r"(?:by|without)\s*\(([^)]*)\)|([a-zA-Z_]+)\s*=~?")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def queries(d: dict) -> list[str]:
    exprs = [t["expr"] for p in d["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    return exprs


def series_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, labels,
    strings or template variables."""
    stripped = re.sub(r'"[^"]*"', "", expr)  # label values
    stripped = re.sub(r"label_values\(([^,]+),\s*\w+\)", r"\1", stripped)  # label_values(metric, label)
    stripped = re.sub(r"\$\w+", "", stripped)  # $__rate_interval, $model
    stripped = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(by|without)\s*\([^)]*\)", " ", stripped)  # selectors, ranges, groupings
    return {n for n in _NAME.findall(stripped) if n not in _PROMQL_WORDS and not n[0].isdigit() and
            not re.fullmatch(r"\d+(\.\d+)?(e-?\d+)?", n)} - {"e"}


def test_dashboard_parses_with_unique_panels():
    d = dashboard()
    assert d["title"] and d["uid"] == "pagoda"
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(p.get("targets") for p in d["panels"])
    assert all({"x", "y", "w", "h"} <= set(p["gridPos"]) for p in d["panels"])


def stored_series() -> set[str]:
    """pagoda's series as Prometheus stores them: Ray's sample names through the PodMonitor's rules."""
    rules = metric_relabelings()
    return {stored_name(name, rules) for spec in METRICS for name in ray_series(spec)}


def test_dashboard_names_only_metrics_prometheus_stores():
    stored = stored_series()
    for expr in queries(dashboard()):
        names = series_in(expr)
        assert names, f"no metric found in {expr!r}"
        assert names <= stored, f"{expr!r} queries {sorted(names - stored)}: not among the relabeled series"


def test_dashboard_labels_exist_on_the_metrics():
    known = {k for spec in METRICS for k in spec.tag_keys} | {"le"}
    for expr in queries(dashboard()):
        for grouping, selector in _LABELS.findall(re.sub(r'"[^"]*"', '""', expr)):
            labels = {x.strip() for x in grouping.split(",") if x.strip()} | ({selector} if selector else set())
            assert labels <= known, f"{expr!r} uses labels {sorted(labels - known)}"
        for label in re.findall(r"label_values\([^,]+,\s*(\w+)\)", expr):
            assert label in known, f"{expr!r} uses label {label!r}"


def test_every_metric_has_a_panel():
    used = set().union(*(series_in(e) for e in queries(dashboard())))
    for spec in METRICS:
        assert used & set(prometheus_series(spec)), f"{spec.name} has no panel"


def test_the_extractor_finds_names():
    expr = 'histogram_quantile(0.99, sum by (le) (rate(pagoda:x_bucket{model=~"$model"}[$__rate_interval])))'
    assert series_in(expr) == {"pagoda:x_bucket"}
