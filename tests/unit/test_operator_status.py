"""A pool's status and health (pgw_operator.status): pure functions of one pass."""

from __future__ import annotations

from pgw_operator.facts import PodFacts
from pgw_operator.plan import LedgerEntry, LimitAction
from pgw_operator.status import action_events, failure_health, observed_health, status_body


def entry(pod: str, state: str = "Ready", size: int = 2) -> LedgerEntry:
    return LedgerEntry(f"gpu:{pod}", pod, "node-1", size, "1", 0, state)  # type: ignore[arg-type]


def pod(name: str, ready: bool = True, phase: str = "Running") -> PodFacts:
    return PodFacts(name, "node-1", phase, terminating=False, ready=ready, restarts=0)


def test_observed_health_counts_ready_workers_with_ready_limits_and_pending_changes() -> None:
    ledger = {e.limit_name: e for e in [entry("a"), entry("b", "Creating"), entry("c")]}
    pods = {"a": pod("a"), "b": pod("b"), "c": pod("c", ready=False), "d": pod("d", phase="Failed")}
    health = observed_health(3, ledger, pods, ("a problem",))
    assert (health.pods, health.ready_workers, health.pending_limits) == (3, 1, 1)
    assert health.problems == ("a problem",)
    assert health.error_reason is None


def test_failure_health_keeps_the_last_counts_and_carries_the_reason() -> None:
    health = failure_health(2, {"replicas": 2, "readyReplicas": 1}, "PrefectUnreachable", "m")
    assert (health.pods, health.ready_workers, health.pending_limits) == (2, 1, 0)
    assert (health.error_reason, health.error_message) == ("PrefectUnreachable", "m")


def test_status_body_is_the_whole_status() -> None:
    ledger = {e.limit_name: e for e in [entry("a"), entry("b", "Deleting")]}
    health = observed_health(1, ledger, {"a": pod("a")})
    status = status_body("pool", 4, {}, ledger, health, now="2026-01-01T00:00:00Z")
    assert status["observedGeneration"] == 4
    assert status["phase"] == "Reconciling"  # a limit is still being deleted
    assert status["gpuSlots"] == 2  # a Deleting limit no longer counts
    assert status["selector"] == "gpuworkers.dev/pool=pool"
    assert status["deployment"] == "pool"
    assert status["pendingLimits"] == 1
    # Counts and conditions only: the limits themselves are GpuWorkerLimit objects.
    assert "workers" not in status
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert ready["observedGeneration"] == 4


def test_a_failure_is_degraded_with_its_reason_and_message() -> None:
    health = failure_health(1, {}, "ApiUrlNotAllowed", "spec.prefect.apiUrl is not allowed")
    status = status_body("pool", 1, {}, {}, health)
    assert status["phase"] == "Degraded"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApiUrlNotAllowed")
    assert degraded["message"] == "spec.prefect.apiUrl is not allowed"


def test_a_few_limit_actions_get_an_event_each_and_many_one_for_all() -> None:
    few = [LimitAction("create", f"gpu:p{i}", 2, f"pod p{i} bound") for i in range(3)]
    assert action_events(few) == [
        ("LimitCreated", f"gpu:p{i}: create size=2 (pod p{i} bound)") for i in range(3)
    ]
    many = [LimitAction("delete", f"gpu:q{i}", 0, "pod gone") for i in range(40)]
    resized = [LimitAction("resize", "gpu:r", 4, "GPUs changed")]
    events = action_events([*many, *resized], per_kind=5)
    assert events == [
        ("LimitDeleted", "40 limits: delete (gpu:q0, gpu:q1, gpu:q2, gpu:q3, gpu:q4 and 35 more)"),
        ("LimitResized", "gpu:r: resize size=4 (GPUs changed)"),
    ]
    assert action_events([]) == []
