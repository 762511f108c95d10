"""One reconcile pass for one pool: Deployment, work pool, limits, status.

The pure decisions live in desired.py, plan.py and conditions.py; this module
only gathers their inputs and carries out their outputs, in this order:
apply the Deployment, ensure the work pool, read the limits, persist the
ledger (write-ahead), act on Prefect, write status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import kubernetes

from pgw_operator import kube, metrics
from pgw_operator.conditions import PoolHealth, merge_conditions, pool_conditions
from pgw_operator.desired import desired_deployment, selector_string
from pgw_operator.errors import PrefectError, ReconcileError
from pgw_operator.facts import DELETION_COST_ANNOTATION, NodeFacts, PodFacts
from pgw_operator.plan import (
    Ledger,
    LimitAction,
    deletion_costs,
    desired_limit_names,
    ledger_to_status,
    plan_limits,
    settle,
)
from pgw_operator.prefect_api import PrefectApi, gather_bounded
from pgw_operator.spec import PoolSpec

EventFn = Callable[[str, str, str], None]  # (type, reason, message)
Logger = logging.Logger | logging.LoggerAdapter[Any]


@dataclass
class PoolState:
    """What the reconciler remembers about one pool between passes."""

    ledger: Ledger
    ensured_work_pool: tuple[str, str] | None = None  # (api_url, work pool) already ensured
    written_status: dict[str, Any] | None = None  # skip patches that would change nothing


@dataclass(frozen=True)
class PoolRef:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]


async def prefect_api_for(namespace: str, spec: PoolSpec) -> PrefectApi:
    """A client for the pool's Prefect API, with the key read from its Secret."""
    if spec.api_key is None:
        return PrefectApi(spec.api_url)
    ref = spec.api_key
    try:
        key = await asyncio.to_thread(kube.read_secret_value, namespace, ref.name, ref.key)
    except (KeyError, kubernetes.client.ApiException) as exc:
        raise ReconcileError(
            "ApiKeySecretUnavailable",
            f"cannot read spec.prefect.apiKeySecretRef {ref.name}/{ref.key}: {exc}",
        ) from exc
    return PrefectApi(spec.api_url, key)


async def _write_status(pool: PoolRef, state: PoolState, status: dict[str, Any]) -> None:
    """Patch status unless this pass would write exactly what the last one did."""
    if status == state.written_status:
        return
    await asyncio.to_thread(kube.patch_pool_status, pool.namespace, pool.name, status)
    state.written_status = status


async def _act(api: PrefectApi, action: LimitAction) -> None:
    if action.kind == "create":
        await api.create_limit(action.name, action.size)
    elif action.kind == "resize":
        await api.resize_limit(action.name, action.size)
    elif action.kind == "recreate":
        await api.recreate_limit(action.name, action.size)
    else:
        await api.delete_limit(action.name)


async def _set_deletion_costs(
    pool: PoolRef, ledger: Ledger, pods: Mapping[str, PodFacts], log: Logger
) -> None:
    """Steer scale-down toward idle workers; a failure here only costs that steering."""

    async def one(pod: str, cost: int) -> None:
        annotations = {DELETION_COST_ANNOTATION: str(cost)}
        try:
            await asyncio.to_thread(kube.annotate_pod, pool.namespace, pod, annotations)
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:  # a pod that just went needs no cost
                log.warning(
                    "could not set deletion cost of pod %s: HTTP %s %s", pod, exc.status,
                    exc.reason, extra={"status": exc.status},
                )  # fmt: skip

    await gather_bounded(one(pod, cost) for pod, cost in deletion_costs(ledger, pods).items())


async def _act_all(
    api: PrefectApi, actions: list[LimitAction]
) -> list[tuple[LimitAction, PrefectError | None]]:
    """Carry out independent limit actions, a few at a time; each reports its own error."""

    async def one(action: LimitAction) -> tuple[LimitAction, PrefectError | None]:
        try:
            await _act(api, action)
        except PrefectError as exc:
            return action, exc
        return action, None

    return await gather_bounded(one(a) for a in actions)


def status_body(
    pool: PoolRef, spec: PoolSpec, ledger: Ledger, health: PoolHealth
) -> dict[str, Any]:
    conditions, phase = pool_conditions(health)
    return {
        "observedGeneration": pool.generation,
        "phase": phase,
        "replicas": health.pods,
        "readyReplicas": health.ready_workers,
        "selector": selector_string(pool.name),
        "deployment": pool.name,
        "gpuSlots": sum(e.size for e in ledger.values() if e.state != "Deleting"),
        "workers": ledger_to_status(ledger),
        "conditions": merge_conditions(pool.status.get("conditions"), conditions, pool.generation),
    }


