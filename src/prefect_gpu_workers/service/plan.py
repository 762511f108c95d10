"""What a ``start`` service runs: its devices, workers, limits and when a name is live (pure).

- Devices: the GPUs NVML finds; a GPU in MIG mode counts as its MIG instances
  (each is a device of its own to CUDA, addressed by its ``MIG-...`` UUID).
  Stated capacity (``--gpus N``, each GPU's memory with ``--gpu-memory``)
  applies only when NVML finds no GPU.
- Workers: one named ``<id>`` over every device, or with ``--per-gpu`` one per
  device named ``<id>-gpu<index>`` (``<id>-gpu<index>-mig<k>`` for a MIG
  instance) and pinned with ``CUDA_VISIBLE_DEVICES``. Each has its own limit
  ``<limit prefix>:<worker name>``, and where its devices' memory is known
  a memory limit ``<limit prefix>-memory:<worker name>`` of that memory in
  whole GiB (each device rounded down on its own).
- Slots: ``--slots-per-gpu`` per device, or ``--memory-per-slot`` from each
  device's memory (see :mod:`.sizing`).
- Liveness: a worker name is *live* when a Prefect worker of that name is
  ONLINE (heartbeat within the server's offline threshold, 3 heartbeat
  intervals) in any work pool AND its heartbeat advances while the service
  watches it. ONLINE alone is not enough: a service killed a moment ago leaves
  a record that stays ONLINE for up to 3 intervals (90 s by default) but never
  beats again; the service watches until the server itself turns it OFFLINE,
  then takes the name over. A record that neither beats nor turns OFFLINE
  within the threshold, one foreman pass and a margin is refused (never guess "dead").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from prefect_gpu_workers.gpu import GpuInventory
from prefect_gpu_workers.naming import (
    LIMIT_PREFIX_ENV,
    MEMORY_LIMIT_SUFFIX,
    MIB_PER_GIB,
    WORKER_ID_ENV,
    gib_capacity,
    limit_name,
    memory_limit_name,
)
from prefect_gpu_workers.service.sizing import MIB, format_bytes, slots_for_memory

CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
# Set on every worker a service starts, inherited by its flow-run processes
# (which run in sessions of their own): how the service finds all of them.
SERVICE_WORKER_ENV = "PGW_SERVICE_WORKER"
# Prefect's worker heartbeat default, for a record that does not say its interval.
DEFAULT_HEARTBEAT_S = 30.0
# How often Prefect's server looks for silent workers to mark OFFLINE (its
# foreman loop, default 15 s): a record turns OFFLINE up to one loop after
# its threshold passed.
FOREMAN_LOOP_S = 15.0
# Flow runs a worker takes per GPU slot by default: a run spends part of its
# time off the GPU (download, save), so more runs than slots keep slots busy.
FLOW_RUNS_PER_SLOT = 3


@dataclass(frozen=True)
class Device:
    """One device CUDA can be pinned to."""

    label: str  # "gpu0", "gpu1-mig2": the suffix of a per-GPU worker name
    visible_id: str  # the CUDA_VISIBLE_DEVICES value: a UUID, or an index when none is known
    description: str
    # NVML's, or the stated --gpu-memory; None: unknown (stated capacity alone)
    memory_mib: int | None


def memory_text(mib: int) -> str:
    """A memory size as the worker's ``--gpu-memory`` takes it: ``40GiB``, else ``81559MiB``.

    Example:
        >>> memory_text(40960), memory_text(81559)
        ('40GiB', '81559MiB')
    """
    gib, rest = divmod(mib, MIB_PER_GIB)
    return f"{gib}GiB" if not rest else f"{mib}MiB"


def devices_from(
    inventory: GpuInventory, stated_gpus: int | None, stated_memory_mib: int | None = None
) -> tuple[Device, ...]:
    """The devices to plan for: NVML's (MIG instances as devices), else ``stated_gpus``
    GPUs of ``stated_memory_mib`` each (unknown memory when not stated).

    NVML wins where it finds GPUs: a stated count or memory is only a check
    there, and one that differs (memory: in whole GiB, what a memory limit
    counts) is an error, never silently ignored.

    Raises:
        ValueError: neither gives a device, ``stated_gpus`` or
            ``stated_memory_mib`` contradicts NVML, or a stated memory under 1 GiB.
    """
    if stated_memory_mib is not None and gib_capacity(stated_memory_mib) < 1:
        raise ValueError(
            f"--gpu-memory {stated_memory_mib} MiB is under 1 GiB, the unit of a memory limit"
        )
    if inventory.count:
        if stated_gpus is not None and stated_gpus != inventory.count:
            raise ValueError(
                f"--gpus {stated_gpus} contradicts NVML, which finds {inventory.describe()}; "
                "drop --gpus (it states capacity only where NVML finds no GPU)"
            )
        devices: list[Device] = []
        for gpu in inventory.devices:
            if gpu.mig_devices:
                devices.extend(
                    Device(
                        f"gpu{gpu.index}-mig{mig.index}",
                        mig.uuid,
                        f"GPU {gpu.index} MIG {mig.index} ({gpu.name}, {mig.memory_mib} MiB)",
                        mig.memory_mib,
                    )
                    for mig in gpu.mig_devices
                )
            else:
                devices.append(
                    Device(
                        f"gpu{gpu.index}",
                        gpu.uuid or str(gpu.index),
                        f"GPU {gpu.index} ({gpu.name}, {gpu.memory_mib} MiB)",
                        gpu.memory_mib,
                    )
                )
        _check_stated_memory(devices, stated_memory_mib)
        return tuple(devices)
    if stated_gpus is None:
        raise ValueError(
            f"{inventory.describe()}: state the capacity with --gpus N (and --slots-per-gpu)"
        )
    if stated_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {stated_gpus}")
    memory = "" if stated_memory_mib is None else f", {format_bytes(stated_memory_mib * MIB)}"
    return tuple(
        Device(f"gpu{index}", str(index), f"GPU {index} (stated{memory})", stated_memory_mib)
        for index in range(stated_gpus)
    )


def _check_stated_memory(devices: Sequence[Device], stated_mib: int | None) -> None:
    if stated_mib is None:
        return
    differ = [
        f"{device.description} = {gib_capacity(device.memory_mib or 0)} GiB"
        for device in devices
        if device.memory_mib is None or gib_capacity(device.memory_mib) != gib_capacity(stated_mib)
    ]
    if differ:
        raise ValueError(
            f"--gpu-memory {memory_text(stated_mib)} ({gib_capacity(stated_mib)} GiB) contradicts "
            f"NVML, which finds {'; '.join(differ)}; drop --gpu-memory (it states each GPU's "
            "memory only where NVML finds no GPU; NVML's own memory is used otherwise)"
        )


@dataclass(frozen=True)
class SlotsPerGpu:
    slots: int


@dataclass(frozen=True)
class MemoryPerSlot:
    bytes_per_slot: int


Sizing = SlotsPerGpu | MemoryPerSlot


@dataclass(frozen=True)
class PlannedLimit:
    """A Prefect global concurrency limit of a worker: its slot limit or its memory limit.

    The service treats both alike: created fresh, recreated after a crash or
    a takeover (never resized while its holders may be dead), put back as
    planned when changed, deleted on stop.
    """

    name: str
    size: int
    unit: str  # what one unit of it is, for output: "slot(s)", "GiB"

    def amount(self, count: int) -> str:
        """``count`` in this limit's unit: ``2 slot(s)``, ``80 GiB``."""
        return f"{count} {self.unit}"


