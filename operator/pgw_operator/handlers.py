"""Kopf wiring: indexes, wake-ups, one reconcile daemon per pool, and deletion cleanup.

Every change that matters (the pool, its pods, its Deployment, a timer) leads to
the same single reconcile loop per pool, so exactly one writer touches a pool's
limits and status. Pod events only wake that loop; the pod facts come from an
in-memory index, not from API calls.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import kopf

from pgw_operator import kube, metrics
from pgw_operator.api_url import AllowedApiUrls
from pgw_operator.errors import ReconcileError
from pgw_operator.facts import NodeFacts, PodFacts
from pgw_operator.plan import cleanup_deadline, ledger_from_status
from pgw_operator.pod_rules import PodPolicy
from pgw_operator.reconcile import (
    EventFn,
    Logger,
    PoolRef,
    PoolState,
    checked_api_url,
    prefect_api_for,
    reconcile_pool,
    report_failure,
)
from pgw_operator.registry import PoolKey, PoolRegistry
from pgw_operator.spec import GROUP, PLURAL, POOL_LABEL, VERSION, PoolSpec

RESYNC_S = 30.0  # periodic pass: garbage collection, drift, active-slot counts
MAX_BACKOFF_S = 60.0

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


def backoff_delay(failures: int) -> float:
    return float(min(MAX_BACKOFF_S, 2 ** max(0, failures)))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    kube.load_config()
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


@kopf.index("pods", labels={POOL_LABEL: kopf.PRESENT})
def pods_by_pool(
    name: str,
    namespace: str | None,
    labels: Mapping[str, str],
    spec: kopf.Spec,
    status: kopf.Status,
    meta: kopf.Meta,
    **_: Any,
) -> dict[PoolKey, PodFacts]:
    return {(namespace or "", labels[POOL_LABEL]): PodFacts.from_pod(name, spec, status, meta)}


@kopf.index("nodes")
def nodes_by_name(
    name: str, status: kopf.Status, labels: Mapping[str, str], **_: Any
) -> dict[str, NodeFacts]:
    return {name: NodeFacts.from_node(name, status, labels)}


@kopf.on.event("pods", labels={POOL_LABEL: kopf.PRESENT})
def pod_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    POOLS.wake(namespace, labels.get(POOL_LABEL))


@kopf.on.event("apps", "v1", "deployments", labels={POOL_LABEL: kopf.PRESENT})
def deployment_changed(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
    POOLS.wake(namespace, labels.get(POOL_LABEL))


@kopf.on.event(GROUP, VERSION, PLURAL)
def pool_changed(namespace: str | None, name: str, **_: Any) -> None:
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


def _nodes(index: kopf.Index[str, NodeFacts]) -> dict[str, NodeFacts]:
    return {name: next(iter(store)) for name, store in index.items() if store}


@kopf.daemon(GROUP, VERSION, PLURAL, cancellation_timeout=30.0)
async def pool_reconciler(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    logger: Logger,
    memo: kopf.Memo,
    **kwargs: Any,
) -> None:
    """The one reconcile loop of a pool: on every wake-up, and every RESYNC_S."""
    # Indexes arrive as kwargs named after their functions; they are live views.
    pod_index: kopf.Index[PoolKey, PodFacts] = kwargs["pods_by_pool"]
    node_index: kopf.Index[str, NodeFacts] = kwargs["nodes_by_name"]
    key: PoolKey = (body.metadata.namespace or "", body.metadata.name or "")
    event = POOLS.wakeup(key)
    allowed = allowed_api_urls(memo)
    policy = pod_policy(memo)
    state = PoolState(ledger=ledger_from_status(body.status))
    failures = 0

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    while not stopped:
        event.clear()
        if body.metadata.get("deletionTimestamp"):
            return  # pool_deleted cleans up under the same lock, then forgets the pool
        pool = _pool_ref(body)
        try:
            async with POOLS.lock(key):
                with metrics.RECONCILE_SECONDS.labels(*key).time():
                    await reconcile_pool(
                        pool,
                        state,
                        _pods_of(pod_index, key),
                        _nodes(node_index),
                        emit,
                        logger,
                        allowed,
                        policy,
                    )
            if failures:
                emit("Normal", "Recovered", "reconcile succeeded again")
            failures, delay = 0, min(RESYNC_S, state.next_pass_s or RESYNC_S)
        except Exception as exc:  # the loop must outlive any one failure
            error = as_reconcile_error(exc)
            failures += 1
            delay = backoff_delay(failures)
            metrics.RECONCILE_ERRORS.labels(*key, error.reason).inc()
            logger.warning(
                "reconcile failed (%s), retry in %.0fs: %s", error.reason, delay, error,
                exc_info=not isinstance(exc, ReconcileError),
                extra={"reason": error.reason},  # a field of its own in --log-format json
            )  # fmt: skip
            emit("Warning", error.reason, str(error)[:1000])
            await _report(pool, state, error, logger)
        await _wait(event, stopped, delay)


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
async def pool_deleted(body: kopf.Body, logger: Logger, memo: kopf.Memo, **_: Any) -> None:
    """Delete every limit in the pool's ledger before the pool goes (finalizer).

    Retried while Prefect cannot delete them, for ``spec.prefect.finalizerTimeoutSeconds``
    after the deletion began; then the pool goes and an Event names what was left.
    """

    def emit(kind: str, reason: str, message: str) -> None:
        kopf.event(body, type=kind, reason=reason, message=message)

    await delete_pool(body, logger, allowed_api_urls(memo), emit)


def _no_events(kind: str, reason: str, message: str) -> None:
    pass


async def delete_pool(
    body: kopf.Body, logger: Logger, allowed: AllowedApiUrls, emit: EventFn = _no_events
) -> None:
    """What ``pool_deleted`` does: delete the ledger's limits, then forget the pool.

    Raises:
        kopf.TemporaryError: Prefect could not delete a limit and the pool's
            cleanup deadline has not passed; kopf retries.
    """
    key: PoolKey = (body.metadata.namespace or "", body.metadata.name or "")
    spec = PoolSpec.from_dict(dict(body.spec))
    deadline = cleanup_deadline(body.metadata.get("deletionTimestamp"), spec.finalizer_timeout_s)
    async with POOLS.lock(key):
        ledger = ledger_from_status(body.status)
        if ledger:
            await _delete_limits(key, spec, sorted(ledger), allowed, logger, emit, deadline)
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
