"""Backlog autoscaling of a pool: how many workers the runs waiting in Prefect need.

Pure: the reconciler reads the backlog (:class:`Backlog`) from Prefect, calls
:func:`decide` with what it remembers (:class:`AutoscaleMemory`), and carries
out the :class:`ScaleDecision` through the pool's scale subresource.

How a decision is made, and why it never flaps:

- **Need.** ``ceil(runs / runs_per_worker)`` where runs = scheduled runs that
  are due (Late ones included) + Pending + Running, and a worker takes at most
  ``workPool.flowRunsPerWorker`` runs (fewer with ``targetRunsPerWorker``, or
  with ``runsPerGpuSlot`` times its GPU slots); clamped to min/max replicas.
- **Up at once.** A need above the current count raises it (by at most
  ``scaleUpStep``) on the next decision.
- **Down only after the delay.** The count goes down to the *highest* need
  seen during the last ``scaleDownDelaySeconds`` (the hysteresis: a backlog
  that oscillates around a threshold keeps the higher count), by at most
  ``scaleDownStep``.
- **Cooldown.** Two changes are at least ``cooldownSeconds`` apart, so a burst
  of wake-ups cannot walk the count step by step.
- **Bounds first.** A count outside min/max is corrected at once.

Times are seconds on one monotonic clock (the caller's); the memory is the
operator's, in process: after a restart the current count counts as a need
seen just now, so a restart delays a scale-down and never hastens one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgw_operator.spec import DEFAULTS

DEFAULT_SCALE_DOWN_DELAY_S: int = DEFAULTS["autoscaling.scaleDownDelaySeconds"]
DEFAULT_COOLDOWN_S: int = DEFAULTS["autoscaling.cooldownSeconds"]
DEFAULT_POLL_INTERVAL_S: int = DEFAULTS["autoscaling.pollIntervalSeconds"]


@dataclass(frozen=True)
class AutoscalingSpec:
    """``spec.autoscaling`` of a pool (defaults from ``spec.DEFAULTS``, as in the CRD)."""

    max_replicas: int
    min_replicas: int = DEFAULTS["autoscaling.minReplicas"]
    target_runs_per_worker: int | None = None
    runs_per_gpu_slot: int | None = None
    work_queues: tuple[str, ...] = ()
    lookahead_s: int = DEFAULTS["autoscaling.lookaheadSeconds"]
    poll_interval_s: int = DEFAULT_POLL_INTERVAL_S
    scale_down_delay_s: int = DEFAULT_SCALE_DOWN_DELAY_S
    cooldown_s: int = DEFAULT_COOLDOWN_S
    scale_up_step: int | None = None
    scale_down_step: int | None = None

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> AutoscalingSpec:
        """Parse the ``spec.autoscaling`` object.

        Example:
            >>> AutoscalingSpec.from_dict({"maxReplicas": 4}).scale_down_delay_s
            300
        """

        def optional(key: str) -> int | None:
            value = body.get(key)
            return None if value is None else int(value)

        def defaulted(key: str) -> int:
            value = body.get(key)
            return int(DEFAULTS[f"autoscaling.{key}"] if value is None else value)

        return cls(
            max_replicas=int(body["maxReplicas"]),
            min_replicas=defaulted("minReplicas"),
            target_runs_per_worker=optional("targetRunsPerWorker"),
            runs_per_gpu_slot=optional("runsPerGpuSlot"),
            work_queues=tuple(body.get("workQueues") or ()),
            lookahead_s=defaulted("lookaheadSeconds"),
            poll_interval_s=defaulted("pollIntervalSeconds"),
            scale_down_delay_s=defaulted("scaleDownDelaySeconds"),
            cooldown_s=defaulted("cooldownSeconds"),
            scale_up_step=optional("scaleUpStep"),
            scale_down_step=optional("scaleDownStep"),
        )


def autoscaling_of(pool_spec: Mapping[str, Any]) -> AutoscalingSpec | None:
    """The pool's autoscaling settings, or None when it has fixed replicas."""
    body = pool_spec.get("autoscaling")
    return AutoscalingSpec.from_dict(body) if body else None


@dataclass(frozen=True)
class Backlog:
    """Flow runs of the work pool (or of its chosen queues) that need a worker.

    ``scheduled`` counts Scheduled runs that are due within the lookahead,
    Late and AwaitingRetry ones included (all of state type SCHEDULED).
    """

    scheduled: int = 0
    pending: int = 0
    running: int = 0

    @property
    def total(self) -> int:
        return self.scheduled + self.pending + self.running

    def describe(self) -> str:
        return (
            f"{self.total} runs ({self.scheduled} scheduled or late, "
            f"{self.pending} pending, {self.running} running)"
        )


