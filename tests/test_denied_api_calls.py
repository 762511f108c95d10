"""How the cluster tests recognise a refused Kubernetes API call in the operator's log."""

from __future__ import annotations

import json

from k8s.operator_harness import denied_api_calls, parse_metrics


def _record(message: str, **fields: object) -> str:
    return json.dumps({"message": message, "timestamp": "2026-11-27T06:45:40.403+00:00",
                       "severity": "info", **fields})  # fmt: skip


def test_numbers_in_timestamps_and_names_are_not_denials() -> None:
    log = "\n".join(
        [
            "[2026-11-27 06:45:40,403] kopf.objects [INFO] Handler 'pool_changed' succeeded.",
            _record("limit create gpu:pool-403-x7k2 size=1 (container limit)"),
            _record("reconcile took 0.403 s"),
        ]
    )
    assert denied_api_calls(log) == []


def test_each_way_a_denial_is_reported_is_found() -> None:
    lines = [
        # A failed pass, by the operator's structured reason field.
        _record(
            "reconcile failed (KubernetesForbidden), retry in 2s: ...", reason="KubernetesForbidden"
        ),
        # A failed side call, by its status field.
        _record("could not set deletion cost of pod p: HTTP 403 Forbidden", status=403),
        # kopf: a refused request, and its permission warnings.
        _record("Request attempt 1 failed; will retry: PATCH ... -> APIForbiddenError(...)"),
        _record("Not enough permissions to watch for resources: changes will not be noticed"),
        # A plain-format line.
        "[2026-11-27 06:45:40,403] kopf [WARNING] Not enough permissions to list namespaces.",
    ]
    assert denied_api_calls("\n".join(lines)) == lines


def test_parse_metrics_reads_labelled_samples() -> None:
    text = (
        "# HELP pgw_reconcile_errors_total Failed reconcile passes by reason\n"
        "# TYPE pgw_reconcile_errors_total counter\n"
        'pgw_reconcile_errors_total{namespace="ns",pool="p",reason="KubernetesForbidden"} 2.0\n'
    )
    assert parse_metrics(text) == {
        'pgw_reconcile_errors_total{namespace="ns",pool="p",reason="KubernetesForbidden"}': 2.0
    }
