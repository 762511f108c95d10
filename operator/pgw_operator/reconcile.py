"""One reconcile pass for one pool: Deployment, work pool, backlog, limits, status.

The pure decisions live in api_url.py, desired.py, autoscale.py, plan.py and
status.py; this module only gathers their inputs and carries out their
outputs, in this order: check the pool's API URL (no request before that),
apply the Deployment and the disruption budget, ensure the work pool, read the
backlog and autoscale (scaling.py), read the limits, persist the ledger
(write-ahead), act on Prefect, write status.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgw_operator import kube, metrics
from pgw_operator.api_url import AllowedApiUrls, ApiUrl, ApiUrlRejected
from pgw_operator.autoscale import autoscaling_of
from pgw_operator.conditions import PoolHealth
from pgw_operator.desired import (
    desired_deployment,
    desired_pdb,
    desired_service_account,
    disabled_pdb_patch,
    disruption_of,
    foreign_controller,
    worker_service_account,
)
from pgw_operator.errors import KubernetesError, PrefectError, ReconcileError
from pgw_operator.facts import DELETION_COST_ANNOTATION, NodeFacts, PodFacts
from pgw_operator.plan import (
    Ledger,
    LimitAction,
    deletion_costs,
    desired_limit_names,
    plan_limits,
    settle,
    slot_entries,
)
from pgw_operator.pod_rules import PodPolicy, first_violations, violations
from pgw_operator.prefect_api import PrefectApi, gather_bounded
from pgw_operator.scaling import (
    ScalingState,
    autoscale,
    autoscaling_status_of,
    current_backlog,
    record_backlog,
)
from pgw_operator.spec import PoolSpec
from pgw_operator.status import action_events, failure_health, observed_health, status_body

EventFn = Callable[[str, str, str], None]  # (type, reason, message)
Logger = logging.Logger | logging.LoggerAdapter[Any]

LOG = logging.getLogger(__name__)


@dataclass
class PoolState:
    """What the reconciler remembers about one pool between passes."""

    ledger: Ledger
    ensured_work_pool: tuple[str, str] | None = None  # (api_url, work pool) already ensured
    written_status: dict[str, Any] | None = None  # skip patches that would change nothing
    scaling: ScalingState = field(default_factory=ScalingState)
    next_pass_s: float | None = None  # sooner than the resync, for autoscaling
    budget_off_generation: int | None = None  # generation whose unset budget was turned off
    worker_account_applied: bool = False  # the workers' ServiceAccount, this run


@dataclass(frozen=True)
class PoolRef:
    namespace: str
    name: str
    uid: str
    generation: int
    spec: Mapping[str, Any]
    status: Mapping[str, Any]


def checked_api_url(namespace: str, spec: PoolSpec, allowed: AllowedApiUrls) -> ApiUrl:
    """The pool's Prefect API URL if the operator may send it requests.

    Raises:
        ReconcileError: ``ApiUrlInvalid`` or ``ApiUrlNotAllowed``, naming the field and rule.
    """
    try:
        return allowed.check(spec.api_url, namespace)
    except ApiUrlRejected as exc:
        raise ReconcileError(exc.reason, str(exc)) from exc


async def prefect_api_for(namespace: str, spec: PoolSpec, allowed: AllowedApiUrls) -> PrefectApi:
    """A client for the pool's Prefect API, with the key read from its Secret.

    The URL is checked first: a pool whose URL is refused gets no request, and
    its key is not even read.
    """
    url = checked_api_url(namespace, spec, allowed)
    if spec.api_key is None:
        return PrefectApi(url)
    ref = spec.api_key
    try:
        key = await asyncio.to_thread(kube.read_secret_value, namespace, ref.name, ref.key)
    except KubernetesError as exc:
        raise KubernetesError(
            exc.reason, f"cannot read spec.prefect.apiKeySecretRef {ref.name}/{ref.key}: {exc}",
            exc.status,
        ) from exc  # fmt: skip
    return PrefectApi(url, key)


async def ensure_not_foreign(
    kind: str, pool: PoolRef, reason: str, name: str | None = None
) -> bool:
    """Whether an object of ``kind`` and ``name`` (the pool's name by default)
    exists (and is the pool's).

    Raises:
        ReconcileError: ``reason`` when one exists that the pool does not control:
            the operator never applies over, patches or adopts it.
    """
    name = name or pool.name
    refs = await asyncio.to_thread(kube.owner_references, kind, pool.namespace, name)
    if refs is None:
        return False
    who = foreign_controller(refs, pool.uid)
    if who is not None:
        raise ReconcileError(
            reason,
            f"{kind} {pool.namespace}/{name} exists and is not this pool's ({who}); "
            "the operator leaves it alone: rename the pool, or delete that object",
        )
    return True


async def ensure_worker_account(pool: PoolRef, state: PoolState) -> None:
    """The workers' own ServiceAccount, applied once per operator run (and again
    after the Deployment's pods were refused: someone may have deleted it).

    Raises:
        ReconcileError: ``ServiceAccountNotOwned`` when one of its name is someone
            else's; ``ServiceAccountRejected`` when the API server refuses it.
    """
    if state.worker_account_applied:
        return
    account = worker_service_account(pool.name)
    await ensure_not_foreign("ServiceAccount", pool, "ServiceAccountNotOwned", account)
    manifest = desired_service_account(pool.name, pool.namespace, pool.uid)
    await asyncio.to_thread(kube.apply_service_account, manifest)
    state.worker_account_applied = True


async def ensure_disruption_budget(pool: PoolRef, state: PoolState) -> None:
    """Apply the pool's PodDisruptionBudget, or turn off one left from an unset
    ``spec.disruption``; a budget of the pool's name that is not the pool's is
    never applied over or patched.

    Raises:
        ReconcileError: ``DisruptionBudgetNotOwned`` when the pool asks for a budget
            and one of its name is someone else's; ``DisruptionBudgetRejected`` when
            the API server refuses it.
    """
    manifest = desired_pdb(pool.name, pool.namespace, pool.uid, disruption_of(pool.spec))
    if manifest is not None:
        await ensure_not_foreign("PodDisruptionBudget", pool, "DisruptionBudgetNotOwned")
        await asyncio.to_thread(kube.apply_pdb, manifest)
        state.budget_off_generation = None
    elif state.budget_off_generation != pool.generation:
        # Once per spec change (and after a restart): usually none, nothing to do.
        # Someone else's budget of this name was never the pool's to turn off.
        try:
            ours = await ensure_not_foreign("PodDisruptionBudget", pool, "DisruptionBudgetNotOwned")
        except ReconcileError:
            ours = False
        if ours:
            await asyncio.to_thread(
                kube.patch_pdb_if_present, pool.namespace, pool.name, disabled_pdb_patch()
            )
        state.budget_off_generation = pool.generation


async def _write_status(pool: PoolRef, state: PoolState, status: dict[str, Any]) -> None:
    """Patch status unless this pass would write exactly what the last one did."""
    autoscaling = autoscaling_status_of(state.scaling, autoscaling_of(pool.spec), pool.status)
    if autoscaling is not None:
        status = {**status, "autoscaling": autoscaling}
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
        except KubernetesError as exc:
            if exc.status != 404:  # a pod that just went needs no cost
                log.warning(
                    "could not set deletion cost of pod %s (%s): %s", pod, exc.reason, exc,
                    extra={"status": exc.status},
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


def _status(pool: PoolRef, ledger: Ledger, health: PoolHealth) -> dict[str, Any]:
    return status_body(pool.name, pool.generation, pool.status, ledger, health)


async def reconcile_pool(
    pool: PoolRef,
    state: PoolState,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    emit: EventFn,
    log: Logger,
    allowed: AllowedApiUrls,
    pod_policy: PodPolicy,
) -> None:
    """One pass. Raises ReconcileError when it cannot finish (status then says why)."""
    spec = PoolSpec.from_dict(dict(pool.spec))
    # Before anything: a refused URL gets no worker either, nor does a pod template
    # that breaks a rule (a pool admitted before the rule, or without the policy).
    checked_api_url(pool.namespace, spec, allowed)
    found = violations(pool.spec, pod_policy)
    if found:
        raise ReconcileError("PodTemplateNotAllowed", "; ".join(first_violations(found)))
    await ensure_worker_account(pool, state)
    await ensure_not_foreign("Deployment", pool, "DeploymentNotOwned")
    pods_rejected = await asyncio.to_thread(
        kube.apply_deployment, desired_deployment(pool.name, pool.namespace, pool.uid, spec)
    )
    if pods_rejected:
        state.worker_account_applied = False  # apply it again next pass
    await ensure_disruption_budget(pool, state)
    live_pods = {name: pod for name, pod in pods.items() if not pod.finished}
    api = await prefect_api_for(pool.namespace, spec, allowed)
    try:
        if spec.create_work_pool and state.ensured_work_pool != (spec.api_url, spec.work_pool):
            if await api.ensure_work_pool(spec.work_pool):
                emit("Normal", "WorkPoolCreated", f"created Prefect work pool {spec.work_pool}")
            state.ensured_work_pool = (spec.api_url, spec.work_pool)

        auto = autoscaling_of(pool.spec)
        backlog = await current_backlog(api, spec, auto, state.scaling, log)
        if backlog is not None:
            record_backlog(pool.namespace, pool.name, backlog)
            if auto is not None:
                # Sets spec.replicas through /scale; the next pass applies it.
                await autoscale(pool.namespace, pool.name, spec, auto, backlog, state.scaling,
                                state.ledger, emit)  # fmt: skip
        state.next_pass_s = state.scaling.next_pass_s(auto)

        # Read exactly the limits that matter: the ledger's and the desired ones.
        names = set(state.ledger) | desired_limit_names(spec, pods)
        limits = await api.read_limits(names)
        plan = plan_limits(spec, state.ledger, pods, nodes, limits)
        if plan.ledger != state.ledger:
            # Write-ahead: the ledger names every limit before it exists.
            pending = PoolHealth(
                spec.replicas, len(live_pods), 0, len(plan.actions), tuple(plan.problems)
            )
            await _write_status(pool, state, _status(pool, plan.ledger, pending))
            state.ledger = plan.ledger

        outcomes = await _act_all(api, plan.actions)
        done = [action for action, error in outcomes if error is None]
        failure = next((error for _, error in outcomes if error is not None), None)
        for action in done:
            # The module's logger: kopf's object logger would post each line as an Event too.
            LOG.info("limit %s %s size=%s (%s)", action.kind, action.name, action.size, action.why)
        for reason, message in action_events(done):
            emit("Normal", reason, message)
        state.ledger = settle(plan, done)
    finally:
        await api.aclose()

    health = observed_health(
        spec.replicas,
        state.ledger,
        pods,
        tuple(plan.problems),
        error_reason=failure.reason if failure else None,
        error_message=str(failure) if failure else "",
        pods_rejected=pods_rejected,
    )
    await _write_status(pool, state, _status(pool, state.ledger, health))
    await _set_deletion_costs(pool, state.ledger, pods, log)
    record_metrics(pool, spec, state.ledger, health, done)
    if failure is not None:
        raise failure


def record_metrics(
    pool: PoolRef, spec: PoolSpec, ledger: Ledger, health: PoolHealth, done: list[LimitAction]
) -> None:
    labels = (pool.namespace, pool.name)
    live = [e for e in slot_entries(ledger) if e.state != "Deleting"]
    metrics.SLOTS_TOTAL.labels(*labels).set(sum(e.size for e in live))
    metrics.SLOTS_IN_USE.labels(*labels).set(sum(e.active_slots for e in live))
    metrics.WORKERS_READY.labels(*labels).set(health.ready_workers)
    metrics.WORKERS_DESIRED.labels(*labels).set(spec.replicas)
    for action in done:
        metrics.LIMIT_ACTIONS.labels(*labels, action.kind).inc()


async def report_failure(pool: PoolRef, state: PoolState, error: ReconcileError) -> None:
    """Status for a pass that failed before it could plan (Prefect unreachable...)."""
    spec = PoolSpec.from_dict(dict(pool.spec))
    health = failure_health(spec.replicas, pool.status, error.reason, str(error))
    await _write_status(pool, state, _status(pool, state.ledger, health))
