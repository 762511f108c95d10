"""Pure measurements over recorded stage intervals (see :mod:`records`).

Nothing here talks to Prefect or reads files: the demo, the bench and the
tests feed these functions the records and the limits and get numbers back.

Definitions (all per worker, because each worker has its own limit):

- overlap: the largest total ``occupy`` of GPU steps whose ``[start, end)``
  intervals cover one instant;
- slot utilisation: slot-seconds held / (limit x window), the window running
  from the worker's first GPU acquire to its last one, i.e. while that worker
  still had a GPU step to start; the drain after the last acquire is left out;
- GCL handoff gap: from a slot's release to the next acquire on that worker,
  for releases at which a GPU step was already waiting for a slot (had asked,
  had not got one). This is the time a free slot sits idle while a waiter
  sleeps on Prefect's Retry-After;
- backlog handoff gap: from a slot's release to the worker's next acquire by
  any GPU step, counted while the pool still had runs whose GPU step had not
  started. Under flow-level limiting nobody waits on the GCL, and this gap is
  the worker's poll, the flow-run start and the download of the next run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from prefect_gpu_workers.records import Stage, StageRecord


def peak_overlap(intervals: Iterable[tuple[float, float, int]]) -> int:
    """The largest total weight of ``(start, end, weight)`` intervals covering one instant.

    Intervals are half-open: one that ends exactly when another starts does not
    overlap it (a slot handed over at one instant is not held twice).
    """
    events: list[tuple[float, int]] = []
    for start, end, weight in intervals:
        if end > start:
            events.append((start, weight))
            events.append((end, -weight))
    # At equal times the negative (release) sorts first.
    events.sort()
    peak = current = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def by_worker(records: Iterable[StageRecord], stage: Stage) -> dict[str, list[StageRecord]]:
    grouped: dict[str, list[StageRecord]] = defaultdict(list)
    for record in records:
        if record.stage == stage:
            grouped[record.worker_id].append(record)
    return dict(grouped)


def gpu_overlap_per_worker(records: Iterable[StageRecord]) -> dict[str, int]:
    """Peak slots held at once by GPU steps, per worker (weighted by ``occupy``)."""
    return {
        worker: peak_overlap((r.start, r.end, r.occupy) for r in steps)
        for worker, steps in by_worker(records, "gpu").items()
    }


def stage_overlap_per_worker(
    records: Iterable[StageRecord], stages: Sequence[Stage]
) -> dict[str, int]:
    """Peak number of steps of ``stages`` running at once, per worker (unweighted)."""
    grouped: dict[str, list[StageRecord]] = defaultdict(list)
    for record in records:
        if record.stage in stages:
            grouped[record.worker_id].append(record)
    return {
        worker: peak_overlap((r.start, r.end, 1) for r in steps)
        for worker, steps in grouped.items()
    }


@dataclass(frozen=True)
class Utilization:
    held_slot_s: float
    capacity_slot_s: float

    @property
    def fraction(self) -> float | None:
        return self.held_slot_s / self.capacity_slot_s if self.capacity_slot_s > 0 else None


def slot_utilization(steps: Sequence[StageRecord], limit: int) -> Utilization:
    """Held slot-seconds over ``limit`` x [first acquire, last acquire], for one worker."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if not steps:
        return Utilization(0.0, 0.0)
    window_start = min(s.start for s in steps)
    window_end = max(s.start for s in steps)
    held = sum(
        max(0.0, min(s.end, window_end) - max(s.start, window_start)) * s.occupy for s in steps
    )
    return Utilization(held, limit * (window_end - window_start))


def overall_utilization(records: Iterable[StageRecord], limits: Mapping[str, int]) -> float | None:
    """Slot utilisation over all workers, each weighted by its window and limit."""
    parts = [
        slot_utilization(steps, limits[worker])
        for worker, steps in by_worker(records, "gpu").items()
        if worker in limits
    ]
    held = sum(p.held_slot_s for p in parts)
    capacity = sum(p.capacity_slot_s for p in parts)
    return held / capacity if capacity > 0 else None


def utilization_per_worker(
    records: Iterable[StageRecord], limits: Mapping[str, int]
) -> dict[str, float | None]:
    """Slot utilisation of each worker of ``limits`` (``None``: it ran no GPU step)."""
    steps = by_worker(records, "gpu")
    return {
        worker: slot_utilization(steps.get(worker, []), limit).fraction
        for worker, limit in sorted(limits.items())
    }


