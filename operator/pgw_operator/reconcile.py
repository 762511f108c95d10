"""One reconcile pass for one pool: Deployment, work pool, backlog, limits, status.

The pure decisions live in api_url.py, desired.py, autoscale.py, plan.py,
worker_limits.py and status.py; this module only gathers their inputs and
carries out their outputs, in this order: check the pool's API URL (no request
before that), apply the Deployment and the disruption budget, ensure the work
pool, read the backlog and autoscale (scaling.py), plan the limits, write the
pods' GpuWorkerLimit objects ahead of Prefect, act on Prefect, write the
objects' outcome, write status.

A pass has a scope (:class:`PassScope`): a pod's event reconciles that pod's
limits only (O(1) calls whatever the pool's size, Prefect trusted to match the
Ready records); the Deployment's, the Deployment part only; a spec change or
the periodic resync, everything, with every limit read back from Prefect
(drift, active slots, orphans).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgw_operator import kube, metrics
from pgw_operator.api_url import AllowedApiUrls, ApiUrl, ApiUrlRejected
from pgw_operator.autoscale import autoscaling_of
from pgw_operator.conditions import PoolHealth, is_degraded
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
    PrefectLimit,
    deletion_costs,
    desired_limit_names,
    ledger_from_status,
    ledger_to_status,
    plan_limits,
    settle,
    slot_entries,
)
from pgw_operator.pod_rules import PodPolicy, first_violations, violations
from pgw_operator.prefect_api import CALL_DEADLINE_S, PrefectApi, gather_bounded
from pgw_operator.scaling import (
    ScalingState,
    autoscale,
    autoscaling_status_of,
    current_backlog,
    record_backlog,
)
from pgw_operator.spec import PoolSpec
from pgw_operator.status import action_events, failure_health, observed_health, status_body
from pgw_operator.worker_limits import (
    RecordWrite,
    WorkerLimitRecord,
    ledger_of,
    limit_manifest,
    record_writes,
    records_of,
)

EventFn = Callable[[str, str, str], None]  # (type, reason, message)
Logger = logging.Logger | logging.LoggerAdapter[Any]

LOG = logging.getLogger(__name__)


@dataclass
class PoolState:
    """What the reconciler remembers about one pool between passes."""

    ledger: Ledger
    # The pool's GpuWorkerLimit objects as last written (or read at start), by pod.
    records: dict[str, WorkerLimitRecord] = field(default_factory=dict)
    # status.workers still holds the ledger of a release before GpuWorkerLimit
    # objects: cleared once each of its entries has an object or is gone.
    legacy_ledger: bool = False
    ensured_work_pool: tuple[str, str] | None = None  # (api_url, work pool) already ensured
    written_status: dict[str, Any] | None = None  # skip patches that would change nothing
    scaling: ScalingState = field(default_factory=ScalingState)
    next_pass_s: float | None = None  # sooner than the resync, for autoscaling
    budget_off_generation: int | None = None  # generation whose unset budget was turned off
    worker_account_applied: bool = False  # the workers' ServiceAccount, this run
    pods_rejected: str | None = None  # why the Deployment's pods cannot be created
    # Limits whose create, recreate or resize got no answer (timeout, connection
    # lost), by when: Prefect may still carry it out, so a read that finds no such
    # limit proves nothing for UNCERTAIN_S; its record stays, and it is deleted again.
    uncertain: dict[str, float] = field(default_factory=dict)
    # What the last passes over pods saw, for the status written after them.
    problems: dict[str, None] = field(default_factory=dict)  # sizing problems, in order
    limit_failure: ReconcileError | None = None  # why the last pass over pods failed
    # The Prefect client of the last pass, kept while the pool's API and key stay.
    api: PrefectApi | None = None
    api_for: tuple[str, str | None, str | None] | None = None

    @classmethod
    def from_objects(
        cls, records: Mapping[str, WorkerLimitRecord], status: Mapping[str, Any] | None
    ) -> PoolState:
        """The state of a pool at start: its GpuWorkerLimit objects, and any entry of
        an older release's ledger in ``status.workers`` that no object holds yet."""
        ledger = ledger_of(records.values())
        legacy = ledger_from_status(status)
        ledger.update({name: e for name, e in legacy.items() if name not in ledger})
        return cls(ledger=ledger, records=dict(records), legacy_ledger=bool(legacy))

    async def aclose(self) -> None:
        if self.api is not None:
            await self.api.aclose()
        self.api, self.api_for = None, None


@dataclass(frozen=True)
class PassScope:
    """What one pass reconciles.

    Args:
        pool: the Deployment, budget, work pool and backlog.
        pods: the limits of these pods; None for every pod's, read back from Prefect.
    """

    pool: bool
    pods: frozenset[str] | None

    @classmethod
    def everything(cls) -> PassScope:
        return cls(pool=True, pods=None)

    @property
    def full(self) -> bool:
        return self.pool and self.pods is None


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


