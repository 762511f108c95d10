"""The few facts about pods and nodes that decisions need, extracted from raw objects.

Indexes keep these small frozen records instead of whole bodies, so memory stays
flat with many pods and decisions can be tested without Kubernetes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgw_operator.spec import WORKER_CONTAINER

# Lower cost, deleted first when a ReplicaSet scales down.
DELETION_COST_ANNOTATION = "controller.kubernetes.io/pod-deletion-cost"
# GPU feature discovery labels (NVIDIA GFD).
REPLICAS_LABEL = "nvidia.com/gpu.replicas"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
# Memory of one GPU in MiB; a MIG profile has its own (nvidia.com/mig-1g.10gb.memory).
GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"


def parse_quantity(value: Any) -> int:
    """Extended resources are whole numbers; accept ints and plain digit strings."""
    if value is None:
        return 0
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"not a whole-number resource quantity: {value!r}")
    return int(text)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class PodFacts:
    name: str
    node: str | None
    phase: str
    terminating: bool
    ready: bool
    restarts: int
    # The worker container's resource limits, e.g. {"nvidia.com/gpu": "2"}.
    limits: Mapping[str, str] = field(default_factory=dict)
    deletion_cost: int | None = None
    uid: str = ""  # owns the pod's GpuWorkerLimit

    @property
    def finished(self) -> bool:
        """Evicted and completed pods keep their object but have no live worker."""
        return self.phase in ("Succeeded", "Failed")

    @classmethod
    def from_pod(cls, name: str, spec: Mapping[str, Any], status: Mapping[str, Any],
                 meta: Mapping[str, Any]) -> PodFacts:  # fmt: skip
        containers = spec.get("containers") or []
        worker = next((c for c in containers if c.get("name") == WORKER_CONTAINER), None)
        limits = dict(((worker or {}).get("resources") or {}).get("limits") or {})
        statuses = status.get("containerStatuses") or []
        worker_status: Mapping[str, Any] = next(
            (s for s in statuses if s.get("name") == WORKER_CONTAINER), {}
        )
        conditions = status.get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return cls(
            name=name,
            node=spec.get("nodeName") or None,
            phase=status.get("phase") or "Pending",
            terminating=bool(meta.get("deletionTimestamp")),
            ready=ready,
            restarts=int(worker_status.get("restartCount") or 0),
            limits={k: str(v) for k, v in limits.items()},
            deletion_cost=_int_or_none(
                (meta.get("annotations") or {}).get(DELETION_COST_ANNOTATION)
            ),
            uid=str(meta.get("uid") or ""),
        )


@dataclass(frozen=True)
class NodeFacts:
    name: str
    allocatable: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_node(cls, name: str, status: Mapping[str, Any],
                  labels: Mapping[str, str]) -> NodeFacts:  # fmt: skip
        return cls(
            name=name,
            allocatable={k: str(v) for k, v in (status.get("allocatable") or {}).items()},
            labels=dict(labels),
        )

    @property
    def time_slice_replicas(self) -> int:
        """Replicas per physical GPU on a time-sliced or MPS node; 1 otherwise."""
        try:
            return max(1, int(self.labels.get(REPLICAS_LABEL, "1")))
        except ValueError:
            return 1
