"""GpuWorkerLimit objects: the ledger kept as one small object per worker pod.

A pool's ledger (plan.py) names every limit the operator created for it. It
lives in Kubernetes as one ``GpuWorkerLimit`` per worker pod, named after the
pod, owned by it (the garbage collector deletes it with the pod) and held by a
finalizer until the operator has deleted the limits it names. A pod's limits
cost O(1) writes whatever the pool's size, where one ledger in the pool's
status was rewritten whole by every change.

Pure functions: what an object says (:class:`WorkerLimitRecord`), the
manifest to create, and which writes bring the objects in line with a ledger
(:func:`record_writes`). ``reconcile.py`` carries the writes out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pgw_operator.desired import pool_labels
from pgw_operator.plan import EntryState, Ledger, LedgerEntry, LimitKind
from pgw_operator.spec import GROUP, VERSION

LIMIT_KIND = "GpuWorkerLimit"
LIMIT_PLURAL = "gpuworkerlimits"
# Held until the operator has deleted the Prefect limits the object names.
LIMITS_FINALIZER = f"{GROUP}/prefect-limits"


@dataclass(frozen=True)
class LimitRecord:
    """One Prefect limit named in a GpuWorkerLimit's ``spec.limits``."""

    kind: LimitKind
    name: str
    size: int
    gpus: str

    def to_spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "size": self.size, "gpus": self.gpus}


@dataclass(frozen=True)
class WorkerLimitRecord:
    """What one GpuWorkerLimit says (its spec, its state) and whether it is being deleted."""

    pool: str
    pod: str
    node: str | None
    restarts: int
    limits: tuple[LimitRecord, ...]
    # Not written: what the operator knows of Prefect (Creating until a pass saw it so).
    state: EntryState = "Creating"
    deleting: bool = False  # deletionTimestamp set (the pod went, or someone deleted it)

    @classmethod
    def from_object(cls, body: Mapping[str, Any]) -> WorkerLimitRecord:
        spec = body.get("spec") or {}
        meta = body.get("metadata") or {}
        limits = tuple(
            LimitRecord(
                kind="memory" if item.get("kind") == "memory" else "slots",
                name=str(item["name"]),
                size=int(item.get("size") or 0),
                gpus=str(item.get("gpus") or ""),
            )
            for item in spec.get("limits") or []
            if item.get("name")
        )
        return cls(
            pool=str(spec.get("pool") or ""),
            pod=str(spec.get("pod") or meta.get("name") or ""),
            node=spec.get("node") or None,
            restarts=int(spec.get("restarts") or 0),
            limits=limits,
            deleting=bool(meta.get("deletionTimestamp")),
        )

    def spec(self) -> dict[str, Any]:
        return {
            "pool": self.pool,
            "pod": self.pod,
            "node": self.node or "",
            "restarts": self.restarts,
            "limits": [limit.to_spec() for limit in self.limits],
        }

    def entries(self) -> list[LedgerEntry]:
        """The ledger entries this object stands for."""
        return [
            LedgerEntry(
                limit_name=limit.name,
                pod=self.pod,
                node=self.node,
                size=limit.size,
                gpus=limit.gpus,
                restarts=self.restarts,
                state=self.state,
                kind=limit.kind,
            )
            for limit in self.limits
        ]


def ledger_of(records: Iterable[WorkerLimitRecord]) -> Ledger:
    """The ledger the objects stand for (an object being deleted still names its limits)."""
    return {entry.limit_name: entry for record in records for entry in record.entries()}


def records_of(pool: str, ledger: Ledger) -> dict[str, WorkerLimitRecord]:
    """The objects a ledger needs, one per pod with any entry: an entry being
    deleted keeps its object until its limit is gone (a crash meanwhile must
    still find it).

    Example:
        >>> entry = LedgerEntry("gpu:w-0", "w-0", "n", 2, "2", 0, "Ready")
        >>> records_of("p", {"gpu:w-0": entry})["w-0"].limits[0].name
        'gpu:w-0'
    """
    by_pod: dict[str, list[LedgerEntry]] = {}
    for name in sorted(ledger):
        entry = ledger[name]
        by_pod.setdefault(entry.pod, []).append(entry)
    records: dict[str, WorkerLimitRecord] = {}
    for pod, entries in by_pod.items():
        entries.sort(key=lambda e: (e.kind != "slots", e.limit_name))  # the slot limit first
        first = entries[0]
        records[pod] = WorkerLimitRecord(
            pool=pool,
            pod=pod,
            node=first.node,
            restarts=max(e.restarts for e in entries),
            limits=tuple(LimitRecord(e.kind, e.limit_name, e.size, e.gpus) for e in entries),
            state=_record_state(entries),
        )
    return records


def _record_state(entries: list[LedgerEntry]) -> EntryState:
    states = {entry.state for entry in entries}
    if "Deleting" in states:
        return "Deleting"
    return "Creating" if "Creating" in states else "Ready"


WriteKind = Literal["create", "spec", "release"]


@dataclass(frozen=True)
class RecordWrite:
    """One write to a pod's GpuWorkerLimit.

    create: a new object, ahead of its limits; spec: its limits, node or restarts
    changed, ahead of the change; release: its limits are gone from Prefect, so its
    finalizer comes off and it goes. Its state (Creating, Ready) is the operator's
    memory, not written: after a restart the first full pass reads every limit back.
    """

    kind: WriteKind
    pod: str
    record: WorkerLimitRecord | None = None


def record_writes(
    written: Mapping[str, WorkerLimitRecord],
    wanted: Mapping[str, WorkerLimitRecord],
    pods: Iterable[str],
) -> list[RecordWrite]:
    """The writes that bring the objects of ``pods`` from ``written`` to ``wanted``.

    Example:
        >>> slot = LimitRecord("slots", "gpu:w-0", 1, "1")
        >>> record = WorkerLimitRecord("p", "w-0", "n", 0, (slot,))
        >>> [w.kind for w in record_writes({}, {"w-0": record}, ["w-0"])]
        ['create']
        >>> ready = WorkerLimitRecord("p", "w-0", "n", 0, record.limits, "Ready")
        >>> record_writes({"w-0": record}, {"w-0": ready}, ["w-0"])
        []
        >>> [w.kind for w in record_writes({"w-0": ready}, {}, ["w-0"])]
        ['release']
    """
    writes: list[RecordWrite] = []
    for pod in sorted(set(pods)):
        old, new = written.get(pod), wanted.get(pod)
        if new is None:
            if old is not None:
                writes.append(RecordWrite("release", pod))
        elif old is None:
            writes.append(RecordWrite("create", pod, new))
        elif old.spec() != new.spec():
            writes.append(RecordWrite("spec", pod, new))
    return writes


def limit_manifest(record: WorkerLimitRecord, namespace: str, pod_uid: str) -> dict[str, Any]:
    """The GpuWorkerLimit to create for ``record``: owned by its pod, held by the finalizer."""
    owner = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": record.pod,
        "uid": pod_uid,
        # Not the pod's controller, and nothing blocks the pod's deletion on it.
        "blockOwnerDeletion": False,
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": LIMIT_KIND,
        "metadata": {
            "name": record.pod,
            "namespace": namespace,
            "labels": {**pool_labels(record.pool), "app.kubernetes.io/component": "worker-limit"},
            "ownerReferences": [owner] if pod_uid else [],
            "finalizers": [LIMITS_FINALIZER],
        },
        "spec": record.spec(),
    }
