"""The monitoring the chart ships: the generated dashboard, the alert rules, and
that both read only metrics the worker and the operator export.

promtool's own checks and rule tests run in hack/check-monitoring (it needs the
promtool hack/build-tools builds); these need nothing but the venv.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
MONITORING = REPO_ROOT / "deploy" / "monitoring"
FILES = REPO_ROOT / "charts" / "prefect-gpu-workers" / "files"


def load(name: str) -> ModuleType:
    """A script of deploy/monitoring (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(f"monitoring_{name}", MONITORING / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dashboard_py = load("dashboard")
names_py = load("metric_names")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    board: dict[str, Any] = json.loads((FILES / "dashboard.json").read_text())
    return board


@pytest.fixture(scope="module")
def alerts() -> dict[str, dict[str, Any]]:
    source = yaml.safe_load((FILES / "alerts.yaml").read_text())
    return {rule["alert"]: rule for group in source["groups"] for rule in group["rules"]}


@pytest.fixture(scope="module")
def exported_series() -> set[str]:
    series: set[str] = names_py.series_names(names_py.exported_families())
    return series


# --- the dashboard --------------------------------------------------------------


def test_the_committed_dashboard_is_what_the_generator_writes_now() -> None:
    committed = (FILES / "dashboard.json").read_text()
    assert committed == dashboard_py.render(), (
        "charts/prefect-gpu-workers/files/dashboard.json is stale: "
        "run .venv/bin/python deploy/monitoring/dashboard.py"
    )


def test_the_generator_s_check_mode_agrees() -> None:
    assert dashboard_py.main(["--check"]) == 0


def test_the_dashboard_has_its_rows_and_variables(dashboard: dict[str, Any]) -> None:
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Pools", "Workers", "GPU time by deployment", "Operator"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "pool", "deployment"]
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "pool", "deployment"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert variables[name]["includeAll"]
        assert variables[name]["multi"]
    assert dashboard["uid"] == "prefect-gpu-workers"


def test_every_panel_queries_the_chosen_data_source_and_has_a_unique_id(
    dashboard: dict[str, Any],
) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_panels_fit_the_grid_without_overlapping(dashboard: dict[str, Any]) -> None:
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_the_dashboard_covers_pools_workers_deployments_and_the_operator(
    dashboard: dict[str, Any],
) -> None:
    read = set().union(*(names_py.metric_names(e) for e in names_py.dashboard_queries(dashboard)))
    for wanted in (
        "pgw_pool_gpu_slots_in_use",
        "pgw_pool_workers_ready",
        "pgw_pool_workers_desired",
        "pgw_pool_backlog_runs",
        "pgw_pool_degraded",
        "pgw_gpu_slots_held",
        "pgw_gpu_slots",
        "pgw_gpu_slot_waiters",
        "pgw_gpu_slot_wait_seconds_bucket",
        "pgw_gpu_slot_handoff_seconds_bucket",
        "pgw_gpu_step_held_slot_seconds_total",
        "pgw_gpu_step_busy_slot_seconds_total",
        "pgw_gpu_step_waited_seconds_total",
        "pgw_gpu_steps_total",
        "pgw_reconcile_errors_total",
        "pgw_reconcile_duration_seconds_bucket",
        "pgw_operator_leader",
    ):
        assert wanted in read, wanted


# --- exported metrics only ------------------------------------------------------


def test_every_dashboard_query_reads_exported_metrics_only(
    dashboard: dict[str, Any], exported_series: set[str]
) -> None:
    exprs = [(f"query {i}", e) for i, e in enumerate(names_py.dashboard_queries(dashboard))]
    assert len(exprs) > 30
    assert names_py.unknown(exprs, exported_series) == []


def test_every_alert_expression_reads_exported_metrics_only(
    alerts: dict[str, dict[str, Any]], exported_series: set[str]
) -> None:
    exprs = [(name, rule["expr"]) for name, rule in alerts.items()]
    assert names_py.unknown(exprs, exported_series) == []


def test_the_exported_families_are_the_worker_s_and_the_operator_s() -> None:
    from prefect_gpu_workers.slots.metrics import EXPORTED

    families = names_py.exported_families()
    assert EXPORTED.items() <= families.items()
    # prometheus_client names a counter's family without _total.
    assert families["pgw_reconcile_errors"] == "counter"
    assert families["pgw_reconcile_duration_seconds"] == "histogram"
    assert families["pgw_pool_degraded"] == "gauge"


def test_a_misspelt_or_unexported_metric_is_reported() -> None:
    known = names_py.series_names({"pgw_gpu_slots_held": "gauge", "h": "histogram"})
    problems = names_py.unknown(
        [
            ("typo", 'sum(pgw_gpu_slot_held{pool="a"})'),
            ("histogram without suffix", "histogram_quantile(0.9, rate(h[5m]))"),
            ("no metric", "vector(1)"),
            ("fine", "sum by (le) (rate(h_bucket[5m])) and pgw_gpu_slots_held"),
        ],
        known,
    )
    assert problems == [
        "typo: pgw_gpu_slot_held",
        "histogram without suffix: h",
        "no metric: reads no metric: vector(1)",
    ]


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("pgw_a", {"pgw_a"}),
        (
            'sum by (pool, le) (rate(pgw_a_bucket{pool=~"$pool"}[$__rate_interval]))',
            {"pgw_a_bucket"},
        ),
        ("max by (namespace, pool) (a) == 0 and on (namespace, pool) b > bool 1", {"a", "b"}),
        ('x{state=~"scheduled|pending"} unless ignoring (state) y offset 5m', {"x", "y"}),
        ('label_values(pgw_b{namespace=~"$namespace"}, pool)', {"pgw_b"}),
        ("label_values(pgw_b, namespace)", {"pgw_b"}),
        ("(time() - started) - grace > 0", {"started", "grace"}),
        ("histogram_quantile(0.99, sum without (pod) (rate(h_bucket[1m])))", {"h_bucket"}),
        ('count(up{job="a{b}"}) or vector(0)', {"up"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert names_py.metric_names(expr) == names


def test_series_names_by_type() -> None:
    assert names_py.series_names(
        {
            "c": "counter",
            "c2_total": "counter",
            "g": "gauge",
            "h": "histogram",
            "s": "summary",
            "i": "info",
        }
    ) == {
        "c_total",
        "c2_total",
        "g",
        "h_bucket",
        "h_sum",
        "h_count",
        "s",
        "s_sum",
        "s_count",
        "i_info",
    }


# --- the alerts -----------------------------------------------------------------

ALERTS = {
    "PgwPoolDegraded",
    "PgwPoolBacklogWithoutWorkers",
    "PgwReconcileErrorsRising",
    "PgwGpuSlotLeaked",
    "PgwWorkerDrainOverdue",
    "PgwGpuHeldButIdle",
}


def test_the_alerts_are_the_six_of_the_issue_each_with_its_runbook_anchor(
    alerts: dict[str, dict[str, Any]],
) -> None:
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        assert rule["annotations"]["runbook_url"] == f"docs/operations.md#{name.lower()}"
        assert re.fullmatch(r"[0-9]+m", rule["for"]), name


def test_the_leak_alert_says_plain_concurrency_holders_show_too(
    alerts: dict[str, dict[str, Any]],
) -> None:
    assert "concurrency()" in alerts["PgwGpuSlotLeaked"]["annotations"]["description"]


def test_every_alert_has_a_promtool_test_that_fires_and_one_that_does_not() -> None:
    tests = yaml.safe_load((MONITORING / "alerts_test.yaml").read_text())
    assert tests["rule_files"] == ["../../charts/prefect-gpu-workers/files/alerts.yaml"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    assert firing == ALERTS
    assert quiet == ALERTS
