"""What a worker pod's limit should be: slots from the GPUs that pod really has.

- The worker container's limit for the pool's resource, when set: the device
  plugin gives the container exactly that many devices.
- Otherwise, for a whole-node pool, the node's allocatable for the resource
  (allocatable, not capacity: it drops when a device turns unhealthy).
- Time-sliced / MPS nodes advertise replicas x physical GPUs; the
  ``nvidia.com/gpu.replicas`` label gives the factor, and devices are divided
  by it so a slice is never counted as a whole GPU. A worker with any device
  still gets at least one slot.
- MIG slices (``nvidia.com/mig-*``) are isolated GPU instances: one slice is one
  device, reported as slices rather than as GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

from pgw_operator.facts import NodeFacts, PodFacts, parse_quantity
from pgw_operator.spec import PoolSpec

MIG_PREFIX = "nvidia.com/mig-"


@dataclass(frozen=True)
class LimitSize:
    slots: int
    gpus: str  # what stands behind the slots, for status: "2", "0.25", "3 mig-1g.10gb"
    basis: str  # why, for events and logs


@dataclass(frozen=True)
class SizingProblem:
    reason: str


def _format_gpus(gpus: Fraction) -> str:
    if gpus.denominator == 1:
        return str(gpus.numerator)
    return f"{float(gpus):.3g}"


def size_limit(pod: PodFacts, node: NodeFacts | None, spec: PoolSpec) -> LimitSize | SizingProblem:
    """The limit a bound pod should have, or why it can have none."""
    resource = spec.resource_name
    container_devices = parse_quantity(pod.limits.get(resource))
    if container_devices:
        devices, basis = container_devices, f"container limit {resource}={container_devices}"
    elif spec.whole_node:
        if node is None:
            return SizingProblem(f"node {pod.node!r} of pod {pod.name} is not known yet")
        devices = parse_quantity(node.allocatable.get(resource))
        basis = f"node {node.name} allocatable {resource}={devices}"
    else:
        return SizingProblem(f"pod {pod.name} has no {resource} limit on its worker container")
    if devices == 0:
        return SizingProblem(f"pod {pod.name}: {basis}, no GPU to give slots to")

    if resource.startswith(MIG_PREFIX):
        profile = resource.removeprefix("nvidia.com/")
        return LimitSize(devices * spec.slots_per_gpu, f"{devices} {profile}", basis)

    replicas = node.time_slice_replicas if node is not None else 1
    gpus = Fraction(devices, replicas)
    if replicas > 1:
        basis += f", time-sliced x{replicas} -> {_format_gpus(gpus)} physical GPU(s)"
    slots = max(1, math.floor(gpus * spec.slots_per_gpu))
    return LimitSize(slots, _format_gpus(gpus), basis)