def _status(pool: PoolRef, state: PoolState, health: PoolHealth) -> dict[str, Any]:
    status = status_body(pool.name, pool.generation, pool.status, state.ledger, health)
    # An older release's ledger stays in status.workers until every entry of it
    # has an object (or is gone): a crash meanwhile must still find them all.
    held = {limit.name for record in state.records.values() for limit in record.limits}
    legacy = {name: entry for name, entry in state.ledger.items() if name not in held}
    if state.legacy_ledger:
        status["workers"] = ledger_to_status(legacy) if legacy else None
    return status


async def _write_status(pool: PoolRef, state: PoolState, status: dict[str, Any]) -> None:
    """Patch status unless this pass would write exactly what the last one did."""
    autoscaling = autoscaling_status_of(state.scaling, autoscaling_of(pool.spec), pool.status)
    if autoscaling is not None:
        status = {**status, "autoscaling": autoscaling}
    if status == state.written_status:
        return
    await asyncio.to_thread(kube.patch_pool_status, pool.namespace, pool.name, status)
    state.written_status = status
    if state.legacy_ledger and status.get("workers") is None:
        state.legacy_ledger = False  # cleared: every entry is in an object now


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


async def _write_record(
    namespace: str, write: RecordWrite, pods: Mapping[str, PodFacts], deleting_pods: set[str]
) -> None:
    record = write.record
    if write.kind == "create":
        assert record is not None
        pod = pods.get(write.pod)
        manifest = limit_manifest(record, namespace, pod.uid if pod is not None else "")
        await asyncio.to_thread(kube.create_worker_limit, manifest)
    elif write.kind == "spec":
        assert record is not None
        await asyncio.to_thread(kube.patch_worker_limit, namespace, write.pod, record.spec())
    else:
        deleting = write.pod in deleting_pods
        await asyncio.to_thread(kube.release_worker_limit, namespace, write.pod, deleting)


async def write_records(
    pool: PoolRef,
    state: PoolState,
    writes: list[RecordWrite],
    pods: Mapping[str, PodFacts],
    deleting: set[str] | None = None,
) -> None:
    """Carry out the writes to the pods' GpuWorkerLimit objects, a few pods at a time
    (a pod's own writes in order), and note each one done in ``state.records``.

    Raises:
        KubernetesError: the first pod's failed write (the other pods' went on).
    """
    by_pod: dict[str, list[RecordWrite]] = {}
    for write in writes:
        by_pod.setdefault(write.pod, []).append(write)
    failed: dict[str, KubernetesError] = {}

    async def one(pod: str, pod_writes: list[RecordWrite]) -> None:
        for write in pod_writes:
            try:
                await _write_record(pool.namespace, write, pods, deleting or set())
            except KubernetesError as exc:
                failed[pod] = exc
                return
            if write.kind == "release":
                state.records.pop(pod, None)
            elif write.record is not None:
                state.records[pod] = write.record

    await gather_bounded(one(pod, pod_writes) for pod, pod_writes in by_pod.items())
    if failed:
        raise failed[min(failed)]


def _trusted_limits(ledger: Ledger) -> dict[str, PrefectLimit]:
    """Prefect as the Ready entries say it is: a pass over a few pods trusts them
    (the periodic full pass reads every limit back and corrects drift)."""
    return {
        name: PrefectLimit(name, entry.size, True, entry.active_slots)
        for name, entry in ledger.items()
        if entry.state == "Ready"
    }


# How long a call without an answer may still be carried out by Prefect (a
# request queued in an overloaded server): twice the operator's own deadline.
UNCERTAIN_S = 2 * CALL_DEADLINE_S
_UNANSWERED = "PrefectUnreachable"  # a timeout or a lost connection: outcome unknown


def _unanswered_lately(state: PoolState, now: float) -> set[str]:
    """Limits whose last change got no answer within UNCERTAIN_S: a delete of one
    keeps its record (and is sent again) until Prefect cannot still create it."""
    return {name for name, when in state.uncertain.items() if now - when < UNCERTAIN_S}


@dataclass
class LimitsOutcome:
    done: list[LimitAction]
    failure: PrefectError | None
    problems: tuple[str, ...]


