"""Where a worker's GPU time goes: per (limit, deployment, flow, task) accounting; pure.

Standard library only, no clock and no I/O of its own: the broker tells
:class:`GpuAccounting` when a step was granted its slots and when it let go,
and the worker's NVML sampler feeds it readings (:meth:`GpuAccounting.sample`);
tests feed both by hand.

What it counts, per limit and label set (:class:`StepLabels`):

- ``steps``: steps granted their slots;
- ``waited_s``: seconds those steps waited for them (asked -> lease taken);
- ``held_slot_s``: seconds held x slots held. A step still holding counts up to
  the moment asked (:meth:`GpuAccounting.usage`), so the counter grows smoothly
  instead of jumping when a long step ends;
- ``busy_slot_s``: the same, weighted by the NVML utilisation of the step's GPU
  (the GPU its grant placed it on; the mean over the worker's GPUs when it was
  not placed by memory). Held minus busy is "held but idle";
- ``memory_byte_s``: GPU memory used on the step's GPU(s) x seconds held
  (divided by the held seconds of a one-slot step: its mean memory while held).

Between two readings a GPU is taken to stay as last read (a step that holds
its slot across readings gets each reading for the time until the next one).
Without readings (no NVML) the busy and memory sums stay at zero and
:attr:`GpuAccounting.measured` is False, so nobody reads them as "idle".

Cardinality is bounded: at most :data:`MAX_LABEL_SETS` label sets per limit;
the steps of any further set are counted under :data:`OVERFLOW` (so at most
``MAX_LABEL_SETS + 1`` series per limit and family)
(``other``/``other``/``other``). A label set once seen is kept (a counter that
vanished would read as a reset).

Example:
    >>> accounting = GpuAccounting()
    >>> labels = StepLabels.of("train", "pipeline", "fit")
    >>> accounting.granted(1, "gpu:w", labels, slots=2, waited_s=0.5, now=10.0)
    >>> accounting.released(1, now=13.0)
    >>> usage = accounting.usage(now=20.0)[("gpu:w", labels)]
    >>> usage.steps, usage.waited_s, usage.held_slot_s
    (1, 0.5, 6.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

# The longest label value: wire.py refuses longer ones from the socket; a
# resolved deployment name may still be longer, and is cut.
from prefect_gpu_workers.slots.wire import MAX_LABEL_CHARS

NONE = "none"  # a step outside a deployment or a task
OTHER = "other"  # the label of every set past MAX_LABEL_SETS
MAX_LABEL_SETS = 64


@dataclass(frozen=True, order=True)
class StepLabels:
    """Who holds the slots: the deployment's name, the flow's, the task's."""

    deployment: str = NONE
    flow: str = NONE
    task: str = NONE

    @classmethod
    def of(cls, deployment: str | None, flow: str | None, task: str | None) -> StepLabels:
        """Labels with empty or missing values as ``none``, long ones cut.

        Example:
            >>> StepLabels.of("", None, "fit")
            StepLabels(deployment='none', flow='none', task='fit')
        """
        return cls(*(_value(part) for part in (deployment, flow, task)))


OVERFLOW = StepLabels(OTHER, OTHER, OTHER)


def _value(text: str | None) -> str:
    return text[:MAX_LABEL_CHARS] if text else NONE


@dataclass(frozen=True)
class GpuReading:
    """One GPU as NVML read it: utilisation 0..1, memory in bytes."""

    utilization: float
    memory_used_bytes: int
    memory_total_bytes: int


@dataclass
class Usage:
    """The sums of one (limit, labels) since the worker started."""

    steps: int = 0
    waited_s: float = 0.0
    held_slot_s: float = 0.0
    busy_slot_s: float = 0.0
    memory_byte_s: float = 0.0


@dataclass
class _Live:
    """A step holding its slots: what it adds to, and up to when it has added."""

    usage: Usage
    slots: int
    gpu: int | None  # its grant's GPU position; None: not placed (any of the worker's)
    since: float


Key = tuple[str, StepLabels]


class GpuAccounting:
    """Per (limit, labels) usage of one worker's GPU slots; see the module docstring.

    Args:
        max_label_sets: label sets kept per limit before the rest count as
            :data:`OVERFLOW`.
    """

    def __init__(self, max_label_sets: int = MAX_LABEL_SETS) -> None:
        if max_label_sets < 1:
            raise ValueError(f"max_label_sets must be at least 1, got {max_label_sets}")
        self.max_label_sets = max_label_sets
        self._usage: dict[str, dict[StepLabels, Usage]] = {}
        self._live: dict[int, _Live] = {}
        self.readings: dict[int, GpuReading] = {}  # by CUDA position, as last read
        self.measured = False  # any reading ever fed in

    def _usage_of(self, limit: str, labels: StepLabels) -> Usage:
        sets = self._usage.setdefault(limit, {})
        usage = sets.get(labels)
        if usage is not None:
            return usage
        if len(sets) - (OVERFLOW in sets) >= self.max_label_sets:
            labels = OVERFLOW  # series per limit: the bound, plus this one
        return sets.setdefault(labels, Usage())

    def granted(
        self,
        ticket: int,
        limit: str,
        labels: StepLabels,
        slots: int,
        waited_s: float,
        now: float,
        gpu: int | None = None,
    ) -> None:
        """A step (``ticket``) was granted ``slots`` of ``limit`` at ``now``.

        Args:
            gpu: the GPU position its grant placed it on; None when not placed.
        """
        usage = self._usage_of(limit, labels)
        usage.steps += 1
        usage.waited_s += max(waited_s, 0.0)
        self._live[ticket] = _Live(usage, slots, gpu, now)

    def released(self, ticket: int, now: float) -> None:
        """The step let go (or died) at ``now``; a ticket never granted is ignored."""
        live = self._live.pop(ticket, None)
        if live is not None:
            self._accrue(live, now)

    def sample(self, readings: Mapping[int, GpuReading], now: float) -> None:
        """New NVML readings (by CUDA position) as of ``now``.

        The steps holding are first counted up to ``now`` with the readings
        before these.
        """
        self._accrue_all(now)
        self.readings = dict(readings)
        self.measured = self.measured or bool(readings)

    def usage(self, now: float) -> dict[Key, Usage]:
        """Every (limit, labels) and its sums, the steps still holding counted up to ``now``."""
        self._accrue_all(now)
        return {
            (limit, labels): replace(usage)
            for limit, sets in self._usage.items()
            for labels, usage in sets.items()
        }

    @property
    def holding(self) -> int:
        """Steps holding slots now."""
        return len(self._live)

    def _accrue_all(self, now: float) -> None:
        for live in self._live.values():
            self._accrue(live, now)

    def _accrue(self, live: _Live, now: float) -> None:
        seconds = now - live.since
        if seconds <= 0:
            return  # a clock read out of order adds nothing rather than subtracting
        live.since = now
        live.usage.held_slot_s += seconds * live.slots
        readings = self._readings_of(live.gpu)
        if not readings:
            return
        utilization = sum(r.utilization for r in readings) / len(readings)
        live.usage.busy_slot_s += seconds * live.slots * min(max(utilization, 0.0), 1.0)
        live.usage.memory_byte_s += seconds * sum(r.memory_used_bytes for r in readings)

    def _readings_of(self, gpu: int | None) -> Sequence[GpuReading]:
        if gpu is None:
            return [self.readings[position] for position in sorted(self.readings)]
        reading = self.readings.get(gpu)
        return [] if reading is None else [reading]
