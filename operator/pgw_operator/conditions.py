"""Status conditions a pool reports, shaped like metav1.Condition, and the phase.

kstatus (Flux, `kubectl wait`) reads ``Ready``, ``Reconciling`` and the
abnormal-true ``Degraded``; the Argo CD health check reads the same.
``lastTransitionTime`` only moves when a condition's status flips.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool
    reason: str
    message: str


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_conditions(
    previous: Iterable[Mapping[str, Any]] | None,
    current: Iterable[Condition],
    generation: int,
    now: str | None = None,
) -> list[dict[str, Any]]:
    """New condition list, keeping lastTransitionTime for conditions that did not flip."""
    stamp = now or now_rfc3339()
    before = {c.get("type"): c for c in previous or []}
    merged = []
    for cond in current:
        status = "True" if cond.status else "False"
        old = before.get(cond.type)
        changed = old is None or old.get("status") != status
        since = stamp if old is None or changed else old.get("lastTransitionTime", stamp)
        merged.append(
            {
                "type": cond.type,
                "status": status,
                "reason": cond.reason,
                "message": cond.message,
                "lastTransitionTime": since,
                "observedGeneration": generation,
            }
        )
    return merged


@dataclass(frozen=True)
class PoolHealth:
    """What one reconcile saw, reduced to the inputs of the conditions."""

    desired_replicas: int
    pods: int
    ready_workers: int  # pod Ready and its limit Ready
    pending_limits: int
    problems: tuple[str, ...] = ()
    error_reason: str | None = None  # e.g. PrefectUnreachable
    error_message: str = ""
    # Why the worker Deployment's pods cannot be created (Pod Security, a
    # quota): a pool that stays at zero pods says why.
    pods_rejected: str | None = None


def pool_conditions(health: PoolHealth) -> tuple[list[Condition], str]:
    """Conditions and phase for a pool."""
    if health.error_reason:
        return (
            [
                Condition("Ready", False, health.error_reason, health.error_message),
                Condition("Reconciling", True, health.error_reason, "retrying with backoff"),
                Condition("Degraded", True, health.error_reason, health.error_message),
            ],
            "Degraded",
        )
    degraded = Condition("Degraded", False, "AsExpected", "")
    if health.problems:
        degraded = Condition("Degraded", True, "LimitSizing", "; ".join(health.problems))
    if health.pods_rejected:
        degraded = Condition("Degraded", True, "WorkerPodsRejected", health.pods_rejected)
    converged = (
        health.pods == health.desired_replicas
        and health.ready_workers == health.desired_replicas
        and health.pending_limits == 0
    )
    problems = bool(health.problems or health.pods_rejected)
    if converged and not problems:
        ready = Condition(
            "Ready", True, "WorkersReady",
            f"{health.ready_workers}/{health.desired_replicas} workers ready with their limits",
        )  # fmt: skip
        return [ready, Condition("Reconciling", False, "Converged", ""), degraded], "Ready"
    message = (
        f"{health.ready_workers}/{health.desired_replicas} workers ready, "
        f"{health.pods} pods, {health.pending_limits} limit change(s) pending"
    )
    phase = "Degraded" if problems else "Reconciling"
    return (
        [
            Condition("Ready", False, "WorkersNotReady", message),
            Condition("Reconciling", True, "ScalingOrStarting", message),
            degraded,
        ],
        phase,
    )


def is_degraded(conditions: Iterable[Mapping[str, Any]]) -> bool:
    """Whether a status's conditions (as written, ``status: "True"``) say Degraded.

    What ``pgw_pool_degraded`` reports: it follows the condition the pool's
    status shows, whatever made it (a failed pass, limit sizing, rejected pods).

    Example:
        >>> is_degraded([{"type": "Ready", "status": "False"},
        ...              {"type": "Degraded", "status": "True"}])
        True
        >>> is_degraded([])
        False
    """
    return any(c.get("type") == "Degraded" and c.get("status") == "True" for c in conditions)