@dataclass(frozen=True)
class WorkerMemory:
    """A worker's GPU memory: its memory limit's size, and what its command line states.

    ``gpus`` and ``gpu_memory`` are the worker's ``--gpus`` and ``--gpu-memory``
    (its broker places memory requests on them); both ``None`` where its GPUs'
    memory differs, so that the worker reads each GPU's own from NVML.
    """

    gib: int
    gpus: int | None
    gpu_memory: str | None


@dataclass(frozen=True)
class ServiceWorker:
    """One Prefect worker the service runs, and its limits."""

    name: str  # the worker's WORKER_ID and Prefect worker name
    limit_prefix: str
    slots: int
    flow_runs: int
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES; None: inherit (all devices)
    devices: tuple[str, ...]  # descriptions, for output
    memory: WorkerMemory | None = None  # None: its devices' memory is unknown, no memory limit

    @property
    def limit_name(self) -> str:
        return limit_name(self.name, self.limit_prefix)

    @property
    def limits(self) -> tuple[PlannedLimit, ...]:
        """Its slot limit, then its memory limit where its memory is known."""
        slot_limit = PlannedLimit(self.limit_name, self.slots, "slot(s)")
        if self.memory is None:
            return (slot_limit,)
        return slot_limit, PlannedLimit(memory_limit_name(self.name, self.limit_prefix),
                                        self.memory.gib, "GiB")  # fmt: skip

    def env(self) -> dict[str, str]:
        """Variables this worker (and every flow run it starts) gets on top of the service's."""
        env = {
            WORKER_ID_ENV: self.name,
            LIMIT_PREFIX_ENV: self.limit_prefix,
            SERVICE_WORKER_ENV: self.name,
        }
        if self.visible_devices is not None:
            env[CUDA_VISIBLE_DEVICES] = self.visible_devices
        return env


