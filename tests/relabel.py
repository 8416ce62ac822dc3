"""Prometheus relabeling as Prometheus applies it, to check what our PodMonitor's rules make of Ray's
series without running a Prometheus.

Semantics (Prometheus ``relabel_config``): the source labels' values joined by ``separator`` (``;``)
must match ``regex`` (default ``(.*)``) in full — Prometheus anchors it as ``^(?:regex)$``; action
``replace`` (the default) writes ``replacement`` (default ``$1``), expanded the way Go's
``Regexp.Expand`` does, into ``targetLabel``, or deletes that label when the expansion is empty; no
match leaves the labels as they are. Other actions are not modelled and fail loudly.
"""

from __future__ import annotations

import re

from tests.kustomize import objects

# Go's template variables: $$ (a literal $), ${name}, $name with the longest run of [A-Za-z0-9_]
# ($1_total means ${1_total}, not ${1}_total); a number names a group by index.
_VARIABLE = re.compile(r"\$(?:(\$)|\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


def expand(template: str, match: re.Match) -> str:
    """``template`` with ``$1``, ``${name}``, ``$$`` filled from ``match``; unknown groups expand to ''."""
    def variable(v: re.Match) -> str:
        if v.group(1):
            return "$"
        name = v.group(2) or v.group(3)
        try:
            return match.group(int(name) if name.isdigit() else name) or ""
        except IndexError:  # no such group: Go expands it to nothing
            return ""

    return _VARIABLE.sub(variable, template)


def relabel(labels: dict[str, str], rules: list[dict]) -> dict[str, str]:
    """``labels`` (``__name__`` included) after ``rules``, written with the PodMonitor's field names."""
    out = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace").lower()
        if action != "replace":
            raise ValueError(f"relabel action {action!r} is not modelled by tests/relabel.py")
        value = rule.get("separator", ";").join(out.get(name, "") for name in rule.get("sourceLabels", ()))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if match is None:
            continue
        target, result = expand(rule["targetLabel"], match), expand(rule.get("replacement", "$1"), match)
        if result:
            out[target] = result
        else:
            out.pop(target, None)
    return out


def metric_relabelings(kustomization: str = "base") -> list[dict]:
    """The ``metricRelabelings`` of the rendered PodMonitor's metrics endpoint."""
    (monitor,) = objects(kustomization, "PodMonitor")
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    return endpoint.get("metricRelabelings", [])


def stored_name(name: str, rules: list[dict]) -> str:
    """The name Prometheus stores a sample scraped as ``name`` under."""
    return relabel({"__name__": name}, rules).get("__name__", "")