def over_admissions(records: Iterable[StageRecord], limits: Mapping[str, int]) -> int:
    """GPU-step starts at which the worker's steps held more slots than its limit."""
    count = 0
    for worker, steps in by_worker(records, "gpu").items():
        limit = limits.get(worker)
        if limit is not None:
            count += starts_over(steps, lambda step: step.occupy, limit)
    return count


def starts_over(
    steps: Sequence[StageRecord], weight: Callable[[StageRecord], float], limit: float
) -> int:
    """Starts among ``steps`` at which their ``weight`` held at once passed ``limit``."""
    return sum(
        sum(weight(s) for s in steps if s.start <= step.start < s.end) > limit for step in steps
    )


@dataclass(frozen=True)
class MemoryUse:
    """Declared GPU memory held over a batch, and whether any GPU or limit was passed.

    ``utilisation`` is GiB-seconds held over capacity x span, the span running
    from the first GPU step's start to the last one's end.
    """

    declared_gib_s: float
    capacity_gib: int
    span_s: float
    over_gpu: int  # step starts at which a GPU held more GiB than it has
    over_memory_limit: int  # step starts at which a worker held more GiB than its limit
    over_declared: int  # steps whose CUDA peak passed the memory they declared

    @property
    def utilisation(self) -> float | None:
        capacity = self.capacity_gib * self.span_s
        return self.declared_gib_s / capacity if capacity > 0 else None


def memory_use(
    records: Iterable[StageRecord],
    gpu_gib: int,
    worker_gib: Mapping[str, int],
    declared: Mapping[str, int] | None = None,
) -> MemoryUse:
    """:class:`MemoryUse` of a batch's GPU steps.

    Args:
        records: the batch's records.
        gpu_gib: each GPU's memory (GiB).
        worker_gib: each worker's memory (its memory limit), whose sum is the capacity.
        declared: GiB per run for steps that did not record their own (a
            fixed-slot phase whose steps were not placed by memory).
    """
    steps = [r for r in records if r.stage == "gpu"]

    def gib(step: StageRecord) -> int:
        if step.memory_gib is not None:
            return step.memory_gib
        return (declared or {}).get(step.run_id, 0)

    span = max((s.end for s in steps), default=0.0) - min((s.start for s in steps), default=0.0)
    per_gpu: dict[tuple[str, str], list[StageRecord]] = defaultdict(list)
    for step in steps:
        if step.placed_on is not None:
            per_gpu[(step.worker_id, step.placed_on)].append(step)
    return MemoryUse(
        declared_gib_s=sum(gib(s) * (s.end - s.start) for s in steps),
        capacity_gib=sum(worker_gib.values()),
        span_s=span,
        over_gpu=sum(starts_over(group, gib, gpu_gib) for group in per_gpu.values()),
        over_memory_limit=sum(
            starts_over(group, gib, worker_gib.get(worker, 0))
            for worker, group in by_worker(steps, "gpu").items()
            if worker in worker_gib
        ),
        over_declared=sum(s.over_declared for s in steps),
    )


def _slot_units(steps: Sequence[StageRecord]) -> tuple[list[float], list[float]]:
    """Releases and acquires, one per slot (an ``occupy=N`` step counts N times)."""
    releases = sorted(s.end for s in steps for _ in range(s.occupy))
    acquires = sorted(s.start for s in steps for _ in range(s.occupy))
    return releases, acquires


def _release_gaps(steps: Sequence[StageRecord], counts: Callable[[float], bool]) -> list[float]:
    """Release -> the next acquire on the same worker, for releases where ``counts(release)``.

    Releases and acquires are paired in time order, each acquire once: the
    acquire that follows a release is the one that took that slot again.
    """
    releases, acquires = _slot_units(steps)
    gaps: list[float] = []
    next_index = 0
    for release in releases:
        while next_index < len(acquires) and acquires[next_index] < release:
            next_index += 1
        if next_index == len(acquires):
            break
        if counts(release):
            gaps.append(acquires[next_index] - release)
        next_index += 1
    return gaps


