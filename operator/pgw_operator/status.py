"""A pool's status and health: pure functions of what one pass saw.

``reconcile.py`` gathers the inputs and writes the result; the conditions
themselves (Ready / Reconciling / Degraded, phase) come from conditions.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pgw_operator.conditions import PoolHealth, merge_conditions, pool_conditions
from pgw_operator.desired import selector_string
from pgw_operator.facts import PodFacts
from pgw_operator.plan import Ledger, LimitAction, slot_entries


def observed_health(
    desired_replicas: int,
    ledger: Ledger,
    pods: Mapping[str, PodFacts],
    problems: tuple[str, ...] = (),
    error_reason: str | None = None,
    error_message: str = "",
    pods_rejected: str | None = None,
) -> PoolHealth:
    """Health after a pass that planned: workers ready with a Ready slot limit (each
    pod counted once), pending changes (of every limit, memory limits too)."""
    ready = len(
        {
            entry.pod
            for entry in slot_entries(ledger)
            if entry.state == "Ready" and (pod := pods.get(entry.pod)) is not None and pod.ready
        }
    )
    return PoolHealth(
        desired_replicas=desired_replicas,
        pods=sum(1 for pod in pods.values() if not pod.finished),
        ready_workers=ready,
        pending_limits=sum(1 for e in ledger.values() if e.state != "Ready"),
        problems=problems,
        error_reason=error_reason,
        error_message=error_message,
        pods_rejected=pods_rejected,
    )


def failure_health(
    desired_replicas: int, previous: Mapping[str, Any], reason: str, message: str
) -> PoolHealth:
    """Health for a pass that failed before it could plan: counts kept from the last status."""
    return PoolHealth(
        desired_replicas=desired_replicas,
        pods=int(previous.get("replicas") or 0),
        ready_workers=int(previous.get("readyReplicas") or 0),
        pending_limits=0,
        error_reason=reason,
        error_message=message,
    )


def status_body(
    pool: str,
    generation: int,
    previous: Mapping[str, Any],
    ledger: Ledger,
    health: PoolHealth,
    now: str | None = None,
) -> dict[str, Any]:
    """The whole ``status`` of a pool (``previous`` keeps conditions' transition times):
    counts and conditions, bounded whatever the pool's size (each worker's limits
    are its GpuWorkerLimit object)."""
    conditions, phase = pool_conditions(health)
    return {
        "observedGeneration": generation,
        "phase": phase,
        "replicas": health.pods,
        "readyReplicas": health.ready_workers,
        "selector": selector_string(pool),
        "deployment": pool,
        "gpuSlots": sum(e.size for e in slot_entries(ledger) if e.state != "Deleting"),
        "pendingLimits": health.pending_limits,
        "conditions": merge_conditions(previous.get("conditions"), conditions, generation, now),
    }


# One Event per limit action up to this many of a kind in a pass; beyond it,
# one Event for them all: a scale of 1000 pods must not post 1000 Events (each
# an API write, posted one by one) while the operator races its pods.
EVENTS_PER_KIND = 5


def action_events(
    actions: list[LimitAction], per_kind: int = EVENTS_PER_KIND
) -> list[tuple[str, str]]:
    """The (reason, message) Events for the limit actions of one pass.

    Example:
        >>> action_events([LimitAction("create", "gpu:a", 2, "pod a bound")])
        [('LimitCreated', 'gpu:a: create size=2 (pod a bound)')]
    """
    events: list[tuple[str, str]] = []
    kinds = sorted({action.kind for action in actions})
    for kind in kinds:
        done = [a for a in actions if a.kind == kind]
        reason = f"Limit{kind.capitalize()}d"
        if len(done) <= per_kind:
            events += [(reason, f"{a.name}: {a.kind} size={a.size} ({a.why})") for a in done]
            continue
        shown = ", ".join(a.name for a in done[:per_kind])
        events.append(
            (reason, f"{len(done)} limits: {kind} ({shown} and {len(done) - per_kind} more)")
        )
    return events
