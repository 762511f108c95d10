"""Check that the dashboard and the alerts query only metrics the project exports.

Exported: the worker's families (``prefect_gpu_workers.slots.metrics.EXPORTED``)
and the operator's (whatever ``pgw_operator.metrics`` registers in
prometheus_client's registry), as the series Prometheus stores: a counter as
``<name>_total``, a histogram as ``_bucket``/``_sum``/``_count``.

    .venv/bin/python deploy/monitoring/metric_names.py   # exit 1 naming unknown metrics

hack/check-monitoring runs it; tests/unit/test_monitoring.py tests the parts.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
FILES = REPO_ROOT / "charts" / "prefect-gpu-workers" / "files"

# Words of PromQL that are not metric names where a name could stand.
KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORD = re.compile(r"(?<![\w$.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$", re.S)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana ``label_values`` query) reads.

    Strings, label matchers, ranges and grouping clauses are dropped first,
    then every word that is not a function call or a keyword is a metric name.

    Example:
        >>> sorted(metric_names('sum by (pod) (rate(a_total{x="y"}[5m])) / b'))
        ['a_total', 'b']
    """
    if match := _LABEL_VALUES.match(expr):
        # Grafana's label_values(METRIC, LABEL): the label is no metric.
        expr = match.group(1)
    text = _STRING.sub('""', expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING):
        text = pattern.sub(" ", text)
    return {
        m.group(1)
        for m in _WORD.finditer(text)
        if m.group(2) is None and m.group(1).lower() not in KEYWORDS
    }


def series_names(families: Mapping[str, str]) -> set[str]:
    """The series names Prometheus stores for ``families`` (name -> type).

    Example:
        >>> sorted(series_names({"a_total": "counter", "h": "histogram", "g": "gauge"}))
        ['a_total', 'g', 'h_bucket', 'h_count', 'h_sum']
    """
    names: set[str] = set()
    for name, kind in families.items():
        if kind == "counter":
            # prometheus_client names a counter's family without _total,
            # the worker's EXPORTED with it; the series has it either way.
            names.add(name.removesuffix("_total") + "_total")
        elif kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {name, f"{name}_sum", f"{name}_count"}
        elif kind == "info":
            names.add(name.removesuffix("_info") + "_info")
        else:
            names.add(name)
    return names


def exported_families() -> dict[str, str]:
    """Family name -> type of every family the worker and the operator export."""
    import prometheus_client

    import pgw_operator.metrics  # noqa: F401  (registers the operator's families)
    from prefect_gpu_workers.slots.metrics import EXPORTED

    families = dict(EXPORTED)
    for family in prometheus_client.REGISTRY.collect():
        families[family.name] = family.type
    return families


def dashboard_queries(dashboard: Mapping[str, object]) -> list[str]:
    """Every PromQL expression of a dashboard's JSON: panel targets and query variables."""
    exprs: list[str] = []
    panels = dashboard.get("panels")
    for panel in panels if isinstance(panels, list) else []:
        exprs += [str(t["expr"]) for t in panel.get("targets") or [] if "expr" in t]
    templating = dashboard.get("templating")
    for variable in templating.get("list", []) if isinstance(templating, dict) else []:
        if variable.get("type") == "query":
            exprs.append(str(variable["query"]))
    return exprs


def alert_exprs(rules_file: Mapping[str, object]) -> dict[str, str]:
    """Alert (or recorded series) name -> expression of a Prometheus rules file."""
    groups = rules_file.get("groups")
    return {
        str(rule.get("alert") or rule.get("record")): str(rule["expr"])
        for group in (groups if isinstance(groups, list) else [])
        for rule in group["rules"]
    }


def unknown(exprs: Iterable[tuple[str, str]], known: set[str]) -> list[str]:
    """'where: name' for each metric an expression reads that is not in ``known``,
    and for each expression that reads no metric at all."""
    problems: list[str] = []
    for where, expr in exprs:
        names = metric_names(expr)
        if not names:
            problems.append(f"{where}: reads no metric: {expr}")
        problems += [f"{where}: {name}" for name in sorted(names - known)]
    return problems


def main() -> int:
    known = series_names(exported_families())
    dashboard = json.loads((FILES / "dashboard.json").read_text())
    alerts = yaml.safe_load((FILES / "alerts.yaml").read_text())
    exprs = [(f"dashboard query {i}", e) for i, e in enumerate(dashboard_queries(dashboard))]
    exprs += [(f"alert {name}", e) for name, e in alert_exprs(alerts).items()]
    problems = unknown(exprs, known)
    for problem in problems:
        print(f"not exported: {problem}", file=sys.stderr)
    if not problems:
        print(f"{len(exprs)} expressions read exported metrics only", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
