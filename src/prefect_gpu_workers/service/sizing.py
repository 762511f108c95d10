"""GPU memory per slot: parse ``20GiB`` and size a GPU's slots from its memory (pure).

The reason to limit GPU steps is memory: a user knows a step needs about
20 GiB, not that 2 slots are safe on an 80 GiB card. So a GPU with ``M`` bytes
gets ``floor(M / memory per slot)`` slots, at least 1 (a zero-slot limit would
block every GPU step forever), and the arithmetic is said aloud.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

MIB = 1024 * 1024
# Binary units (Ki, Mi, GiB...) and decimal ones (k, M, GB...), as Kubernetes
# quantities and most tools write them; a bare number is bytes.
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "ki": 2**10, "kib": 2**10,
    "m": 10**6, "mb": 10**6, "mi": 2**20, "mib": 2**20,
    "g": 10**9, "gb": 10**9, "gi": 2**30, "gib": 2**30,
    "t": 10**12, "tb": 10**12, "ti": 2**40, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes in ``text``: ``20GiB``, ``20Gi``, ``20 GB``, ``512MiB``, ``1.5TiB``.

    Raises:
        ValueError: not a positive size with a known unit.

    Example:
        >>> parse_memory_size("20GiB")
        21474836480
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"not a memory size: {text!r} (examples: 20GiB, 20Gi, 24GB, 512MiB)")
    size = math.floor(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return size


def format_bytes(size: float) -> str:
    """A short binary size: ``20 GiB``, ``79.6 GiB``, ``512 MiB``."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor:
            value = size / factor
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{size:.0f} B"


@dataclass(frozen=True)
class MemorySlots:
    slots: int
    message: str


def slots_for_memory(memory_mib: int, memory_per_slot: int, device: str = "GPU") -> MemorySlots:
    """Slots of one GPU (or MIG instance) with ``memory_mib`` MiB: floor(memory / per slot), >= 1.

    Args:
        memory_mib: the device's total memory, as NVML reports it.
        memory_per_slot: bytes one GPU step needs.
        device: how to name the device in the message.

    Raises:
        ValueError: a non-positive ``memory_per_slot``.

    Example:
        >>> slots_for_memory(81920, 20 * 2**30, "GPU 0").slots
        4
    """
    if memory_per_slot <= 0:
        raise ValueError(f"memory per slot must be positive, got {memory_per_slot}")
    memory = memory_mib * MIB
    fits = memory // memory_per_slot
    arithmetic = f"{device}: {format_bytes(memory)} / {format_bytes(memory_per_slot)} per slot"
    if fits < 1:
        return MemorySlots(
            1,
            f"{arithmetic} is less than one slot; using 1 slot (a step may not fit this GPU)",
        )
    return MemorySlots(int(fits), f"{arithmetic} = {fits} slot(s)")