async def reconcile_pool(
    pool: PoolRef,
    state: PoolState,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    emit: EventFn,
    log: Logger,
) -> None:
    """One pass. Raises ReconcileError when it cannot finish (status then says why)."""
    spec = PoolSpec.from_dict(dict(pool.spec))
    try:
        await asyncio.to_thread(
            kube.apply_deployment, desired_deployment(pool.name, pool.namespace, pool.uid, spec)
        )
    except kubernetes.client.ApiException as exc:
        raise ReconcileError(
            "DeploymentRejected", f"worker Deployment: {exc.status} {exc.reason}: {exc.body}"
        ) from exc
    live_pods = {name: pod for name, pod in pods.items() if not pod.finished}
    api = await prefect_api_for(pool.namespace, spec)
    try:
        if spec.create_work_pool and state.ensured_work_pool != (spec.api_url, spec.work_pool):
            if await api.ensure_work_pool(spec.work_pool):
                emit("Normal", "WorkPoolCreated", f"created Prefect work pool {spec.work_pool}")
            state.ensured_work_pool = (spec.api_url, spec.work_pool)

        # Read exactly the limits that matter: the ledger's and the desired ones.
        names = set(state.ledger) | desired_limit_names(spec, pods)
        limits = await api.read_limits(names)
        plan = plan_limits(spec, state.ledger, pods, nodes, limits)
        if plan.ledger != state.ledger:
            # Write-ahead: the ledger names every limit before it exists.
            pending = PoolHealth(
                spec.replicas, len(live_pods), 0, len(plan.actions), tuple(plan.problems)
            )
            await _write_status(pool, state, status_body(pool, spec, plan.ledger, pending))
            state.ledger = plan.ledger

        outcomes = await _act_all(api, plan.actions)
        done = [action for action, error in outcomes if error is None]
        failure = next((error for _, error in outcomes if error is not None), None)
        for action in done:
            log.info("limit %s %s size=%s (%s)", action.kind, action.name, action.size, action.why)
            emit("Normal", f"Limit{action.kind.capitalize()}d",
                 f"{action.name}: {action.kind} size={action.size} ({action.why})")  # fmt: skip
        state.ledger = settle(plan, done)
    finally:
        await api.aclose()

    ready = sum(
        1
        for entry in state.ledger.values()
        if entry.state == "Ready" and (pod := pods.get(entry.pod)) is not None and pod.ready
    )
    pending_count = sum(1 for e in state.ledger.values() if e.state != "Ready")
    health = PoolHealth(
        desired_replicas=spec.replicas,
        pods=len(live_pods),
        ready_workers=ready,
        pending_limits=pending_count,
        problems=tuple(plan.problems),
        error_reason=failure.reason if failure else None,
        error_message=str(failure) if failure else "",
    )
    await _write_status(pool, state, status_body(pool, spec, state.ledger, health))
    await _set_deletion_costs(pool, state.ledger, pods, log)
    record_metrics(pool, spec, state.ledger, health, done)
    if failure is not None:
        raise failure


def record_metrics(
    pool: PoolRef, spec: PoolSpec, ledger: Ledger, health: PoolHealth, done: list[LimitAction]
) -> None:
    labels = (pool.namespace, pool.name)
    live = [e for e in ledger.values() if e.state != "Deleting"]
    metrics.SLOTS_TOTAL.labels(*labels).set(sum(e.size for e in live))
    metrics.SLOTS_IN_USE.labels(*labels).set(sum(e.active_slots for e in live))
    metrics.WORKERS_READY.labels(*labels).set(health.ready_workers)
    metrics.WORKERS_DESIRED.labels(*labels).set(spec.replicas)
    for action in done:
        metrics.LIMIT_ACTIONS.labels(*labels, action.kind).inc()


async def report_failure(pool: PoolRef, state: PoolState, error: ReconcileError) -> None:
    """Status for a pass that failed before it could plan (Prefect unreachable...)."""
    spec = PoolSpec.from_dict(dict(pool.spec))
    previous = pool.status
    health = PoolHealth(
        desired_replicas=spec.replicas,
        pods=int(previous.get("replicas") or 0),
        ready_workers=int(previous.get("readyReplicas") or 0),
        pending_limits=0,
        error_reason=error.reason,
        error_message=str(error),
    )
    await _write_status(pool, state, status_body(pool, spec, state.ledger, health))
