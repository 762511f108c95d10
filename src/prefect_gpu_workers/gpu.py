"""GPU capacity of this machine, found with NVML, and how it becomes limit slots.

With no NVIDIA driver (or no NVML library) detection reports zero GPUs and the
reason, never an exception: the caller decides whether stated capacity applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MigDevice:
    """A MIG instance of a GPU: CUDA sees it as a device of its own (by UUID)."""

    index: int  # the instance's index on its GPU
    uuid: str  # ``MIG-...``, what CUDA_VISIBLE_DEVICES takes
    memory_mib: int


@dataclass(frozen=True)
class GpuDevice:
    index: int
    name: str
    memory_mib: int
    # ``GPU-...``; empty when unknown (stated capacity, old drivers).
    uuid: str = ""
    # MIG instances when MIG mode is on; each is a device of its own.
    mig_devices: tuple[MigDevice, ...] = ()


@dataclass(frozen=True)
class GpuInventory:
    devices: tuple[GpuDevice, ...] = ()
    # Why no GPU was found (driver missing, NVML error); None when detection worked.
    unavailable_reason: str | None = None
    driver_version: str | None = None

    @property
    def count(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        if not self.devices:
            return f"no NVIDIA GPU found ({self.unavailable_reason or 'NVML reports 0 devices'})"
        names = ", ".join(f"{d.index}: {d.name} {d.memory_mib} MiB" for d in self.devices)
        return f"{self.count} NVIDIA GPU(s) [{names}] driver {self.driver_version}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _mig_devices(pynvml: Any, handle: Any) -> tuple[MigDevice, ...]:
    """The MIG instances of one GPU; none when MIG is off or not supported."""
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # not a MIG-capable GPU
        return ()
    if current != pynvml.NVML_DEVICE_MIG_ENABLE:
        return ()
    found: list[MigDevice] = []
    for slot in range(pynvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
        try:
            mig = pynvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, slot)
        except pynvml.NVMLError:  # an empty slot
            continue
        memory = pynvml.nvmlDeviceGetMemoryInfo(mig)
        found.append(
            MigDevice(
                index=len(found),
                uuid=_text(pynvml.nvmlDeviceGetUUID(mig)),
                memory_mib=int(memory.total) // (1024 * 1024),
            )
        )
    return tuple(found)


def detect_gpus() -> GpuInventory:
    """Ask NVML for the devices this process can see."""
    try:
        import pynvml
    except ImportError as exc:  # nvidia-ml-py is a dependency; guard anyway
        return GpuInventory(unavailable_reason=f"pynvml not importable: {exc}")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return GpuInventory(unavailable_reason=f"NVML could not start: {exc}")
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            devices.append(
                GpuDevice(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_mib=int(memory.total) // (1024 * 1024),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    mig_devices=_mig_devices(pynvml, handle),
                )
            )
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        return GpuInventory(devices=tuple(devices), driver_version=driver)
    except pynvml.NVMLError as exc:
        return GpuInventory(unavailable_reason=f"NVML query failed: {exc}")
    finally:
        pynvml.nvmlShutdown()


@dataclass(frozen=True)
class CudaDevice:
    """A device as a CUDA process sees it: ``cuda:<its position>``."""

    uuid: str  # ``GPU-...``/``MIG-...``; the CUDA_VISIBLE_DEVICES entry when NVML has none
    memory_mib: int | None  # None: NVML does not know it


def cuda_devices(inventory: GpuInventory, cuda_visible: str | None) -> tuple[CudaDevice, ...]:
    """The devices a process with ``CUDA_VISIBLE_DEVICES=cuda_visible`` sees, in its order.

    NVML ignores ``CUDA_VISIBLE_DEVICES`` (it lists the machine's GPUs); CUDA
    numbers only the visible ones, in the order given. A GPU in MIG mode counts
    as its MIG instances. An entry NVML does not know is kept, memory unknown.

    Example:
        >>> a, b = GpuDevice(0, "A", 81920, "GPU-a"), GpuDevice(1, "B", 40960, "GPU-b")
        >>> [d.uuid for d in cuda_devices(GpuInventory((a, b)), "1,GPU-a")]
        ['GPU-b', 'GPU-a']
    """
    flat: list[tuple[str, str, int]] = []  # (index entry, uuid, MiB)
    for gpu in inventory.devices:
        if gpu.mig_devices:
            flat.extend((mig.uuid, mig.uuid, mig.memory_mib) for mig in gpu.mig_devices)
        else:
            flat.append((str(gpu.index), gpu.uuid, gpu.memory_mib))
    if cuda_visible is None:
        return tuple(CudaDevice(uuid, mib) for _, uuid, mib in flat)
    found: list[CudaDevice] = []
    for entry in (part.strip() for part in cuda_visible.split(",")):
        if not entry:
            continue
        match = next(
            (CudaDevice(uuid, mib) for index, uuid, mib in flat if entry in (index, uuid)), None
        )
        found.append(match or CudaDevice(entry, None))
    return tuple(found)


@dataclass(frozen=True)
class Capacity:
    """How many limit slots a worker gets, and where that number came from."""

    gpus: int
    slots_per_gpu: int
    source: str
    notes: tuple[str, ...] = field(default=())

    @property
    def slots(self) -> int:
        return self.gpus * self.slots_per_gpu


def resolve_capacity(
    inventory: GpuInventory,
    *,
    stated_gpus: int | None = None,
    slots_per_gpu: int = 1,
) -> Capacity:
    """Slots for one worker: stated GPUs win, else detected GPUs.

    Raises ``ValueError`` when neither gives at least one GPU, so a caller
    never creates a zero-slot limit that would block every GPU step forever.
    """
    if slots_per_gpu < 1:
        raise ValueError(f"slots per GPU must be at least 1, got {slots_per_gpu}")
    if stated_gpus is not None:
        if stated_gpus < 1:
            raise ValueError(f"stated GPU count must be at least 1, got {stated_gpus}")
        notes: tuple[str, ...] = ()
        if inventory.count and inventory.count != stated_gpus:
            notes = (f"stated {stated_gpus} GPU(s) overrides {inventory.describe()}",)
        elif not inventory.count:
            notes = (f"{inventory.describe()}; using the stated {stated_gpus} GPU(s)",)
        return Capacity(stated_gpus, slots_per_gpu, "stated", notes)
    if inventory.count:
        return Capacity(inventory.count, slots_per_gpu, "detected", (inventory.describe(),))
    raise ValueError(
        f"{inventory.describe()}: state the capacity explicitly (for example --gpus 1)"
    )
