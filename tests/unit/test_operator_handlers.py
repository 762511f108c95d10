"""Deleting a pool forgets everything held for it, whatever its ledger held (no server)."""

from __future__ import annotations

import asyncio
import logging
import uuid

import kopf
from prometheus_client import REGISTRY

from pgw_operator import handlers, metrics
from pgw_operator.api_url import AllowedApiUrls
from pgw_operator.registry import PoolRegistry


def pool_body(namespace: str, name: str, status: dict[str, object]) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "gpuworkers.dev/v1alpha1",
            "kind": "GpuWorkerPool",
            "metadata": {"namespace": namespace, "name": name, "uid": "u"},
            "spec": {
                "workPool": {"name": "p"},
                "prefect": {"apiUrl": "http://127.0.0.1:9/api"},
                "gpu": {"perWorker": 1},
                "worker": {"image": "i"},
            },
            "status": status,
        }
    )


def series(namespace: str, pool: str) -> dict[str, float | None]:
    labels = {"namespace": namespace, "pool": pool}
    return {
        "desired": REGISTRY.get_sample_value("pgw_pool_workers_desired", labels),
        "passes": REGISTRY.get_sample_value("pgw_reconcile_duration_seconds_count", labels),
        "errors": REGISTRY.get_sample_value(
            "pgw_reconcile_errors_total", {**labels, "reason": "PrefectUnreachable"}
        ),
        "degraded": REGISTRY.get_sample_value("pgw_pool_degraded", labels),
    }


def test_deleting_a_pool_with_an_empty_ledger_forgets_its_gate_wakeup_and_metrics() -> None:
    namespace, pool = "ns", f"pool-{uuid.uuid4().hex[:6]}"
    key = (namespace, pool)
    handlers.POOLS.wakeup(key)
    handlers.POOLS.gate(key)
    metrics.WORKERS_DESIRED.labels(*key).set(2)
    metrics.RECONCILE_SECONDS.labels(*key).observe(0.1)
    metrics.RECONCILE_ERRORS.labels(*key, "PrefectUnreachable").inc()
    metrics.DEGRADED.labels(*key).set(1)
    assert all(value is not None for value in series(*key).values())

    body = pool_body(namespace, pool, {"workers": []})
    asyncio.run(handlers.delete_pool(body, logging.getLogger("test"), AllowedApiUrls(), records={}))
    assert key not in handlers.POOLS.pools()
    assert series(*key) == {"desired": None, "passes": None, "errors": None, "degraded": None}


def test_forget_drops_wakeup_and_gate_together() -> None:
    registry = PoolRegistry()
    event = registry.wakeup(("ns", "a"))
    registry.gate(("ns", "a"))
    registry.gate(("ns", "b"))
    registry.wake("ns", "a")
    registry.wake("ns", "unknown")  # a pool without a daemon: nothing to wake
    assert event.is_set()
    registry.forget(("ns", "a"))
    assert registry.pools() == {("ns", "b")}
    assert registry.wakeup(("ns", "a")) is not event


def test_unexpected_errors_report_their_type_only() -> None:
    error = handlers.as_reconcile_error(ValueError("invalid literal for int(): 'SECRET'"))
    assert error.reason == "InternalError"
    assert "SECRET" not in str(error)
    assert "ValueError" in str(error)


def test_a_deployment_event_is_work_only_when_what_a_pass_acts_on_changed() -> None:
    """Its replica counts change with every pod of a scale: the same generation and
    pod-creation failure again is no work; a new generation (drift) or a new failure is."""
    registry = PoolRegistry()
    key = ("ns", "a")
    event = registry.wakeup(key)
    registry.deployment_changed("ns", "a", ("3", None))
    assert registry.take(key).deployment
    event.clear()
    registry.deployment_changed("ns", "a", ("3", None))
    assert not event.is_set()
    assert not registry.take(key).deployment
    registry.deployment_changed("ns", "a", ("3", "pods are forbidden: exceeded quota"))
    assert event.is_set()
    assert registry.take(key).deployment
    registry.deployment_changed("ns", "a", ("4", "pods are forbidden: exceeded quota"))
    assert registry.take(key).deployment
