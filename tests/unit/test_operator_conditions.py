"""A pool's status conditions (``pgw_operator.conditions``)."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY

from pgw_operator import metrics
from pgw_operator.conditions import PoolHealth, is_degraded, merge_conditions, pool_conditions
from pgw_operator.reconcile import PoolRef, record_degraded
from pgw_operator.status import status_body


def test_conditions_ready_reconciling_degraded() -> None:
    ready, phase = pool_conditions(PoolHealth(2, 2, 2, 0))
    assert phase == "Ready"
    assert [(c.type, c.status) for c in ready] == [
        ("Ready", True),
        ("Reconciling", False),
        ("Degraded", False),
    ]
    scaling, phase = pool_conditions(PoolHealth(3, 2, 2, 1))
    assert phase == "Reconciling"
    assert scaling[0].status is False
    down, phase = pool_conditions(
        PoolHealth(2, 2, 2, 0, error_reason="PrefectUnreachable", error_message="refused")
    )
    assert phase == "Degraded"
    assert [(c.type, c.status, c.reason) for c in down][2] == (
        "Degraded",
        True,
        "PrefectUnreachable",
    )


def test_pods_the_cluster_refuses_degrade_the_pool_saying_why() -> None:
    """A pool stuck at zero pods (Pod Security, a quota) is never a silent zero."""
    why = "pods are forbidden: exceeded quota: tenant, requested: pods=1, limited: pods=0"
    conditions, phase = pool_conditions(PoolHealth(1, 0, 0, 0, pods_rejected=why))
    assert phase == "Degraded"
    degraded = next(c for c in conditions if c.type == "Degraded")
    assert (degraded.status, degraded.reason, degraded.message) == (
        True,
        "WorkerPodsRejected",
        why,
    )


def test_last_transition_time_moves_only_on_flips() -> None:
    first, _ = pool_conditions(PoolHealth(1, 1, 1, 0))
    before = merge_conditions(None, first, 1, now="2026-01-01T00:00:00Z")
    same = merge_conditions(before, first, 2, now="2026-01-02T00:00:00Z")
    assert [c["lastTransitionTime"] for c in same] == ["2026-01-01T00:00:00Z"] * 3
    assert {c["observedGeneration"] for c in same} == {2}
    flipped, _ = pool_conditions(PoolHealth(2, 1, 1, 0))
    after = merge_conditions(same, flipped, 3, now="2026-01-03T00:00:00Z")
    ready = next(c for c in after if c["type"] == "Ready")
    assert (ready["status"], ready["lastTransitionTime"]) == ("False", "2026-01-03T00:00:00Z")


# --- pgw_pool_degraded: 1 exactly while the status's Degraded condition is True -----------


DEGRADED_HEALTHS = [
    # (id, health, Degraded) -- every way conditions.pool_conditions can end
    ("ready", PoolHealth(2, 2, 2, 0), False),
    ("scaling", PoolHealth(3, 2, 2, 1), False),
    ("failed pass", PoolHealth(2, 2, 2, 0, error_reason="PrefectUnreachable"), True),
    ("limit sizing", PoolHealth(1, 1, 0, 0, problems=("no GPUs on node n",)), True),
    ("pods rejected", PoolHealth(1, 0, 0, 0, pods_rejected="pods are forbidden"), True),
]


@pytest.mark.parametrize(
    ("health", "degraded"),
    [(h, d) for _, h, d in DEGRADED_HEALTHS],
    ids=[i for i, _, _ in DEGRADED_HEALTHS],
)
def test_the_degraded_gauge_follows_the_status_condition(
    health: PoolHealth, degraded: bool
) -> None:
    pool = PoolRef("ns", f"pool-{uuid.uuid4().hex[:6]}", "u", 1, {}, {})
    status = status_body(pool.name, 1, {}, {}, health, now="2026-01-01T00:00:00Z")
    assert is_degraded(status["conditions"]) is degraded
    record_degraded(pool, status)
    labels = {"namespace": pool.namespace, "pool": pool.name}
    assert REGISTRY.get_sample_value("pgw_pool_degraded", labels) == float(degraded)


def test_the_degraded_gauge_goes_back_to_zero_and_with_the_pool() -> None:
    pool = PoolRef("ns", f"pool-{uuid.uuid4().hex[:6]}", "u", 1, {}, {})
    labels = {"namespace": pool.namespace, "pool": pool.name}
    failed = PoolHealth(1, 1, 1, 0, error_reason="PrefectUnreachable", error_message="refused")
    record_degraded(pool, status_body(pool.name, 1, {}, {}, failed))
    assert REGISTRY.get_sample_value("pgw_pool_degraded", labels) == 1.0
    record_degraded(pool, status_body(pool.name, 1, {}, {}, PoolHealth(1, 1, 1, 0)))
    assert REGISTRY.get_sample_value("pgw_pool_degraded", labels) == 0.0
    metrics.forget_pool(pool.namespace, pool.name)
    assert REGISTRY.get_sample_value("pgw_pool_degraded", labels) is None


def test_is_degraded_reads_the_written_form_only() -> None:
    assert is_degraded([{"type": "Degraded", "status": "True"}])
    assert not is_degraded([{"type": "Degraded", "status": "False"}])
    assert not is_degraded([{"type": "Ready", "status": "True"}])