@dataclass(frozen=True)
class ServicePlan:
    workers: tuple[ServiceWorker, ...]
    messages: tuple[str, ...]


def _device_slots(device: Device, sizing: Sizing) -> tuple[int, str]:
    if isinstance(sizing, SlotsPerGpu):
        if sizing.slots < 1:
            raise ValueError(f"--slots-per-gpu must be at least 1, got {sizing.slots}")
        return sizing.slots, f"{device.description}: {sizing.slots} slot(s) (--slots-per-gpu)"
    if device.memory_mib is None:
        raise ValueError(
            f"--memory-per-slot {format_bytes(sizing.bytes_per_slot)} needs each GPU's memory, "
            f"which NVML gives; {device.description} has none. With stated --gpus, state "
            "--gpu-memory too, or size with --slots-per-gpu"
        )
    sized = slots_for_memory(device.memory_mib, sizing.bytes_per_slot, device.description)
    return sized.slots, sized.message


def worker_memory(devices: Sequence[Device]) -> WorkerMemory | None:
    """The GPU memory of a worker over ``devices``; ``None`` when any device's is unknown.

    Its memory limit is the sum of each device's memory in whole GiB, each
    rounded down on its own (what :func:`~prefect_gpu_workers.naming.gib_capacity`
    adds per GPU). Its command line states ``--gpus``/``--gpu-memory`` only
    where every device has the same memory.

    Raises:
        ValueError: the devices hold under 1 GiB together (a memory limit of 0
            would block every step that asks for memory).

    Example:
        >>> a100 = Device("gpu0", "0", "GPU 0", 81920)
        >>> h100 = Device("gpu1", "1", "GPU 1", 81559)
        >>> worker_memory([a100, a100])
        WorkerMemory(gib=160, gpus=2, gpu_memory='80GiB')
        >>> worker_memory([a100, h100])
        WorkerMemory(gib=159, gpus=None, gpu_memory=None)
    """
    known = [device.memory_mib for device in devices if device.memory_mib is not None]
    if not devices or len(known) < len(devices):
        return None
    gib = sum(gib_capacity(mib) for mib in known)
    if gib < 1:
        raise ValueError(
            f"{', '.join(d.description for d in devices)}: under 1 GiB of GPU memory, "
            "the unit of a memory limit"
        )
    if len(set(known)) > 1:
        return WorkerMemory(gib, None, None)
    return WorkerMemory(gib, len(known), memory_text(known[0]))


def _worker_line(worker: ServiceWorker) -> str:
    """One line per worker: its limits, flow runs, pinning and memory placement."""
    limits = ", ".join(f"{limit.name} = {limit.amount(limit.size)}" for limit in worker.limits)
    line = f"worker {worker.name}: limit(s) {limits}, {worker.flow_runs} flow run(s) at once"
    if worker.visible_devices is not None:
        line += f", {CUDA_VISIBLE_DEVICES}={worker.visible_devices}"
    if worker.memory is not None:
        if worker.memory.gpus is None:
            line += ", GPU memory placed per GPU as the worker reads it from NVML (they differ)"
        else:
            line += f", GPU memory placed on {worker.memory.gpus} x {worker.memory.gpu_memory}"
    return line


def plan_service(
    worker_id: str,
    devices: Sequence[Device],
    sizing: Sizing,
    *,
    per_gpu: bool = False,
    flow_runs: int | None = None,
    limit_prefix: str = "gpu",
) -> ServicePlan:
    """The workers of one service, with their limits, slots and devices.

    Args:
        worker_id: the service's id (:func:`.identity.resolve_worker_id`).
        devices: from :func:`devices_from`.
        sizing: slots per device, or memory per slot.
        per_gpu: one worker per device, pinned with CUDA_VISIBLE_DEVICES.
        flow_runs: flow runs each worker takes at once; default 3 per slot.
        limit_prefix: the part of the limit name before the colon.

    Raises:
        ValueError: no device, bad sizing, or a bad flow-run count.

    Example:
        >>> plan = plan_service("box", devices_from(GpuInventory(), 2), SlotsPerGpu(2),
        ...                     per_gpu=True)
        >>> [(w.name, w.slots, w.visible_devices) for w in plan.workers]
        [('box-gpu0', 2, '0'), ('box-gpu1', 2, '1')]
    """
    if not devices:
        raise ValueError("no device to plan for")
    if flow_runs is not None and flow_runs < 1:
        raise ValueError(f"--flow-runs must be at least 1, got {flow_runs}")
    sized = [(device, *_device_slots(device, sizing)) for device in devices]
    messages = [message for _device, _slots, message in sized]

    def worker(name: str, group: Sequence[tuple[Device, int, str]], pinned: bool) -> ServiceWorker:
        slots = sum(slots for _device, slots, _message in group)
        runs = flow_runs if flow_runs is not None else FLOW_RUNS_PER_SLOT * slots
        visible = ",".join(device.visible_id for device, _s, _m in group) if pinned else None
        return ServiceWorker(name, limit_prefix, slots, runs, visible,
                             tuple(device.description for device, _s, _m in group),
                             worker_memory([device for device, _s, _m in group]))  # fmt: skip

    if per_gpu:
        workers = tuple(worker(f"{worker_id}-{item[0].label}", [item], True) for item in sized)
    else:
        workers = (worker(worker_id, sized, False),)
    if any(planned.memory is None for planned in workers):
        messages.append(
            "GPU memory unknown (NVML finds no GPU and no --gpu-memory is stated): no memory "
            f"limit {limit_prefix}{MEMORY_LIMIT_SUFFIX}:<worker>; GPU steps are limited by "
            "slots alone"
        )
    messages.extend(_worker_line(planned) for planned in workers)
    return ServicePlan(workers, tuple(messages))