def gcl_handoff_gaps(records: Iterable[StageRecord]) -> list[float]:
    """Release -> next acquire, for releases while a GPU step was waiting for a slot.

    "Waiting" means it had asked (``requested``) and not yet got a slot
    (``start``) at the moment of the release: the gap is the time a free slot
    sat idle while a waiter slept on Prefect's Retry-After.
    """
    gaps: list[float] = []
    for steps in by_worker(records, "gpu").values():

        def someone_waiting(release: float, steps: Sequence[StageRecord] = steps) -> bool:
            return any(s.requested <= release < s.start for s in steps)

        gaps.extend(_release_gaps(steps, someone_waiting))
    return sorted(gaps)


def backlog_handoff_gaps(records: Iterable[StageRecord]) -> list[float]:
    """Release -> next acquire, for releases while some GPU step of the pool was still to start.

    "Still to start" is pool-wide: before the last GPU acquire of all the
    records, a submitted run was waiting for a worker, for its process, or for
    a slot.
    """
    gpu = [r for r in records if r.stage == "gpu"]
    if not gpu:
        return []
    backlog_until = max(r.start for r in gpu)
    gaps: list[float] = []
    for steps in by_worker(gpu, "gpu").values():
        gaps.extend(_release_gaps(steps, lambda release: release < backlog_until))
    return sorted(gaps)


def start_up_figures(records: Iterable[StageRecord]) -> tuple[list[float], list[float]]:
    """Each run's start-up seconds and start-up CPU-seconds (from its first stage's record)."""
    firsts = [r for r in records if r.stage == "download" and r.launched is not None]
    seconds = [r.start_up_s for r in firsts if r.start_up_s is not None]
    cpus = [r.start_cpu_s for r in firsts if r.start_cpu_s is not None]
    return seconds, cpus


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation; ``None`` for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class PhaseMetrics:
    """What one batch of runs achieved; times in seconds."""

    runs_submitted: int
    runs_finished: int
    runs_failed: int
    makespan_s: float
    runs_per_s: float
    slot_utilization: float | None
    gcl_handoff_gap_p50_s: float | None
    gcl_handoff_gap_p95_s: float | None
    backlog_handoff_gap_p50_s: float | None
    backlog_handoff_gap_p95_s: float | None
    gpu_wait_p50_s: float | None
    gpu_steps: int
    # Flow-run start-up: the worker starting the process -> the first task began.
    start_up_p50_s: float | None = None
    start_up_p95_s: float | None = None
    start_cpu_mean_s: float | None = None
    max_gpu_overlap_per_worker: dict[str, int] = field(default_factory=dict)
    max_other_overlap_per_worker: dict[str, int] = field(default_factory=dict)
    limit_per_worker: dict[str, int] = field(default_factory=dict)
    slot_utilization_per_worker: dict[str, float | None] = field(default_factory=dict)

    @property
    def within_limits(self) -> bool:
        return all(
            peak <= self.limit_per_worker.get(worker, 0)
            for worker, peak in self.max_gpu_overlap_per_worker.items()
        )


def summarize(
    records: Sequence[StageRecord],
    limits: Mapping[str, int],
    *,
    submitted: int,
    finished: int,
    failed: int,
    submitted_at: float,
    ended_at: float,
) -> PhaseMetrics:
    """Metrics of one batch: ``finished`` runs between ``submitted_at`` and ``ended_at``."""
    makespan = max(0.0, ended_at - submitted_at)
    gcl_gaps = gcl_handoff_gaps(records)
    backlog_gaps = backlog_handoff_gaps(records)
    waits = [r.start - r.requested for r in records if r.stage == "gpu"]
    start_ups, start_cpus = start_up_figures(records)
    return PhaseMetrics(
        runs_submitted=submitted,
        runs_finished=finished,
        runs_failed=failed,
        makespan_s=makespan,
        runs_per_s=finished / makespan if makespan > 0 else 0.0,
        slot_utilization=overall_utilization(records, limits),
        gcl_handoff_gap_p50_s=percentile(gcl_gaps, 50),
        gcl_handoff_gap_p95_s=percentile(gcl_gaps, 95),
        backlog_handoff_gap_p50_s=percentile(backlog_gaps, 50),
        backlog_handoff_gap_p95_s=percentile(backlog_gaps, 95),
        gpu_wait_p50_s=percentile(waits, 50),
        gpu_steps=len(waits),
        start_up_p50_s=percentile(start_ups, 50),
        start_up_p95_s=percentile(start_ups, 95),
        start_cpu_mean_s=sum(start_cpus) / len(start_cpus) if start_cpus else None,
        max_gpu_overlap_per_worker=gpu_overlap_per_worker(records),
        max_other_overlap_per_worker=stage_overlap_per_worker(records, ("download", "save")),
        limit_per_worker=dict(limits),
        slot_utilization_per_worker=utilization_per_worker(records, limits),
    )


