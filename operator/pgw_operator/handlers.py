"""Kopf wiring: indexes, wake-ups, one reconcile daemon per pool, and deletion cleanup.

Every change that matters (the pool, its pods, their GpuWorkerLimit objects,
its Deployment, a timer) leads to the same single reconcile loop per pool, so
exactly one writer touches a pool's limits and status. Handlers only say what
changed (a pod by name, the Deployment); the loop reconciles just that, from
in-memory indexes, not API reads. A standby replica (``--leader-elect``) keeps
the indexes warm and writes nothing until it leads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from pgw_operator import kube, metrics
from pgw_operator.api_url import AllowedApiUrls
from pgw_operator.desired import replica_failure
from pgw_operator.errors import ReconcileError
from pgw_operator.facts import NodeFacts, PodFacts
from pgw_operator.leader import Leadership
from pgw_operator.plan import cleanup_deadline, ledger_from_status
from pgw_operator.pod_rules import PodPolicy
from pgw_operator.prefect_api import gather_bounded
from pgw_operator.reconcile import (
    EventFn,
    Logger,
    PassScope,
    PoolRef,
    PoolState,
    checked_api_url,
    prefect_api_for,
    reconcile_pods,
    reconcile_pool,
    report_failure,
    write_pool_status,
)
from pgw_operator.registry import PendingWork, PoolKey, PoolRegistry
from pgw_operator.spec import GROUP, PLURAL, POOL_LABEL, VERSION, PoolSpec
from pgw_operator.worker_limits import LIMIT_PLURAL, WorkerLimitRecord, ledger_of

RESYNC_S = 30.0  # full pass: garbage collection, drift, active-slot counts
# A Deployment's status changes many times while it scales: its pass (apply,
# budget, backlog) runs at most this often; pod passes are not held by it.
DEPLOYMENT_PASS_EVERY_S = 2.0
# Passes over pods of one pool at once, each over at most POD_PASS_PODS pods (a
# few Kubernetes and Prefect calls each): a pod bound while others are handled
# starts at once, not after them.
POD_PASSES_AT_ONCE = 16
POD_PASS_PODS = 4
# The status after passes over pods is written at most this often (its counts).
STATUS_EVERY_S = 1.0
MAX_BACKOFF_S = 60.0
# How long a standby's deletion handler waits to lead before kopf retries it.
STANDBY_DELETE_WAIT_S = 60.0

# Wake-ups and locks of the pools this process serves.
POOLS = PoolRegistry()


def allowed_api_urls(memo: kopf.Memo) -> AllowedApiUrls:
    """The operator's allowlist, passed by ``__main__`` in kopf's memo; none allows nothing."""
    allowed = memo.get("allowed_api_urls")
    return allowed if isinstance(allowed, AllowedApiUrls) else AllowedApiUrls()


def pod_policy(memo: kopf.Memo) -> PodPolicy:
    """What the admin allows pools' pods beyond the fixed rules (``__main__``'s flags)."""
    policy = memo.get("pod_policy")
    return policy if isinstance(policy, PodPolicy) else PodPolicy()


def leadership(memo: kopf.Memo) -> Leadership:
    """The replica's leadership (``__main__``'s ``--leader-elect``); without it, always leading."""
    found = memo.get("leadership")
    return found if isinstance(found, Leadership) else Leadership.always()


def backoff_delay(failures: int) -> float:
    return float(min(MAX_BACKOFF_S, 2 ** max(0, failures)))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    kube.load_config()
    # Blocking Kubernetes calls run on threads (asyncio.to_thread): as many as
    # connections, so that passes over pods side by side do not queue for threads.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=kube.CONNECTIONS, thread_name_prefix="pgw-kube")
    )
    # Unset, watches can stall silently (kopf #585, #847, #957).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Keep kopf's bookkeeping in annotations: the status schema is ours.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/limits-cleanup"
    settings.posting.level = logging.INFO
    # httpx logs every request at INFO: a line per Prefect call, thousands in a scale.
    logging.getLogger("httpx").setLevel(logging.WARNING)


@kopf.index("pods", labels={POOL_LABEL: kopf.PRESENT})
async def pods_by_pool(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    **_: Any,
) -> dict[PoolKey, PodFacts]:
    return {(namespace or "", labels[POOL_LABEL]): PodFacts.from_pod(name, spec, status, meta)}


@kopf.index("pods", labels={POOL_LABEL: kopf.PRESENT})
async def pod_by_name(
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    **_: Any,
) -> dict[PodKey, PodFacts]:
    """The same facts by pod: a pass over a few pods looks them up, O(1) each."""
    return {(namespace or "", name): PodFacts.from_pod(name, spec, status, meta)}


@kopf.index("nodes")
async def nodes_by_name(
    name: str, status: kopf.Status, labels: Mapping[str, str], **_: Any
) -> dict[str, NodeFacts]:
    return {name: NodeFacts.from_node(name, status, labels)}


@kopf.index(GROUP, VERSION, LIMIT_PLURAL)
async def worker_limits_by_pool(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[PoolKey, WorkerLimitRecord]:
    record = WorkerLimitRecord.from_object(body)
    return {(namespace or "", record.pool): record}


@kopf.index(GROUP, VERSION, LIMIT_PLURAL)
async def worker_limit_by_pod(
    namespace: str | None, body: kopf.Body, **_: Any
) -> dict[PodKey, WorkerLimitRecord]:
    record = WorkerLimitRecord.from_object(body)
    return {(namespace or "", record.pod): record}


@kopf.index(GROUP, VERSION, PLURAL)
async def pools_by_key(namespace: str | None, name: str, **_: Any) -> dict[PoolKey, bool]:
    return {(namespace or "", name): True}


@kopf.on.event("pods", labels={POOL_LABEL: kopf.PRESENT})
async def pod_changed(
    namespace: str | None, name: str, labels: Mapping[str, str], **_: Any
) -> None:
    POOLS.pod_changed(namespace, labels.get(POOL_LABEL), name)


@kopf.on.event(GROUP, VERSION, LIMIT_PLURAL)
async def worker_limit_changed(
    type: str | None,
    namespace: str | None,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: Logger,
    **kwargs: Any,
) -> None:
    """An object deleted (by the garbage collector with its pod, or by hand): its
    pod's limits go. The operator's own writes need no pass (they echo back here)."""
    if type != "DELETED" and not body.metadata.get("deletionTimestamp"):
        return
    record = WorkerLimitRecord.from_object(body)
    pools: kopf.Index[PoolKey, bool] = kwargs["pools_by_key"]
    key: PoolKey = (namespace or "", record.pool)
    if key in pools:
        POOLS.pod_changed(namespace, record.pool, record.pod)
    elif type != "DELETED" and leadership(memo).is_leading:
        await release_orphan(key, body, logger)


async def release_orphan(key: PoolKey, body: kopf.Body, logger: Logger) -> None:
    """An object being deleted whose pool is gone (its finalizer was removed by hand):
    nothing says where its limits live any more, so it goes, and says so."""
    names = [limit.name for limit in WorkerLimitRecord.from_object(body).limits]

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    why = f"pool {key[0]}/{key[1]} is gone, so its Prefect API is unknown"
    _left_behind(logger, emit, "PoolGone", why, names)
    await asyncio.to_thread(kube.release_worker_limit, key[0], body.metadata.name or "")


@kopf.on.event("apps", "v1", "deployments", labels={POOL_LABEL: kopf.PRESENT})
async def deployment_changed(
    namespace: str | None, labels: Mapping[str, str], meta: kopf.Meta, status: kopf.Status, **_: Any
) -> None:
    # Only what a pass acts on: its spec (drift: a new generation) and whether its
    # pods can be created. Its replica counts change with every pod of a scale.
    conditions = [dict(c) for c in status.get("conditions") or []]
    seen = (str(meta.get("generation")), replica_failure(conditions))
    POOLS.deployment_changed(namespace, labels.get(POOL_LABEL), seen)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def pool_changed(namespace: str | None, name: str, **_: Any) -> None:
    # The daemon compares generation and annotations: its own status writes cost no pass.
    POOLS.wake(namespace, name)


def _pool_ref(body: kopf.Body) -> PoolRef:
    return PoolRef(
        namespace=body.metadata.namespace or "",
        name=body.metadata.name or "",
        uid=body.metadata.uid or "",
        generation=int(body.metadata.get("generation") or 0),
        spec=dict(body.spec),
        status=dict(body.status),
    )


def _pods_of(index: kopf.Index[PoolKey, PodFacts], key: PoolKey) -> dict[str, PodFacts]:
    return {pod.name: pod for pod in index.get(key, [])}


PodKey = tuple[str, str]  # (namespace, pod name)


def _some_of(
    index: kopf.Index[PodKey, Any], namespace: str, names: frozenset[str]
) -> dict[str, Any]:
    """The index's entries for a few pods, by pod name: O(pods asked), not O(pool)."""
    found: dict[str, Any] = {}
    for name in names:
        store = index.get((namespace, name))
        if store:
            found[name] = next(iter(store))
    return found