async def reconcile_limits(
    pool: PoolRef,
    state: PoolState,
    spec: PoolSpec,
    scope: PassScope,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    objects: Mapping[str, WorkerLimitRecord],
    api: PrefectApi,
    emit: EventFn,
) -> LimitsOutcome:
    """Plan the limits of the pods in scope, write their objects ahead, act, write the outcome.

    ``objects`` are the pool's GpuWorkerLimit objects as the watch shows them: one
    being deleted (by the garbage collector with its pod, or by hand) has its
    limits deleted now, and a pod still there gets new ones on its next pass.
    """
    if scope.pods is None:
        in_scope = set(pods) | {e.pod for e in state.ledger.values()} | set(state.records)
        in_scope |= set(objects)
    else:
        in_scope = set(scope.pods)
    ledger = {name: e for name, e in state.ledger.items() if e.pod in in_scope}
    deleting = {pod for pod in in_scope if (o := objects.get(pod)) is not None and o.deleting}
    scoped_pods = {
        name: pod for name, pod in pods.items() if name in in_scope and name not in deleting
    }
    if scope.pods is None:
        limits = await api.read_limits(set(ledger) | desired_limit_names(spec, scoped_pods))
    else:
        # Only what is not known Ready; a pod without an entry has no limit of ours
        # (one of its name made by hand answers the create with 409: it is resized).
        unsure = {name for name, e in ledger.items() if e.state != "Ready"}
        limits = {**_trusted_limits(ledger), **await api.read_limits(unsure)}
    now = time.monotonic()
    recent = _unanswered_lately(state, now)
    plan = plan_limits(spec, ledger, scoped_pods, nodes, limits)

    # Write-ahead: every limit about to be created is named in its pod's object first.
    ahead = [
        write
        for write in record_writes(state.records, records_of(pool.name, plan.ledger), in_scope)
        if write.kind != "release"
    ]
    await write_records(pool, state, ahead, pods)
    state.ledger = {**{n: e for n, e in state.ledger.items() if e.pod not in in_scope},
                    **plan.ledger}  # fmt: skip

    outcomes = await _act_all(api, plan.actions)
    done = [action for action, error in outcomes if error is None]
    failure = next((error for _, error in outcomes if error is not None), None)
    for action in done:
        # The module's logger: kopf's object logger would post each line as an Event too.
        LOG.info("limit %s %s size=%s (%s)", action.kind, action.name, action.size, action.why)
    for reason, message in action_events(done):
        emit("Normal", reason, message)
    for action, error in outcomes:
        if action.kind in ("create", "recreate", "resize"):
            if error is not None and error.reason == _UNANSWERED:
                state.uncertain[action.name] = now
            elif error is None:
                state.uncertain.pop(action.name, None)
    # A delete of a limit whose create may still land keeps its record until then.
    settled = settle(plan, [a for a in done if a.kind != "delete" or a.name not in recent])
    for action in done:
        if action.kind == "delete" and action.name not in recent:
            state.uncertain.pop(action.name, None)  # gone, and it cannot come back
    state.ledger = {**{n: e for n, e in state.ledger.items() if e.pod not in in_scope},
                    **settled}  # fmt: skip
    after = record_writes(state.records, records_of(pool.name, settled), in_scope)
    await write_records(pool, state, after, pods, deleting)
    return LimitsOutcome(done, failure, tuple(plan.problems))


async def _prefect_api(
    pool: PoolRef, state: PoolState, spec: PoolSpec, allowed: AllowedApiUrls, fresh: bool
) -> PrefectApi:
    """The pool's Prefect client: kept between passes while its URL and key reference
    stay; made anew (the key read again) when ``fresh``."""
    ref = spec.api_key
    wanted = (spec.api_url, ref.name if ref else None, ref.key if ref else None)
    checked_api_url(pool.namespace, spec, allowed)  # every pass: the allowlist may change
    if state.api is None or fresh or state.api_for != wanted:
        await state.aclose()
        state.api = await prefect_api_for(pool.namespace, spec, allowed)
        state.api_for = wanted
    return state.api


async def reconcile_pool(
    pool: PoolRef,
    state: PoolState,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    emit: EventFn,
    log: Logger,
    allowed: AllowedApiUrls,
    pod_policy: PodPolicy,
    scope: PassScope | None = None,
    objects: Mapping[str, WorkerLimitRecord] | None = None,
) -> None:
    """One pass over ``scope`` (everything by default).

    Raises:
        ReconcileError: it could not finish (status then says why).
    """
    scope = scope or PassScope.everything()
    objects = objects if objects is not None else state.records
    spec = PoolSpec.from_dict(dict(pool.spec))
    # Before anything: a refused URL gets no worker either, nor does a pod template
    # that breaks a rule (a pool admitted before the rule, or without the policy).
    checked_api_url(pool.namespace, spec, allowed)
    found = violations(pool.spec, pod_policy)
    if found:
        raise ReconcileError("PodTemplateNotAllowed", "; ".join(first_violations(found)))
    if scope.pool:
        await ensure_worker_account(pool, state)
        await ensure_not_foreign("Deployment", pool, "DeploymentNotOwned")
        state.pods_rejected = await asyncio.to_thread(
            kube.apply_deployment, desired_deployment(pool.name, pool.namespace, pool.uid, spec)
        )
        if state.pods_rejected:
            state.worker_account_applied = False  # apply it again next pass
        await ensure_disruption_budget(pool, state)
    api = await _prefect_api(pool, state, spec, allowed, fresh=scope.full)
    async with _key_read_again_if_refused(state):
        if scope.pool:
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
        outcome = LimitsOutcome([], None, ())
        if scope.pods is None or scope.pods:
            outcome = await reconcile_limits(
                pool, state, spec, scope, pods, nodes, objects, api, emit
            )

    if scope.pods is None:
        state.problems = dict.fromkeys(outcome.problems)
    else:
        state.problems.update(dict.fromkeys(outcome.problems))
    state.limit_failure = outcome.failure
    await write_pool_status(pool, state, spec, pods)
    if scope.pods is None:
        await _set_deletion_costs(pool, state.ledger, pods, log)
    record_metrics(pool, spec, state.ledger, outcome.done)
    if outcome.failure is not None:
        raise outcome.failure