def runs_per_worker(
    spec: AutoscalingSpec, flow_runs_per_worker: int, slots_per_worker: int | None
) -> int:
    """How many runs one worker is counted for.

    Never more than ``flow_runs_per_worker`` (a worker takes no more); fewer with
    ``targetRunsPerWorker``, or with ``runsPerGpuSlot`` x the worker's GPU slots
    when those are known (``slots_per_worker`` None: no worker sized yet).

    Example:
        >>> runs_per_worker(AutoscalingSpec(4, runs_per_gpu_slot=2), 10, 2)
        4
    """
    per = flow_runs_per_worker
    if spec.target_runs_per_worker is not None:
        per = min(per, spec.target_runs_per_worker)
    if spec.runs_per_gpu_slot is not None and slots_per_worker:
        per = min(per, spec.runs_per_gpu_slot * slots_per_worker)
    return max(1, per)


def workers_needed(runs: int, per_worker: int) -> int:
    """Workers for ``runs`` runs at ``per_worker`` each (no bounds applied)."""
    return math.ceil(max(0, runs) / max(1, per_worker))


@dataclass(frozen=True)
class AutoscaleMemory:
    """What decisions remember between passes.

    ``needs`` is a sliding-window maximum: ``(time, need)`` pairs with strictly
    decreasing needs, each at the last time it was seen; its first entry is the
    highest need of the scale-down window. It stays a few entries long however
    often passes run.
    """

    needs: tuple[tuple[float, int], ...] = ()
    last_change_at: float | None = None


def _remember(
    needs: tuple[tuple[float, int], ...], now: float, need: int, window_s: float
) -> tuple[tuple[float, int], ...]:
    kept = [(t, n) for t, n in needs if n > need and t > now - window_s]
    return (*kept, (now, need))


@dataclass(frozen=True)
class ScaleDecision:
    """The replica count a pool should have, and why.

    ``reason`` is CamelCase (an Event reason and ``status.autoscaling.reason``):
    ScaledUp, ScaledDown, ScaledToZero, BelowMinReplicas, AboveMaxReplicas
    (changes); Steady, AtMaxReplicas, ScaleDownDelayed, CoolingDown (no change).
    ``recheck_after_s`` says when a delayed change becomes due, so the caller
    can look again then rather than at its next poll.
    """

    current: int
    desired: int
    needed: int
    backlog: Backlog
    reason: str
    message: str
    recheck_after_s: float | None = None

    @property
    def changed(self) -> bool:
        return self.desired != self.current


@dataclass(frozen=True)
class _Inputs:
    spec: AutoscalingSpec
    backlog: Backlog
    per_worker: int
    current: int
    wanted: int  # unbounded
    needed: int  # bounded
    highest: int  # highest need of the scale-down window
    cooling_for: float  # seconds of cooldown left, 0 when none

    def basis(self) -> str:
        return (
            f"{self.backlog.describe()}, {self.per_worker} per worker "
            f"-> {self.wanted} worker{'s' if self.wanted != 1 else ''}"
        )


def decide(
    spec: AutoscalingSpec,
    backlog: Backlog,
    per_worker: int,
    current: int,
    memory: AutoscaleMemory,
    now: float,
) -> tuple[ScaleDecision, AutoscaleMemory]:
    """Decide the replica count for ``backlog``; returns the decision and the new memory.

    Args:
        spec: the pool's autoscaling settings.
        backlog: runs of the work pool that need a worker now.
        per_worker: runs one worker is counted for (:func:`runs_per_worker`).
        current: the pool's replica count now (``spec.replicas``).
        memory: what the previous decision returned (empty at start).
        now: seconds on the caller's monotonic clock.

    Example:
        >>> decision, _ = decide(AutoscalingSpec(8), Backlog(scheduled=30), 10, 0,
        ...                      AutoscaleMemory(), now=0.0)
        >>> (decision.desired, decision.reason)
        (3, 'ScaledUp')
    """
    wanted = workers_needed(backlog.total, per_worker)
    needed = min(spec.max_replicas, max(spec.min_replicas, wanted))
    # A pass with no history (first, or after a restart) counts the current
    # count as a need seen now: it delays a scale-down, never hastens one.
    seeded = memory.needs or ((now, min(spec.max_replicas, max(spec.min_replicas, current))),)
    needs = _remember(seeded, now, needed, spec.scale_down_delay_s)
    since = None if memory.last_change_at is None else now - memory.last_change_at
    inputs = _Inputs(
        spec=spec,
        backlog=backlog,
        per_worker=per_worker,
        current=current,
        wanted=wanted,
        needed=needed,
        highest=needs[0][1],
        cooling_for=0.0 if since is None else max(0.0, spec.cooldown_s - since),
    )
    decision = _choose(inputs, needs)
    changed_at = now if decision.changed else memory.last_change_at
    return decision, AutoscaleMemory(needs=needs, last_change_at=changed_at)