# ---------------------------------------------------------------- liveness


@dataclass(frozen=True)
class WorkerSighting:
    """A Prefect worker record with a given name, as read from one work pool."""

    pool: str
    name: str
    online: bool
    last_heartbeat: datetime | None
    heartbeat_interval_s: float | None


def watch_seconds(sightings: Sequence[WorkerSighting]) -> float:
    """The most to watch ONLINE records: the server's offline threshold (three
    heartbeat intervals), one pass of its foreman loop, and a margin; 0 when
    no record is ONLINE.

    Within it, a live worker beats again, and a dead one's record turns
    OFFLINE by the server's own clock. A record that does neither is refused.
    """
    intervals = [s.heartbeat_interval_s or DEFAULT_HEARTBEAT_S for s in sightings if s.online]
    return 3 * max(intervals) + FOREMAN_LOOP_S + 10.0 if intervals else 0.0


@dataclass(frozen=True)
class Liveness:
    live: bool | None  # None: still ONLINE with no new heartbeat, keep watching
    reason: str


def judge_liveness(
    name: str,
    before: Sequence[WorkerSighting],
    after: Sequence[WorkerSighting] | None,
) -> Liveness:
    """Is ``name`` used by a live worker? ``before`` is the first read, ``after``
    a later one (``None`` when nothing needed watching).

    Live: a record's heartbeat moved. Dead: every record that was ONLINE is now
    OFFLINE (the server's threshold passed with no heartbeat). Otherwise
    undecided (``live is None``): read again.
    """
    online = [s for s in before if s.online]
    if not online:
        where = ", ".join(f"pool {s.pool}" for s in before)
        reason = f"a worker record in {where} is OFFLINE" if before else "no worker record"
        return Liveness(False, f"{name}: {reason}")
    if after is None:
        raise ValueError("ONLINE records must be watched before judging")
    seen: Mapping[str, datetime | None] = {s.pool: s.last_heartbeat for s in before}
    for sighting in after:
        earlier = seen.get(sighting.pool)
        beat = sighting.last_heartbeat
        if sighting.online and beat is not None and (earlier is None or beat > earlier):
            return Liveness(
                True,
                f"worker {name!r} is live in work pool {sighting.pool!r}: its heartbeat moved "
                f"to {beat.isoformat(timespec='seconds')} while this service watched",
            )
    watched = {s.pool for s in online}
    if any(s.online for s in after if s.pool in watched):
        return Liveness(None, f"{name}: ONLINE, no new heartbeat yet")
    pools = ", ".join(sorted(watched))
    return Liveness(
        False,
        f"{name}: the record in {pools} went OFFLINE without a new heartbeat; "
        "a service that stopped without cleaning up left it (taken over)",
    )


# ---------------------------------------------------------------- restarts


@dataclass(frozen=True)
class RestartPolicy:
    """A crashed worker is restarted after 2, 4, 8 ... 60 s; after ``give_up_after``
    crashes in a row, each within ``stable_s`` of its start, the service exits
    non-zero (cleaning up first) so that systemd or a person sees a crash loop."""

    base_s: float = 2.0
    cap_s: float = 60.0
    give_up_after: int = 5
    stable_s: float = 120.0

    def delay(self, crashes_in_a_row: int) -> float:
        """Seconds to wait before restart number ``crashes_in_a_row`` (1, 2, ...)."""
        return float(min(self.cap_s, self.base_s * 2 ** max(0, crashes_in_a_row - 1)))

    def crashes_in_a_row(self, previous: int, ran_s: float) -> int:
        """The count after a crash of a worker that ran ``ran_s`` seconds."""
        return 1 if ran_s >= self.stable_s else previous + 1

    def gives_up(self, crashes_in_a_row: int) -> bool:
        return crashes_in_a_row >= self.give_up_after
