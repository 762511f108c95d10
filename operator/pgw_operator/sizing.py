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
- With ``spec.gpu.memory`` the worker also gets a GPU memory limit, in whole
  GiB: each GPU's memory (``auto``: the same label; else the size stated)
  rounded down to GiB, times the GPUs behind the slots (a time-sliced share
  gets its share, rounded down; a MIG slice counts as one device of its own
  memory). Below 1 GiB is a sizing problem, never a limit of 0.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from pgw_operator.facts import GPU_MEMORY_LABEL, NodeFacts, PodFacts, parse_quantity
from pgw_operator.spec import GPU_MEMORY_AUTO, PoolSpec
from prefect_gpu_workers.naming import gib_capacity, parse_memory_mib

MIG_PREFIX = "nvidia.com/mig-"


@dataclass(frozen=True)
class LimitSize:
    size: int  # the limit: slots, or GiB for the memory limit
    gpus: str  # what stands behind it, for status: "2", "0.25", "3 mig-1g.10gb"
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


def node_gpu_memory_mib(
    spec: PoolSpec, node: NodeFacts | None, pod: str, field: str, instead: str
) -> tuple[int, str] | SizingProblem:
    """One device's memory in MiB from the node's GFD label, and where it came from.

    ``field`` is the spec field that needs it and ``instead`` what the problem
    suggests in its place: the problem names the label, so the pool says why.
    """
    label = memory_label(spec.resource_name)
    if node is None:
        return SizingProblem(f"node of pod {pod} is not known yet ({field} needs its {label})")
    raw = node.labels.get(label)
    if raw is None:
        return SizingProblem(
            f"node {node.name} has no label {label} (GPU feature discovery), which "
            f"{field} needs to size pod {pod}; deploy GPU feature discovery or {instead}"
        )
    try:
        return int(raw), f"{label}={int(raw)} MiB"
    except ValueError:
        return SizingProblem(f"pod {pod}: {label}={raw!r} is not a whole number of MiB")


def slots_per_gpu(
    spec: PoolSpec, node: NodeFacts | None, pod: str
) -> tuple[int, str] | SizingProblem:
    """Slots one GPU (or MIG slice) is worth, and why."""
    if spec.memory_per_slot is None:
        return spec.slots_per_gpu, f"{spec.slots_per_gpu} slot(s) per GPU"
    memory = node_gpu_memory_mib(
        spec, node, pod, "spec.gpu.memoryPerSlot", "use spec.gpu.slotsPerGpu"
    )
    if isinstance(memory, SizingProblem):
        return memory
    memory_mib, source = memory
    try:
        per_slot = parse_memory_quantity(spec.memory_per_slot)
    except ValueError as exc:
        return SizingProblem(f"pod {pod}: memoryPerSlot: {exc}")
    slots = max(1, memory_mib * MIB // per_slot)
    return slots, f"{source} / memoryPerSlot {spec.memory_per_slot} = {slots} slot(s) per GPU"


def gpu_memory_mib(
    spec: PoolSpec, node: NodeFacts | None, pod: str
) -> tuple[int, str] | SizingProblem:
    """One GPU's (or MIG slice's) memory in MiB for the memory limit, and why:
    ``spec.gpu.memory`` stated, or with ``auto`` the node's label."""
    if spec.gpu_memory == GPU_MEMORY_AUTO:
        return node_gpu_memory_mib(
            spec,
            node,
            pod,
            "spec.gpu.memory: auto",
            "state each GPU's memory (spec.gpu.memory: 80Gi)",
        )
    try:
        mib = parse_memory_mib(str(spec.gpu_memory))
    except ValueError as exc:
        return SizingProblem(f"pod {pod}: spec.gpu.memory: {exc}")
    return mib, f"spec.gpu.memory {spec.gpu_memory} per GPU"


def _format_gpus(gpus: Fraction) -> str:
    if gpus.denominator == 1:
        return str(gpus.numerator)
    return f"{float(gpus):.3g}"


@dataclass(frozen=True)
class PodGpus:
    """The devices behind a worker's limits, and why."""

    devices: int  # of spec.gpu.resourceName
    gpus: Fraction  # physical GPUs behind them: a time-sliced replica is a share of one
    mig_profile: str | None  # a MIG slice is a device of its own, never a share
    basis: str

    @property
    def label(self) -> str:
        """For status: "2", "0.25", "3 mig-1g.10gb"."""
        if self.mig_profile is not None:
            return f"{self.devices} {self.mig_profile}"
        return _format_gpus(self.gpus)

    def times(self, per_gpu: int) -> int:
        """``per_gpu`` (slots, GiB) of each GPU or slice, for all of them, rounded down."""
        if self.mig_profile is not None:
            return self.devices * per_gpu
        return math.floor(self.gpus * per_gpu)


def pod_gpus(pod: PodFacts, node: NodeFacts | None, spec: PoolSpec) -> PodGpus | SizingProblem:
    """The GPUs a bound pod really has, or why it can have no limit."""
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
        return PodGpus(devices, Fraction(devices), resource.removeprefix("nvidia.com/"), basis)
    replicas = node.time_slice_replicas if node is not None else 1
    gpus = Fraction(devices, replicas)
    if replicas > 1:
        basis += f", time-sliced x{replicas} -> {_format_gpus(gpus)} physical GPU(s)"
    return PodGpus(devices, gpus, None, basis)


PerGpu = Callable[[PoolSpec, NodeFacts | None, str], tuple[int, str] | SizingProblem]


def _gpus_and_per_gpu(
    pod: PodFacts, node: NodeFacts | None, spec: PoolSpec, per_gpu: PerGpu
) -> tuple[PodGpus, int, str] | SizingProblem:
    """The pod's GPUs and what each is worth (``per_gpu``: slots, MiB), or the first problem."""
    gpus = pod_gpus(pod, node, spec)
    if isinstance(gpus, SizingProblem):
        return gpus
    each = per_gpu(spec, node, pod.name)
    if isinstance(each, SizingProblem):
        return each
    return gpus, *each


def size_limit(pod: PodFacts, node: NodeFacts | None, spec: PoolSpec) -> LimitSize | SizingProblem:
    """The slot limit a bound pod should have, or why it can have none."""
    sized = _gpus_and_per_gpu(pod, node, spec, slots_per_gpu)
    if isinstance(sized, SizingProblem):
        return sized
    gpus, per_gpu_slots, per_gpu_basis = sized
    basis = gpus.basis
    if spec.memory_per_slot is not None:
        basis += f", {per_gpu_basis}"
    # A worker with any device gets at least one slot.
    return LimitSize(max(1, gpus.times(per_gpu_slots)), gpus.label, basis)


def size_memory_limit(
    pod: PodFacts, node: NodeFacts | None, spec: PoolSpec
) -> LimitSize | SizingProblem:
    """The GPU memory limit (whole GiB) a bound pod should have, or why it can have none."""
    sized = _gpus_and_per_gpu(pod, node, spec, gpu_memory_mib)
    if isinstance(sized, SizingProblem):
        return sized
    gpus, mib, source = sized
    per_gpu = gib_capacity(mib)
    gib = gpus.times(per_gpu)
    basis = f"{gpus.basis}, {source} -> {per_gpu} GiB per GPU x {gpus.label} = {gib} GiB"
    if gib < 1:
        return SizingProblem(f"pod {pod.name}: {basis}: no whole GiB to give a memory limit")
    return LimitSize(gib, gpus.label, basis)