def _choose(i: _Inputs, needs: tuple[tuple[float, int], ...]) -> ScaleDecision:
    spec, current = i.spec, i.current

    def keep(reason: str, message: str, recheck: float | None = None) -> ScaleDecision:
        return ScaleDecision(current, current, i.needed, i.backlog, reason, message, recheck)

    def change(desired: int, reason: str, message: str) -> ScaleDecision:
        return ScaleDecision(current, desired, i.needed, i.backlog, reason, message)

    # Messages name no countdown: they become status, which must not change
    # from one pass to the next while nothing else does.
    cooling = f"{i.basis()}; a change waits for cooldownSeconds ({spec.cooldown_s}s)"
    if current < spec.min_replicas:
        return change(
            spec.min_replicas, "BelowMinReplicas",
            f"{current} -> {spec.min_replicas}: minReplicas is {spec.min_replicas}",
        )  # fmt: skip
    if current > spec.max_replicas:
        return change(
            spec.max_replicas, "AboveMaxReplicas",
            f"{current} -> {spec.max_replicas}: maxReplicas is {spec.max_replicas}",
        )  # fmt: skip
    if i.needed > current:
        if i.cooling_for > 0:
            return keep("CoolingDown", cooling, i.cooling_for)
        step = spec.scale_up_step or i.needed
        desired = min(i.needed, current + step)
        return change(desired, "ScaledUp", f"{current} -> {desired}: {i.basis()}")
    if i.highest < current:
        if i.cooling_for > 0:
            return keep("CoolingDown", cooling, i.cooling_for)
        step = spec.scale_down_step or current
        desired = max(i.highest, current - step)
        reason = "ScaledToZero" if desired == 0 else "ScaledDown"
        return change(
            desired, reason,
            f"{current} -> {desired}: {i.basis()} for {spec.scale_down_delay_s}s",
        )  # fmt: skip
    if i.needed < current:
        # The window still holds a higher need: say when it leaves the window.
        higher = [t for t, n in needs if n >= current]
        last_seen = higher[-1] if higher else needs[0][0]
        due_in = max(0.0, last_seen + spec.scale_down_delay_s - needs[-1][0])
        return keep(
            "ScaleDownDelayed",
            f"{i.basis()}; keeping {current} until the need stays lower for "
            f"{spec.scale_down_delay_s}s (scaleDownDelaySeconds)",
            due_in,
        )
    if i.wanted > spec.max_replicas:
        return keep("AtMaxReplicas", f"{i.basis()}; capped at maxReplicas {spec.max_replicas}")
    return keep("Steady", f"{current} workers: {i.basis()}")


@dataclass
class Autoscaler:
    """A pool's decisions over time: :func:`decide` with the memory kept here.

    The reconciler owns one per pool (``PoolState``); the last decision feeds
    the status and the Event.
    """

    memory: AutoscaleMemory = field(default_factory=AutoscaleMemory)
    last: ScaleDecision | None = None

    def decide(
        self, spec: AutoscalingSpec, backlog: Backlog, per_worker: int, current: int, now: float
    ) -> ScaleDecision:
        decision, self.memory = decide(spec, backlog, per_worker, current, self.memory, now)
        self.last = decision
        return decision


def autoscaling_status(decision: ScaleDecision) -> dict[str, Any]:
    """``status.autoscaling`` for a decision: the desired count, the reason, the backlog."""
    return {
        "desiredReplicas": decision.desired,
        "neededReplicas": decision.needed,
        "reason": decision.reason,
        "message": decision.message[:1024],
        "backlog": {
            "scheduled": decision.backlog.scheduled,
            "pending": decision.backlog.pending,
            "running": decision.backlog.running,
        },
    }
