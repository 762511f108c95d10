"""A pool's status conditions (``pgw_operator.conditions``)."""

from __future__ import annotations

from pgw_operator.conditions import PoolHealth, merge_conditions, pool_conditions


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
