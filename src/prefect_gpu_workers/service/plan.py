"""What a ``start`` service runs: its devices, workers, limits and when a name is live (pure).

- Devices: the GPUs NVML finds; a GPU in MIG mode counts as its MIG instances
  (each is a device of its own to CUDA, addressed by its ``MIG-...`` UUID).
  Stated capacity (``--gpus N``) applies only when NVML finds no GPU.
- Workers: one named ``<id>`` over every device, or with ``--per-gpu`` one per
  device named ``<id>-gpu<index>`` (``<id>-gpu<index>-mig<k>`` for a MIG
  instance) and pinned with ``CUDA_VISIBLE_DEVICES``. Each has its own limit
  ``<limit prefix>:<worker name>``.
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
from prefect_gpu_workers.naming import LIMIT_PREFIX_ENV, WORKER_ID_ENV, limit_name
from prefect_gpu_workers.service.sizing import format_bytes, slots_for_memory

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
    memory_mib: int | None  # None for stated capacity (NVML found nothing)


def devices_from(inventory: GpuInventory, stated_gpus: int | None) -> tuple[Device, ...]:
    """The devices to plan for: NVML's (MIG instances as devices), else ``stated_gpus``.

    Raises:
        ValueError: neither gives a device, or ``stated_gpus`` contradicts NVML.
    """
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
        return tuple(devices)
    if stated_gpus is None:
        raise ValueError(
            f"{inventory.describe()}: state the capacity with --gpus N (and --slots-per-gpu)"
        )
    if stated_gpus < 1:
        raise ValueError(f"--gpus must be at least 1, got {stated_gpus}")
    return tuple(
        Device(f"gpu{index}", str(index), f"GPU {index} (stated)", None)
        for index in range(stated_gpus)
    )


@dataclass(frozen=True)
class SlotsPerGpu:
    slots: int


@dataclass(frozen=True)
class MemoryPerSlot:
    bytes_per_slot: int


Sizing = SlotsPerGpu | MemoryPerSlot


@dataclass(frozen=True)
class ServiceWorker:
    """One Prefect worker the service runs, and its limit."""

    name: str  # the worker's WORKER_ID and Prefect worker name
    limit_prefix: str
    slots: int
    flow_runs: int
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES; None: inherit (all devices)
    devices: tuple[str, ...]  # descriptions, for output

    @property
    def limit_name(self) -> str:
        return limit_name(self.name, self.limit_prefix)

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
            f"which NVML gives; {device.description} has none. With stated --gpus, size with "
            "--slots-per-gpu"
        )
    sized = slots_for_memory(device.memory_mib, sizing.bytes_per_slot, device.description)
    return sized.slots, sized.message


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
                             tuple(device.description for device, _s, _m in group))  # fmt: skip

    if per_gpu:
        workers = tuple(worker(f"{worker_id}-{item[0].label}", [item], True) for item in sized)
    else:
        workers = (worker(worker_id, sized, False),)
    for planned in workers:
        pinned = planned.visible_devices
        pinned = f", {CUDA_VISIBLE_DEVICES}={pinned}" if pinned is not None else ""
        messages.append(
            f"worker {planned.name}: limit {planned.limit_name} = {planned.slots} slot(s), "
            f"{planned.flow_runs} flow run(s) at once{pinned}"
        )
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