@contextlib.asynccontextmanager
async def _key_read_again_if_refused(state: PoolState) -> AsyncIterator[None]:
    """Prefect answered 401: the pool's client is closed, so the next pass reads the
    API key again (a rotated Secret), whichever pass met it."""
    try:
        yield
    except PrefectError as exc:
        if exc.reason == "PrefectUnauthorized":
            await state.aclose()
        raise


async def reconcile_pods(
    pool: PoolRef,
    state: PoolState,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    emit: EventFn,
    allowed: AllowedApiUrls,
    scope: frozenset[str],
    objects: Mapping[str, WorkerLimitRecord],
) -> None:
    """A pass over the limits of a few pods, beside other such passes (disjoint pods):
    no Deployment, no status (the daemon writes it after, coalesced).

    Raises:
        ReconcileError: it could not finish; the pods' limits wait for the next pass.
    """
    spec = PoolSpec.from_dict(dict(pool.spec))
    api = await _prefect_api(pool, state, spec, allowed, fresh=False)
    async with _key_read_again_if_refused(state):
        outcome = await reconcile_limits(
            pool, state, spec, PassScope(pool=False, pods=scope), pods, nodes, objects, api, emit
        )
    state.problems.update(dict.fromkeys(outcome.problems))
    state.limit_failure = outcome.failure
    record_metrics(pool, spec, state.ledger, outcome.done)
    if outcome.failure is not None:
        raise outcome.failure


async def write_pool_status(
    pool: PoolRef, state: PoolState, spec: PoolSpec, pods: Mapping[str, PodFacts]
) -> None:
    """The pool's status from what the passes so far saw (unless it would not change)."""
    failure = state.limit_failure
    health = observed_health(
        spec.replicas,
        state.ledger,
        pods,
        tuple(state.problems),
        error_reason=failure.reason if failure else None,
        error_message=str(failure) if failure else "",
        pods_rejected=state.pods_rejected,
    )
    status = _status(pool, state, health)
    record_degraded(pool, status)
    await _write_status(pool, state, status)
    labels = (pool.namespace, pool.name)
    metrics.WORKERS_READY.labels(*labels).set(health.ready_workers)


def record_degraded(pool: PoolRef, status: Mapping[str, Any]) -> None:
    """``pgw_pool_degraded`` from the conditions of the status about to be written.

    Set before the write and whether or not the write is skipped as unchanged:
    a write that fails fails the pass, whose status is Degraded in turn, and a
    restarted operator reports the gauge on its first pass.
    """
    degraded = is_degraded(status.get("conditions") or [])
    metrics.DEGRADED.labels(pool.namespace, pool.name).set(1 if degraded else 0)


def record_metrics(pool: PoolRef, spec: PoolSpec, ledger: Ledger, done: list[LimitAction]) -> None:
    labels = (pool.namespace, pool.name)
    live = [e for e in slot_entries(ledger) if e.state != "Deleting"]
    metrics.SLOTS_TOTAL.labels(*labels).set(sum(e.size for e in live))
    metrics.SLOTS_IN_USE.labels(*labels).set(sum(e.active_slots for e in live))
    metrics.WORKERS_DESIRED.labels(*labels).set(spec.replicas)
    for action in done:
        metrics.LIMIT_ACTIONS.labels(*labels, action.kind).inc()


async def report_failure(pool: PoolRef, state: PoolState, error: ReconcileError) -> None:
    """Status for a pass that failed before it could plan (Prefect unreachable...)."""
    spec = PoolSpec.from_dict(dict(pool.spec))
    health = failure_health(spec.replicas, pool.status, error.reason, str(error))
    status = _status(pool, state, health)
    record_degraded(pool, status)
    await _write_status(pool, state, status)
