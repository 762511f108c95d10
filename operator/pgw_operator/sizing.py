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
- Slots per GPU are ``spec.gpu.slotsPerGpu``, or with ``spec.gpu.memoryPerSlot``
  floor(GPU memory / memory per slot), at least 1, the memory read from GPU
  feature discovery's ``nvidia.com/gpu.memory`` label (MiB; for a MIG profile
  ``nvidia.com/<profile>.memory``). A node without the label is a sizing
  problem that names it (Degraded), never a guess.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from pgw_operator.facts import GPU_MEMORY_LABEL, NodeFacts, PodFacts, parse_quantity
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


MIB = 2**20
# Kubernetes quantity suffixes (binary and decimal) for memory.
_QUANTITY_FACTORS = {"": 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                     "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}  # fmt: skip
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?$")


def parse_memory_quantity(text: str) -> int:
    """Bytes in a Kubernetes memory quantity (``20Gi``, ``24G``, ``512Mi``).

    Raises:
        ValueError: not a positive quantity.
    """
    match = _QUANTITY.match(text.strip())
    if match is None:
        raise ValueError(f"not a memory quantity: {text!r} (e.g. 20Gi)")
    size = int(float(match.group(1)) * _QUANTITY_FACTORS[match.group(2) or ""])
    if size <= 0:
        raise ValueError(f"memory quantity must be positive: {text!r}")
    return size


def memory_label(resource: str) -> str:
    """The GFD label with the memory of one device of ``resource``."""
    if resource.startswith(MIG_PREFIX):
        return f"{resource}.memory"
    return GPU_MEMORY_LABEL


def slots_per_gpu(
    spec: PoolSpec, node: NodeFacts | None, pod: str
) -> tuple[int, str] | SizingProblem:
    """Slots one GPU (or MIG slice) is worth, and why."""
    if spec.memory_per_slot is None:
        return spec.slots_per_gpu, f"{spec.slots_per_gpu} slot(s) per GPU"
    label = memory_label(spec.resource_name)
    if node is None:
        return SizingProblem(
            f"node of pod {pod} is not known yet (memoryPerSlot needs its {label})"
        )
    raw = node.labels.get(label)
    if raw is None:
        return SizingProblem(
            f"node {node.name} has no label {label} (GPU feature discovery), which "
            f"spec.gpu.memoryPerSlot needs to size pod {pod}; deploy GPU feature discovery "
            "or use spec.gpu.slotsPerGpu"
        )
    try:
        memory_mib = int(raw)
        per_slot = parse_memory_quantity(spec.memory_per_slot)
    except ValueError as exc:
        return SizingProblem(f"pod {pod}: {label}={raw!r}, memoryPerSlot: {exc}")
    slots = max(1, memory_mib * MIB // per_slot)
    return (
        slots,
        f"{label}={memory_mib} MiB / memoryPerSlot {spec.memory_per_slot} "
        f"= {slots} slot(s) per GPU",
    )


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

    per_gpu = slots_per_gpu(spec, node, pod.name)
    if isinstance(per_gpu, SizingProblem):
        return per_gpu
    per_gpu_slots, per_gpu_basis = per_gpu
    if spec.memory_per_slot is not None:
        basis += f", {per_gpu_basis}"

    if resource.startswith(MIG_PREFIX):
        profile = resource.removeprefix("nvidia.com/")
        return LimitSize(devices * per_gpu_slots, f"{devices} {profile}", basis)

    replicas = node.time_slice_replicas if node is not None else 1
    gpus = Fraction(devices, replicas)
    if replicas > 1:
        basis += f", time-sliced x{replicas} -> {_format_gpus(gpus)} physical GPU(s)"
    slots = max(1, math.floor(gpus * per_gpu_slots))
    return LimitSize(slots, _format_gpus(gpus), basis)