def _nodes(index: kopf.Index[str, NodeFacts]) -> dict[str, NodeFacts]:
    return {name: next(iter(store)) for name, store in index.items() if store}


def _records_of(
    index: kopf.Index[PoolKey, WorkerLimitRecord], key: PoolKey
) -> dict[str, WorkerLimitRecord]:
    return {record.pod: record for record in index.get(key, [])}


@dataclass(frozen=True)
class PoolSeen:
    """What of the pool decides a pass: its spec but replicas, its annotations,
    its replicas (a scale needs the Deployment's pass, not every limit read back)."""

    spec: str
    annotations: frozenset[tuple[str, str]]
    replicas: int


def pool_seen(body: kopf.Body) -> PoolSeen:
    spec = {k: v for k, v in body.spec.items() if k != "replicas"}
    return PoolSeen(
        json.dumps(spec, sort_keys=True, default=str),
        frozenset((body.metadata.annotations or {}).items()),
        int(body.spec.get("replicas") or 0),
    )


@dataclass
class PassClock:
    """When the daemon last finished each kind of pass, and so what the next one covers."""

    # What the last full pass saw: a spec change, or an annotation (a nudge, as
    # `kubectl annotate`), asks for a full pass, a scale for the Deployment's;
    # the operator's own status writes change none of it.
    seen: PoolSeen | None = None
    replicas: int | None = None  # as the last pass over the Deployment saw them
    full_at: float = float("-inf")
    pool_at: float = float("-inf")
    pool_due_at: float | None = None  # autoscaling asks for a pool pass then

    def scope(self, now: float, seen: PoolSeen, work: PendingWork) -> PassScope | None:
        """The next pass's scope, or None when nothing is due."""
        last = self.seen
        if last is None or (seen.spec, seen.annotations) != (last.spec, last.annotations):
            return PassScope.everything()
        if now - self.full_at >= RESYNC_S:
            return PassScope.everything()
        pool = (
            seen.replicas != self.replicas
            or (self.pool_due_at is not None and now >= self.pool_due_at)
            or (work.deployment and now - self.pool_at >= DEPLOYMENT_PASS_EVERY_S)
        )
        if not pool and not work.pods:
            return None
        return PassScope(pool=pool, pods=frozenset(work.pods))

    def passed(
        self, scope: PassScope, now: float, seen: PoolSeen, next_pool_s: float | None
    ) -> None:
        if scope.full:
            self.seen, self.full_at = seen, now
        if scope.pool:
            self.pool_at, self.replicas = now, seen.replicas
            self.pool_due_at = now + next_pool_s if next_pool_s is not None else None

    def wait_s(self, now: float, work: PendingWork) -> float:
        """How long until the next pass is due without a change."""
        due = [self.full_at + RESYNC_S]
        if self.pool_due_at is not None:
            due.append(self.pool_due_at)
        if work.deployment:
            due.append(self.pool_at + DEPLOYMENT_PASS_EVERY_S)
        return max(0.0, min(due) - now)


