"""What each pipeline stage leaves behind: one JSON line per stage execution.

The flows write these records, the tests, the demo and the bench read them.
Timestamps are wall-clock (``time.time()``) because the writers are separate
processes; on one machine they share the clock, which is all the overlap
checks need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

# A flow parameter wins over this; either may be unset (then nothing is recorded).
RECORD_DIR_ENV = "PGW_RECORD_DIR"

Stage = Literal["download", "gpu", "save"]
STAGES: tuple[Stage, ...] = ("download", "gpu", "save")


@dataclass(frozen=True)
class StageRecord:
    """One execution of one stage of one flow run.

    ``requested`` is when the stage asked to begin; for the GPU stage that is
    before the slot was acquired, so ``start - requested`` is the wait for a
    slot. ``start``/``end`` bracket the stage's work (for the GPU stage: while
    the slot is held). GPU steps also record the allocator's peak memory
    (``peak_memory_mib``, CUDA only), the batches run, the CPU-side preparation
    before asking for the slot (``prepare_s``) and, when the step failed, the
    error; records written before these fields existed read them as None.
    """

    run_id: str
    worker_id: str
    stage: Stage
    requested: float
    start: float
    end: float
    occupy: int = 0
    limit: str | None = None
    device: str | None = None
    peak_memory_mib: float | None = None
    batches: int | None = None
    error: str | None = None
    # GPU step: seconds of CPU-side preparation (torch import, model) before ``requested``.
    prepare_s: float | None = None
    # First stage: when the worker began starting the run's process, and the
    # CPU-seconds that process had spent when the stage began (its start-up).
    launched: float | None = None
    start_cpu_s: float | None = None
    # GPU step placed by memory: the GiB it declared (held in the memory limit)
    # and the device the broker placed it on ("cuda:1").
    memory_gib: int | None = None
    placed_on: str | None = None

    @property
    def over_declared(self) -> bool:
        """A GPU step whose allocator peak (CUDA) passed the memory it declared."""
        return (
            self.memory_gib is not None
            and self.peak_memory_mib is not None
            and self.peak_memory_mib > self.memory_gib * 1024
        )

    @property
    def start_up_s(self) -> float | None:
        """Seconds from the worker starting the run's process to this (first) stage."""
        return None if self.launched is None else self.start - self.launched

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}")
        if not self.requested <= self.start <= self.end:
            raise ValueError(
                f"stage times out of order: requested {self.requested}, "
                f"start {self.start}, end {self.end}"
            )

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRecord:
        return cls(
            run_id=str(data["run_id"]),
            worker_id=str(data["worker_id"]),
            stage=data["stage"],
            requested=float(data["requested"]),
            start=float(data["start"]),
            end=float(data["end"]),
            occupy=int(data.get("occupy", 0)),
            limit=data.get("limit"),
            device=data.get("device"),
            peak_memory_mib=_optional_float(data.get("peak_memory_mib")),
            batches=_optional_int(data.get("batches")),
            error=data.get("error"),
            prepare_s=_optional_float(data.get("prepare_s")),
            launched=_optional_float(data.get("launched")),
            start_cpu_s=_optional_float(data.get("start_cpu_s")),
            memory_gib=_optional_int(data.get("memory_gib")),
            placed_on=data.get("placed_on"),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def record_dir_from(parameter: str | None) -> Path | None:
    """The directory to record into: the parameter, else ``PGW_RECORD_DIR``, else none."""
    value = parameter or os.environ.get(RECORD_DIR_ENV)
    return Path(value) if value else None


def append_record(directory: Path, record: StageRecord) -> None:
    """Append ``record`` to ``<directory>/<run_id>.jsonl``.

    One file per flow run: only that run's process writes it, so concurrent
    runs never interleave partial lines.
    """
    directory.mkdir(parents=True, exist_ok=True)
    line = json.dumps(asdict(record), sort_keys=True) + "\n"
    with (directory / f"{record.run_id}.jsonl").open("a", encoding="utf-8") as out:
        out.write(line)


def read_records(directory: Path) -> list[StageRecord]:
    """Every record under ``directory``, ordered by start time."""
    return sorted(_iter_records(directory.glob("*.jsonl")), key=lambda r: (r.start, r.end))


def _iter_records(paths: Iterable[Path]) -> Iterator[StageRecord]:
    for path in sorted(paths):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield StageRecord.from_json(json.loads(line))


# A cell of an artifact's table: Prefect stores the rows as JSON and shows them as they are.
Cell = str | int | float | None


def _seconds(value: float) -> float:
    # Milliseconds are what a person compares; more digits are noise in a table.
    return round(value, 3)


def gpu_step_row(record: StageRecord, gpu_uuid: str | None = None) -> dict[str, Cell]:
    """One GPU step as a row of its table artifact: where it ran, how long it waited and held.

    ``device`` is the CUDA device the step ran on ("cuda:1"), else "cpu" (the
    step ran on the CPU, or simulated its work); ``gpu`` is that device's
    position and ``gpu_uuid`` its UUID where the step could read it. Peak
    memory is the allocator's (torch) where the step ran on CUDA; elsewhere
    nothing was measured, and a step placed by memory names what it declared.

    Raises:
        ValueError: the record is not a GPU step's.

    Example:
        >>> step = StageRecord("r", "w-1", "gpu", 10.0, 12.5, 15.0, 1, "gpu:w-1", "simulated")
        >>> row = gpu_step_row(step)
        >>> row["device"], row["waited_s"], row["held_s"], row["limit"]
        ('cpu', 2.5, 2.5, 'gpu:w-1')
    """
    if record.stage != "gpu":
        raise ValueError(f"not a GPU step's record: stage {record.stage!r}")
    device = record.device or ""
    on_cuda = device.startswith("cuda")
    position = device.partition(":")[2] if on_cuda else ""
    if record.peak_memory_mib is not None:
        memory_from = "torch (allocator peak)"
    elif record.memory_gib is not None:
        memory_from = f"not measured; declared {record.memory_gib} GiB"
    else:
        memory_from = "not measured (no CUDA)"
    return {
        "device": device if on_cuda else "cpu",
        "gpu": int(position) if position.isdigit() else None,
        "gpu_uuid": gpu_uuid if on_cuda else None,
        "work": "simulated" if device == "simulated" else ("gpu" if on_cuda else "cpu"),
        "limit": record.limit,
        "slots": record.occupy,
        "waited_s": _seconds(record.start - record.requested),
        "held_s": _seconds(record.end - record.start),
        "peak_memory_mib": (
            None if record.peak_memory_mib is None else round(record.peak_memory_mib, 1)
        ),
        "peak_memory_from": memory_from,
        "declared_memory_gib": record.memory_gib,
        "worker": record.worker_id,
        "error": record.error,
    }