def speedup(task_level: PhaseMetrics, flow_level: PhaseMetrics) -> float | None:
    """Task-level throughput over flow-level throughput."""
    if flow_level.runs_per_s <= 0:
        return None
    return task_level.runs_per_s / flow_level.runs_per_s


# A cell of a report's table artifact (stored as JSON).
Cell = str | int | float | None


def _rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def _percent_of(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 1)


def _peaks_text(metrics: PhaseMetrics) -> str:
    return ", ".join(
        f"{worker} {metrics.max_gpu_overlap_per_worker.get(worker, 0)}/{limit}"
        for worker, limit in sorted(metrics.limit_per_worker.items())
    )


# (measure, how to read it off a phase): the report's figures, in the order a
# person reads them; the units are in the names because the cells are bare numbers.
_FIGURES: tuple[tuple[str, Callable[[PhaseMetrics], Cell]], ...] = (
    ("runs submitted", lambda m: m.runs_submitted),
    ("runs finished", lambda m: m.runs_finished),
    ("runs failed", lambda m: m.runs_failed),
    ("time to finish (submit -> last run end), s", lambda m: _rounded(m.makespan_s)),
    ("throughput, runs/s", lambda m: _rounded(m.runs_per_s, 4)),
    ("GPU steps recorded", lambda m: m.gpu_steps),
    ("GPU-slot utilisation, %", lambda m: _percent_of(m.slot_utilization)),
    ("wait for a GPU slot p50, s", lambda m: _rounded(m.gpu_wait_p50_s)),
    ("slot idle after a release while a step waited p50, s",
     lambda m: _rounded(m.gcl_handoff_gap_p50_s)),
    ("slot idle after a release while a step waited p95, s",
     lambda m: _rounded(m.gcl_handoff_gap_p95_s)),
    ("release -> next GPU step while runs were queued p50, s",
     lambda m: _rounded(m.backlog_handoff_gap_p50_s)),
    ("release -> next GPU step while runs were queued p95, s",
     lambda m: _rounded(m.backlog_handoff_gap_p95_s)),
    ("flow-run start (worker starts it -> first task) p50, s",
     lambda m: _rounded(m.start_up_p50_s)),
    ("flow-run start (worker starts it -> first task) p95, s",
     lambda m: _rounded(m.start_up_p95_s)),
    ("CPU-seconds per flow-run start (mean)", lambda m: _rounded(m.start_cpu_mean_s)),
    ("peak GPU steps at once / limit, per worker", _peaks_text),
    ("within every worker's limit", lambda m: "yes" if m.within_limits else "NO"),
)  # fmt: skip


def figure_rows(phases: Sequence[tuple[str, PhaseMetrics]]) -> list[dict[str, Cell]]:
    """A report's figures as table rows: one row per measure, one column per phase.

    The demo has one phase, the bench several; the same measure reads across.
    Figures that were not measured (no GPU step waited, say) are ``None``.

    Raises:
        ValueError: no phase, or two phases of one label (a column each).

    Example:
        >>> m = summarize([], {"w-1": 2}, submitted=1, finished=1, failed=0,
        ...               submitted_at=0.0, ended_at=4.0)
        >>> figure_rows([("demo", m)])[4]
        {'measure': 'throughput, runs/s', 'demo': 0.25}
    """
    labels = [label for label, _ in phases]
    if not labels:
        raise ValueError("a report needs at least one phase")
    if len(set(labels)) != len(labels) or "measure" in labels:
        raise ValueError(f"phase labels must be distinct and not 'measure': {labels}")
    return [
        {"measure": measure, **{label: read(metrics) for label, metrics in phases}}
        for measure, read in _FIGURES
    ]