@dataclass
class PodPasses:
    """The passes over pods a pool's daemon has in flight, and the pods they hold."""

    tasks: set[asyncio.Task[None]]
    pods: set[str]
    failures: int = 0
    retry_at: float = float("-inf")  # after a failure, no new pod pass before this

    def free(self, now: float) -> bool:
        return len(self.tasks) < POD_PASSES_AT_ONCE and now >= self.retry_at

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=30.0)
async def pool_reconciler(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    logger: Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """The one reconcile loop of a pool: on every change, each RESYNC_S, and when
    autoscaling asks. A pod's change starts a pass over that pod (and any other
    changed since), beside passes in flight over other pods; a pass over the whole
    pool waits for those, and runs alone. Nothing before this replica leads."""
    # Indexes arrive as kwargs named after their functions; they are live views.
    pod_index: kopf.Index[PoolKey, PodFacts] = kwargs["pods_by_pool"]
    node_index: kopf.Index[str, NodeFacts] = kwargs["nodes_by_name"]
    limit_index: kopf.Index[PoolKey, WorkerLimitRecord] = kwargs["worker_limits_by_pool"]
    pod_facts: kopf.Index[PodKey, PodFacts] = kwargs["pod_by_name"]
    pod_limits: kopf.Index[PodKey, WorkerLimitRecord] = kwargs["worker_limit_by_pod"]
    key: PoolKey = (body.metadata.namespace or "", body.metadata.name or "")
    event = POOLS.wakeup(key)
    gate = POOLS.gate(key)
    await _until_leading(leadership(memo), stopped)
    allowed = allowed_api_urls(memo)
    policy = pod_policy(memo)
    # The objects as the (warm) index has them when this replica starts to lead.
    state = PoolState.from_objects(_records_of(limit_index, key), body.status)
    clock = PassClock()
    passes = PodPasses(set(), set())
    failures = 0
    status_due_at: float | None = None

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    def failed(error: ReconcileError, exc: Exception, delay: float, announce: bool) -> None:
        metrics.RECONCILE_ERRORS.labels(*key, error.reason).inc()
        logger.warning(
            "reconcile failed (%s), retry in %.0fs: %s", error.reason, delay, error,
            exc_info=not isinstance(exc, ReconcileError),
            extra={"reason": error.reason},  # a field of its own in --log-format json
        )  # fmt: skip
        if announce:
            emit("Warning", error.reason, str(error)[:1000])

    async def pod_pass(pods: frozenset[str]) -> None:
        nonlocal status_due_at
        try:
            async with gate.shared():
                with metrics.RECONCILE_SECONDS.labels(*key).time():
                    await reconcile_pods(
                        _pool_ref(body), state, _some_of(pod_facts, key[0], pods),
                        _nodes(node_index), emit, allowed, pods,
                        _some_of(pod_limits, key[0], pods),
                    )  # fmt: skip
            if passes.failures:
                emit("Normal", "Recovered", "reconcile succeeded again")
            passes.failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a pod pass must not end the daemon
            POOLS.requeue(key, PendingWork(pods=set(pods)))
            error = as_reconcile_error(exc)
            passes.failures += 1
            delay = backoff_delay(passes.failures)
            passes.retry_at = time.monotonic() + delay
            # Pod passes fail together (Prefect down): one Event per new reason.
            last = state.limit_failure
            failed(error, exc, delay, announce=last is None or last.reason != error.reason)
            state.limit_failure = error
        finally:
            passes.pods.difference_update(pods)
            if status_due_at is None:
                status_due_at = time.monotonic() + STATUS_EVERY_S
            event.set()

    try:
        while not stopped:
            event.clear()
            if body.metadata.get("deletionTimestamp"):
                return  # pool_deleted cleans up alone (the gate), then forgets the pool
            now = time.monotonic()
            seen = pool_seen(body)
            work = POOLS.take(key)
            scope = clock.scope(now, seen, work)
            delay = clock.wait_s(now, work)
            if scope is not None and not scope.pool:
                # Pods only: passes of their own, but never two over one pod at once.
                busy = work.pods & passes.pods  # again once their pass is over
                ready = sorted(work.pods - busy)
                while ready and passes.free(now):
                    chunk, ready = frozenset(ready[:POD_PASS_PODS]), ready[POD_PASS_PODS:]
                    passes.pods.update(chunk)
                    task = asyncio.create_task(pod_pass(chunk))
                    passes.tasks.add(task)
                    task.add_done_callback(passes.tasks.discard)
                held = busy | set(ready)
                POOLS.requeue(key, PendingWork(pods=held, deployment=work.deployment))
                if not passes.free(now) and passes.retry_at > now:
                    delay = min(delay, passes.retry_at - now)
                scope = None
            if scope is not None:
                if not scope.full:
                    POOLS.requeue(key, PendingWork(deployment=work.deployment and not scope.pool))
                pool = _pool_ref(body)
                try:
                    async with gate.exclusive():
                        with metrics.RECONCILE_SECONDS.labels(*key).time():
                            await reconcile_pool(
                                pool, state, _pods_of(pod_index, key), _nodes(node_index),
                                emit, logger, allowed, policy, scope,
                                _records_of(limit_index, key),
                            )  # fmt: skip
                    clock.passed(scope, now, seen, state.next_pass_s)
                    status_due_at = None  # the pass wrote it
                    if failures:
                        emit("Normal", "Recovered", "reconcile succeeded again")
                    failures = 0
                    delay = clock.wait_s(time.monotonic(), PendingWork())
                except Exception as exc:  # the loop must outlive any one failure
                    POOLS.requeue(key, work)
                    error = as_reconcile_error(exc)
                    failures += 1
                    delay = backoff_delay(failures)
                    failed(error, exc, delay, announce=True)
                    await _report(pool, state, error, logger)
            if status_due_at is not None:
                if time.monotonic() >= status_due_at:
                    status_due_at = None
                    await _write_pod_status(body, state, pod_index, key, logger)
                else:
                    delay = min(delay, status_due_at - time.monotonic())
            await _wait(event, stopped, max(0.0, delay))
    finally:
        await passes.cancel()
        await state.aclose()


async def _write_pod_status(
    body: kopf.Body,
    state: PoolState,
    pod_index: kopf.Index[PoolKey, PodFacts],
    key: PoolKey,
    log: Logger,
) -> None:
    """The status after passes over pods, coalesced (one write for many passes)."""
    pool = _pool_ref(body)
    try:
        spec = PoolSpec.from_dict(dict(pool.spec))
        await write_pool_status(pool, state, spec, _pods_of(pod_index, key))
    except Exception as exc:  # the next pass writes it again
        log.info("could not write status: %s", exc)


async def _until_leading(leader: Leadership, stopped: kopf.DaemonStopped) -> None:
    """Return once this replica leads (at once without election), or once stopped."""
    if leader.is_leading:
        return
    leading = asyncio.ensure_future(leader.wait_leading())
    halted = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({leading, halted}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        leading.cancel()
        halted.cancel()


def as_reconcile_error(exc: Exception) -> ReconcileError:
    """Any failure of a pass as a ReconcileError with a reason, for status and events."""
    if isinstance(exc, ReconcileError):
        return exc
    mapped = kube.as_kubernetes_error(exc, "Kubernetes API")  # e.g. raised inside kopf
    if mapped is not None:
        return mapped
    # The type only: an unexpected exception's text may quote anything; the log has it.
    return ReconcileError("InternalError", f"{type(exc).__name__}; see the operator log")


async def _report(pool: PoolRef, state: PoolState, error: ReconcileError, log: Logger) -> None:
    try:
        await report_failure(pool, state, error)
    except Exception as exc:  # the pool or the API server may be gone; the log has it
        log.info("could not write failure status: %s", exc)


async def _wait(event: asyncio.Event, stopped: kopf.DaemonStopped, delay_s: float) -> None:
    """Sleep ``delay_s`` unless woken by a change or told to stop."""
    waiters = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(stopped.wait())}
    try:
        await asyncio.wait(waiters, timeout=delay_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def pool_deleted(body: kopf.Body, logger: Logger, memo: kopf.Memo, **kwargs: Any) -> None:
    """Delete every limit of the pool's GpuWorkerLimit objects (and of an older
    release's ledger in its status) before the pool goes (finalizer).

    Retried while Prefect cannot delete them, for ``spec.prefect.finalizerTimeoutSeconds``
    after the deletion began; then the pool goes and an Event names what was left.
    A standby waits to lead (kopf retries it) and deletes nothing meanwhile.
    """

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    leader = leadership(memo)
    if not leader.is_leading:
        try:
            await asyncio.wait_for(leader.wait_leading(), STANDBY_DELETE_WAIT_S)
        except TimeoutError:
            why = "standby: the leader deletes the pool's limits"
            raise kopf.TemporaryError(why, delay=5.0) from None
    await delete_pool(body, logger, allowed_api_urls(memo), emit)


def _no_events(kind: str, reason: str, message: str) -> None:
    pass


async def delete_pool(
    body: kopf.Body,
    logger: Logger,
    allowed: AllowedApiUrls,
    emit: EventFn = _no_events,
    records: Mapping[str, WorkerLimitRecord] | None = None,
) -> None:
    """What ``pool_deleted`` does: delete the limits the pool's objects (``records``
    by pod; listed from the API server when None) and status name, let the objects
    go, then forget the pool.

    Raises:
        kopf.TemporaryError: Prefect could not delete a limit and the pool's
            cleanup deadline has not passed; kopf retries.
    """
    key: PoolKey = (body.metadata.namespace or "", body.metadata.name or "")
    spec = PoolSpec.from_dict(dict(body.spec))
    deadline = cleanup_deadline(body.metadata.get("deletionTimestamp"), spec.finalizer_timeout_s)
    async with POOLS.gate(key).exclusive():
        if records is None:
            # From the API server, not the watch: an object written a moment ago counts.
            listed = await asyncio.to_thread(kube.list_worker_limits, key[0], key[1])
            records = {r.pod: r for r in map(WorkerLimitRecord.from_object, listed)}
        ledger = {**ledger_from_status(body.status), **ledger_of(records.values())}
        if ledger:
            await _delete_limits(key, spec, sorted(ledger), allowed, logger, emit, deadline)
        # Their limits are gone (or left behind, said above): the objects go too.
        await gather_bounded(
            asyncio.to_thread(kube.release_worker_limit, key[0], pod, record.deleting)
            for pod, record in sorted(records.items())
        )
    POOLS.forget(key)
    metrics.forget_pool(*key)


def _left_behind(logger: Logger, emit: EventFn, reason: str, why: str, names: list[str]) -> None:
    """The pool goes with limits still in Prefect: say which, where users look."""
    message = f"{why}; limits left in Prefect: {', '.join(names)}"
    logger.warning("%s: %s", reason, message, extra={"reason": reason})
    emit("Warning", "LimitsLeftInPrefect", f"{reason}: {message}"[:1000])


async def _delete_limits(
    key: PoolKey,
    spec: PoolSpec,
    names: list[str],
    allowed: AllowedApiUrls,
    logger: Logger,
    emit: EventFn,
    deadline: datetime,
) -> None:
    try:
        checked_api_url(key[0], spec, allowed)
    except ReconcileError as exc:
        # No request to a refused URL, not even to clean up: the pool goes and
        # its limits stay (the operator cannot have created them there unless
        # the allowlist changed since).
        _left_behind(logger, emit, exc.reason, str(exc), names)
        return
    left = list(names)
    try:
        api = await prefect_api_for(key[0], spec, allowed)
        try:
            while left:
                await api.delete_limit(left[0])
                logger.info("deleted limit %s with its pool", left.pop(0))
        finally:
            await api.aclose()
    except ReconcileError as exc:
        remaining_s = (deadline - datetime.now(UTC)).total_seconds()
        if remaining_s <= 0:
            why = f"gave up after spec.prefect.finalizerTimeoutSeconds={spec.finalizer_timeout_s}"
            _left_behind(logger, emit, exc.reason, f"{why}: {exc}", left)
            return
        emit("Warning", exc.reason, f"cannot delete the pool's limits yet (gives up at "
             f"{deadline.isoformat(timespec='seconds')}): {exc}"[:1000])  # fmt: skip
        raise kopf.TemporaryError(f"{exc.reason}: {exc}", delay=min(30.0, remaining_s)) from exc
