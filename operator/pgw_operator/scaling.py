"""Backlog autoscaling, carried out within a pool's pass.

Orchestration like reconcile.py: the decisions are pure (autoscale.py,
desired.py); this module reads the backlog, patches the pool's own scale
subresource, emits the Event, applies the PodDisruptionBudget and exports the
backlog metric. The reconcile pass calls it; nothing else writes a pool.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pgw_operator import kube, metrics
from pgw_operator.autoscale import (
    Autoscaler,
    AutoscalingSpec,
    Backlog,
    ScaleDecision,
    autoscaling_status,
    runs_per_worker,
)
from pgw_operator.conditions import now_rfc3339
from pgw_operator.errors import KubernetesError, PrefectError
from pgw_operator.plan import Ledger, slot_entries
from pgw_operator.prefect_api import PrefectApi
from pgw_operator.spec import PoolSpec

EventFn = Callable[[str, str, str], None]  # (type, reason, message)
MIN_PASS_INTERVAL_S = 0.5
BACKLOG_METRIC_POLL_S = 30  # pools without spec.autoscaling: the metric only


@dataclass
class ScalingState:
    """What scaling remembers about one pool between passes (in the pool's PoolState)."""

    autoscaler: Autoscaler = field(default_factory=Autoscaler)
    last_scale_time: str | None = None  # RFC 3339, for status.autoscaling.lastScaleTime
    backlog: Backlog | None = None  # the last one read ...
    backlog_read_at: float = 0.0  # ... at this time.monotonic()

    def next_pass_s(self, auto: AutoscalingSpec | None) -> float | None:
        """When the next pass should run for autoscaling: the poll, or a delayed change due."""
        if auto is None:
            return None
        last = self.autoscaler.last
        due = last.recheck_after_s if last is not None else None
        if due is None:
            return float(auto.poll_interval_s)
        # Never a hot loop, even for a change due in a few milliseconds.
        return max(MIN_PASS_INTERVAL_S, min(float(auto.poll_interval_s), due))


def slots_per_worker(spec: PoolSpec, ledger: Ledger) -> int | None:
    """GPU slots of one worker: from the spec when fixed per worker, else the largest limit."""
    if spec.gpus_per_worker is not None:
        return spec.gpus_per_worker * spec.slots_per_gpu
    sizes = [e.size for e in slot_entries(ledger) if e.state != "Deleting"]
    return max(sizes) if sizes else None


async def current_backlog(
    api: PrefectApi, spec: PoolSpec, auto: AutoscalingSpec | None, state: ScalingState, log: Any
) -> Backlog | None:
    """The work pool's backlog: read afresh once per poll interval, else the last one read.

    Read for every pool, autoscaled or not, so that KEDA or an HPA can scale on
    ``pgw_pool_backlog_runs``; passes woken by pod events in between reuse it,
    so a large scale-up costs no extra Prefect queries. A failed read fails the
    pass only where the pool autoscales on it; elsewhere it is logged and the
    metric keeps its last value.

    Raises:
        PrefectError: the read failed and the pool autoscales.
    """
    interval = auto.poll_interval_s if auto is not None else BACKLOG_METRIC_POLL_S
    now = time.monotonic()
    if state.backlog is not None and now - state.backlog_read_at < interval / 2:
        return state.backlog
    due = datetime.now(UTC) + timedelta(seconds=auto.lookahead_s if auto is not None else 0)
    queues = auto.work_queues if auto is not None else ()
    try:
        backlog = await api.read_backlog(spec.work_pool, due, queues)
    except PrefectError as exc:
        if auto is not None:
            raise
        log.warning("could not read the backlog of work pool %s: %s", spec.work_pool, exc)
        return None
    state.backlog, state.backlog_read_at = backlog, now
    return backlog


def record_backlog(namespace: str, pool: str, backlog: Backlog) -> None:
    counts = {"scheduled": backlog.scheduled, "pending": backlog.pending,
              "running": backlog.running}  # fmt: skip
    for state, count in counts.items():
        metrics.BACKLOG_RUNS.labels(namespace, pool, state).set(count)


async def autoscale(
    namespace: str,
    name: str,
    spec: PoolSpec,
    auto: AutoscalingSpec,
    backlog: Backlog,
    state: ScalingState,
    ledger: Ledger,
    emit: EventFn,
) -> ScaleDecision:
    """Decide the pool's replicas from ``backlog`` and set them through ``/scale``.

    The scale patch changes the pool, which wakes its daemon: the next pass
    applies the Deployment with the new count.

    Raises:
        KubernetesError: ``ScaleRejected`` when the API server refuses the patch
            (the decision is then forgotten, so the next pass makes it again).
    """
    per_worker = runs_per_worker(auto, spec.flow_runs_per_worker, slots_per_worker(spec, ledger))
    before = state.autoscaler.memory
    decision = state.autoscaler.decide(auto, backlog, per_worker, spec.replicas, time.monotonic())
    if decision.changed:
        try:
            await asyncio.to_thread(kube.scale_pool, namespace, name, decision.desired)
        except KubernetesError:
            state.autoscaler.memory = before
            state.autoscaler.last = None
            raise
        state.last_scale_time = now_rfc3339()
        emit("Normal", decision.reason, decision.message)
    return decision


def autoscaling_status_of(
    state: ScalingState, auto: AutoscalingSpec | None, previous: Mapping[str, Any]
) -> dict[str, Any] | None:
    """``status.autoscaling``: the last decision, and when the count last changed."""
    decision = state.autoscaler.last
    if auto is None or decision is None:
        return None
    body = autoscaling_status(decision)
    last = state.last_scale_time or (previous.get("autoscaling") or {}).get("lastScaleTime")
    if last:
        body["lastScaleTime"] = last
    return body
