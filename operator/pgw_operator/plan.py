"""Which limits to create, resize, recreate or delete for one pool: a pure decision.

The ledger is the operator's record of the limits it created for a pool, kept
in the pool's ``status.workers``. It is written *before* Prefect is touched
(write-ahead), so a crash can leave a ledger entry without a limit, never a
limit without a ledger entry. Only ledger entries are ever deleted: a limit
this operator did not create is never touched, whatever its name.

A worker pod has one ledger entry per limit it gets: its slot limit
(``{prefix}:{pod}``, kind ``slots``) and, with ``spec.gpu.memory``, its GPU
memory limit (``{prefix}-memory:{pod}``, kind ``memory``, sized in GiB). Each
entry is planned alike: created, resized, recreated after a restart in place,
deleted when its pod is gone or the spec no longer names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pgw_operator.facts import NodeFacts, PodFacts
from pgw_operator.sizing import LimitSize, SizingProblem, size_limit, size_memory_limit
from pgw_operator.spec import PoolSpec
from prefect_gpu_workers.naming import limit_name, memory_limit_name

EntryState = Literal["Creating", "Ready", "Deleting"]
# slots: the worker's slot limit; memory: its GPU memory limit (GiB).
LimitKind = Literal["slots", "memory"]
Sizer = Callable[[PodFacts, NodeFacts | None, PoolSpec], LimitSize | SizingProblem]
_SIZERS: dict[LimitKind, Sizer] = {"slots": size_limit, "memory": size_memory_limit}


@dataclass(frozen=True)
class LedgerEntry:
    limit_name: str
    pod: str
    node: str | None
    size: int
    gpus: str
    restarts: int
    state: EntryState
    active_slots: int = 0
    kind: LimitKind = "slots"

    def to_status(self) -> dict[str, Any]:
        return {
            "limitName": self.limit_name,
            "kind": self.kind,
            "pod": self.pod,
            "node": self.node or "",
            "limitSize": self.size,
            "gpus": self.gpus,
            "restarts": self.restarts,
            "state": self.state,
            "activeSlots": self.active_slots,
        }

    @classmethod
    def from_status(cls, item: Mapping[str, Any]) -> LedgerEntry:
        state = item.get("state", "Ready")
        kind = item.get("kind", "slots")  # entries written before memory limits had none
        return cls(
            limit_name=item["limitName"],
            pod=item.get("pod", ""),
            node=item.get("node") or None,
            size=int(item.get("limitSize", 0)),
            gpus=str(item.get("gpus", "")),
            restarts=int(item.get("restarts", 0)),
            state=state if state in ("Creating", "Ready", "Deleting") else "Ready",
            active_slots=int(item.get("activeSlots", 0)),
            kind="memory" if kind == "memory" else "slots",
        )


Ledger = dict[str, LedgerEntry]


def ledger_from_status(status: Mapping[str, Any] | None) -> Ledger:
    items = (status or {}).get("workers") or []
    entries = (LedgerEntry.from_status(item) for item in items if item.get("limitName"))
    return {entry.limit_name: entry for entry in entries}


def ledger_to_status(ledger: Ledger) -> list[dict[str, Any]]:
    return [ledger[name].to_status() for name in sorted(ledger)]


def slot_entries(ledger: Ledger) -> list[LedgerEntry]:
    """The ledger's slot limits: what counts GPU slots and workers (memory limits
    are in GiB, a second entry of the same pod)."""
    return [entry for entry in ledger.values() if entry.kind == "slots"]


@dataclass(frozen=True)
class PrefectLimit:
    """A limit as read from Prefect."""

    name: str
    limit: int
    active: bool
    active_slots: int


ActionKind = Literal["create", "resize", "recreate", "delete"]


@dataclass(frozen=True)
class LimitAction:
    kind: ActionKind
    name: str
    size: int = 0
    why: str = ""


@dataclass
class LimitPlan:
    # The ledger to persist before acting on `actions`.
    ledger: Ledger
    actions: list[LimitAction] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _desired_pods(pods: Mapping[str, PodFacts]) -> list[PodFacts]:
    """Pods that need a limit: bound to a node and not finished (terminating still counts,
    its worker drains flow runs that may yet reach their GPU step)."""
    return [pod for pod in pods.values() if pod.node and not pod.finished]


def pod_limits(spec: PoolSpec, pod: str) -> dict[LimitKind, str]:
    """The limits a worker pod gets, by kind: its slot limit, and its memory limit
    when ``spec.gpu.memory`` is set.

    Example:
        >>> spec = PoolSpec.from_dict({"workPool": {"name": "p"}, "prefect": {"apiUrl": "x"},
        ...     "gpu": {"perWorker": 1, "memory": "40Gi"}, "worker": {"image": "i"}})
        >>> pod_limits(spec, "w-0")
        {'slots': 'gpu:w-0', 'memory': 'gpu-memory:w-0'}
    """
    names: dict[LimitKind, str] = {"slots": limit_name(pod, spec.limit_prefix)}
    if spec.gpu_memory is not None:
        names["memory"] = memory_limit_name(pod, spec.limit_prefix)
    return names


def _desired_limits(
    spec: PoolSpec, pods: Mapping[str, PodFacts]
) -> Iterator[tuple[PodFacts, LimitKind, str]]:
    for pod in sorted(_desired_pods(pods), key=lambda p: p.name):
        for kind, name in pod_limits(spec, pod.name).items():
            yield pod, kind, name


def desired_limit_names(spec: PoolSpec, pods: Mapping[str, PodFacts]) -> set[str]:
    return {name for _, _, name in _desired_limits(spec, pods)}


def plan_limits(
    spec: PoolSpec,
    ledger: Ledger,
    pods: Mapping[str, PodFacts],
    nodes: Mapping[str, NodeFacts],
    prefect_limits: Mapping[str, PrefectLimit],
) -> LimitPlan:
    """Decide the limit actions that bring Prefect in line with the pool's pods.

    ``prefect_limits`` holds what Prefect has for every name in the ledger and
    every desired name; a name missing from it does not exist in Prefect.
    """
    plan = LimitPlan(ledger=dict(ledger))
    desired: set[str] = set()
    for pod, kind, name in _desired_limits(spec, pods):
        desired.add(name)
        sized = _SIZERS[kind](pod, nodes.get(pod.node or ""), spec)
        if isinstance(sized, SizingProblem):
            # One cause (no GPU on the pod) stops both of its limits: said once
            # (a pod's limits come one after the other).
            if not plan.problems or plan.problems[-1] != sized.reason:
                plan.problems.append(sized.reason)
            continue
        _plan_pod(plan, pod, kind, name, sized, ledger.get(name), prefect_limits.get(name))

    wanted_pods = {pod.name for pod in _desired_pods(pods)}
    for name, entry in ledger.items():
        if name in desired:
            continue
        # Deleted even when a read did not find it: a paged listing skips items
        # that shift while limits come and go, and a create without an answer may
        # land late. Deleting a limit that is gone costs a 404; forgetting one that
        # is not leaks it for good.
        plan.ledger[name] = replace(entry, state="Deleting")
        why = (
            f"pod {entry.pod} is gone"
            if entry.pod not in wanted_pods
            else f"the pool's spec.gpu no longer names it for pod {entry.pod}"
        )
        plan.actions.append(LimitAction("delete", name, why=why))
    return plan


def _plan_pod(
    plan: LimitPlan,
    pod: PodFacts,
    kind: LimitKind,
    name: str,
    sized: LimitSize,
    entry: LedgerEntry | None,
    existing: PrefectLimit | None,
) -> None:
    def record(state: EntryState, restarts: int) -> None:
        plan.ledger[name] = LedgerEntry(
            limit_name=name,
            pod=pod.name,
            node=pod.node,
            size=sized.size,
            gpus=sized.gpus,
            restarts=restarts,
            state=state,
            active_slots=existing.active_slots if existing else 0,
            kind=kind,
        )

    if existing is None:
        record("Creating", pod.restarts)
        plan.actions.append(LimitAction("create", name, sized.size, sized.basis))
        return
    if entry is not None and pod.restarts > entry.restarts:
        # The worker container restarted in place: its flow runs died holding
        # slots (and GiB) whose leases would only expire minutes from now. A new limit
        # with the same name starts at zero and the old leases can never
        # decrement it.
        record("Creating", pod.restarts)
        plan.actions.append(
            LimitAction("recreate", name, sized.size, f"worker restarted ({pod.restarts})")
        )
        return
    restarts = entry.restarts if entry is not None else pod.restarts
    if existing.limit != sized.size or not existing.active:
        record("Creating", restarts)
        plan.actions.append(LimitAction("resize", name, sized.size, sized.basis))
        return
    record("Ready", restarts)


def settle(plan: LimitPlan, done: list[LimitAction]) -> Ledger:
    """The ledger after the actions in ``done`` succeeded; the others stay pending."""
    ledger = dict(plan.ledger)
    for action in done:
        if action.kind == "delete":
            ledger.pop(action.name, None)
        elif action.name in ledger:
            entry = ledger[action.name]
            slots = 0 if action.kind in ("create", "recreate") else entry.active_slots
            ledger[action.name] = replace(entry, state="Ready", active_slots=slots)
    return ledger


def deletion_costs(ledger: Ledger, pods: Mapping[str, PodFacts]) -> dict[str, int]:
    """Pod deletion costs to set so that a scale-down removes idle workers first.

    The cost of a worker is the number of GPU slots it held at this pass: the
    ReplicaSet deletes the lowest cost first, so busy GPUs are the last to go.
    Only pods whose annotation differs are returned.
    """
    costs: dict[str, int] = {}
    for entry in slot_entries(ledger):
        pod = pods.get(entry.pod)
        if entry.state != "Ready" or pod is None or pod.terminating or pod.finished:
            continue
        # No annotation means cost 0: idle workers need no patch (and no API call).
        if (pod.deletion_cost or 0) != entry.active_slots:
            costs[pod.name] = entry.active_slots
    return costs


def cleanup_deadline(deletion_timestamp: str | None, timeout_s: int) -> datetime:
    """When the finalizer stops waiting for Prefect: ``spec.prefect.finalizerTimeoutSeconds``
    after the pool's ``deletionTimestamp`` (after now, for a pool without one).

    Example:
        >>> cleanup_deadline("2026-12-05T10:00:00Z", 600).isoformat()
        '2026-12-05T10:10:00+00:00'
    """
    start = datetime.fromisoformat(deletion_timestamp) if deletion_timestamp else datetime.now(UTC)
    return start + timedelta(seconds=timeout_s)
