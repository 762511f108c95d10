"""``prefect-gpu-workers bench --memory-mix``: GPU steps placed by memory against fixed slots.

The same runs, with the same declared memory mix (``8GiB:3,40GiB:1``), on the
same local workers, in two phases:

- placement: each GPU step declares its memory; the worker's broker places it
  on one of the worker's GPUs with room and holds its GiB in the worker's
  memory limit ``<prefix>-memory:<worker>``;
- fixed slots: the usual way without placement, slots sized for the largest
  step (``floor(GPU memory / largest)`` per GPU), each step one slot.

Both report declared GPU memory in use over time: GiB-seconds held over
capacity x span (first GPU step's start to the last one's end). With
``--licence-runs N`` a third phase runs N short steps on four workers that all
hold one seat of each of two licence limits (``also``): every run must
complete (a deadlock would stall the batch until it timed out) and no licence
may be held beyond its seats.

Stage work is simulated (sleeps), so the figures measure placement and
Prefect's coordination, not a model: no GPU is needed.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.local.batch import BatchResult, prepare_pool
from prefect_gpu_workers.local.bench import run_phase
from prefect_gpu_workers.local.demo import make_workdir
from prefect_gpu_workers.local.plan import (
    DEFAULT_POOL,
    LocalOptions,
    MemoryMix,
    WorkerPlan,
    flow_runs_to_fill,
    placing_plans,
    plan_workers,
    worker_ids,
)
from prefect_gpu_workers.local.prefect_ops import active_slots, ensure_gpu_limit
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.local.timeline import TimelinePhase, write_timeline
from prefect_gpu_workers.local.views import plain_printer
from prefect_gpu_workers.naming import gib_capacity, parse_memory_mib
from prefect_gpu_workers.report import (
    MemoryUse,
    PhaseMetrics,
    memory_use,
    over_admissions,
    peak_overlap,
)

MEMORY_BENCH_DEPLOYMENT = "gpu-pipeline-memory-bench"
SIMULATION_NOTE = (
    "stage work is simulated: each GPU step sleeps; the figures measure placement and "
    "Prefect's coordination, not a model"
)
DEFAULT_MIX = MemoryMix.parse("8GiB:3,40GiB:1")
LICENCE_WORKERS = 4
LICENCE_SEATS = 2
LICENCE_GPU_S = 0.5


@dataclass(frozen=True)
class MemoryBenchOptions(LocalOptions):
    mix: MemoryMix = DEFAULT_MIX
    pool: str = f"{DEFAULT_POOL}-memory-bench"
    gpus: int = 2
    gpu_memory: str = "80GiB"
    runs: int | None = None  # per phase; None: 8 rounds of the mix per GPU
    gpu_seconds: float = 8.0
    licence_runs: int = 0  # 0: no licence phase

    @property
    def gpu_gib(self) -> int:
        return gib_capacity(parse_memory_mib(self.gpu_memory))


@dataclass(frozen=True)
class MemoryPhase:
    """One phase's figures."""

    label: str
    slots_per_worker: int
    flow_runs_per_worker: int
    completed: int
    submitted: int
    use: MemoryUse
    metrics: PhaseMetrics
    slots_held_after: dict[str, int]
    slot_over_admissions: int  # GPU-step starts past a worker's slot limit (records)

    @property
    def utilisation(self) -> float | None:
        return self.use.utilisation


@dataclass(frozen=True)
class LicencePhase:
    """The ``also`` phase: every run completed, licences never held past their seats."""

    runs: int
    completed: int
    seats: int
    peak_seats_held: int  # most GPU steps holding the licences at one instant (records)
    held_after: dict[str, int]
    span_s: float

    @property
    def stalled(self) -> int:
        """Runs that never completed: what a deadlock would leave."""
        return self.runs - self.completed


@dataclass(frozen=True)
class MemoryBenchResult:
    options: MemoryBenchOptions
    placement: MemoryPhase
    fixed: MemoryPhase
    licences: LicencePhase | None = None
    load_average: dict[str, float | None] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """Placement's memory utilisation over fixed slots', measured in this run."""
        a, b = self.placement.utilisation, self.fixed.utilisation
        return a / b if a is not None and b else None

    def as_json(self) -> dict[str, Any]:
        def phase(p: MemoryPhase) -> dict[str, Any]:
            return {
                "utilisation": p.utilisation,
                **asdict(p.use),
                "slots_per_worker": p.slots_per_worker,
                "flow_runs_per_worker": p.flow_runs_per_worker,
                "completed": p.completed,
                "submitted": p.submitted,
                "runs_per_s": p.metrics.runs_per_s,
                "slot_over_admissions": p.slot_over_admissions,
                "slots_held_after": p.slots_held_after,
            }

        return {
            "simulated": True,
            "note": SIMULATION_NOTE,
            "mix": [list(entry) for entry in self.options.mix.sizes],
            "gpus_per_worker": self.options.gpus,
            "gpu_memory_gib": self.options.gpu_gib,
            "workers": self.options.workers,
            "gpu_s": self.options.gpu_seconds,
            "placement": phase(self.placement),
            "fixed_slots": phase(self.fixed),
            "utilisation_ratio": self.ratio,
            "licences": (
                {**asdict(self.licences), "stalled": self.licences.stalled}
                if self.licences
                else None
            ),
            "load_average_1m": self.load_average,
            "cpu_count": os.cpu_count(),
        }


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def placement_plans(options: MemoryBenchOptions, ids: list[str]) -> tuple[WorkerPlan, ...]:
    """Workers that place by memory (:func:`plan.placing_plans`: memory, not slots,
    is the bound), and flow runs for three times the steps the memory holds on
    average: the others start, download, save, or wait where a freed hole can
    take them."""
    mix, gib = options.mix, options.gpu_gib
    flow_runs = math.ceil(3 * options.gpus * gib / mix.mean_gib)
    plans = tuple(
        replace(plan, launcher=options.launcher)
        for plan in plan_workers(ids, 1, max(flow_runs, 1), options.limit_prefix)
    )
    return placing_plans(plans, mix, options.gpus, gib)


def fixed_plans(options: MemoryBenchOptions, ids: list[str]) -> tuple[WorkerPlan, ...]:
    """Workers with slots sized for the largest step, as without placement."""
    slots = options.gpus * max(1, options.gpu_gib // options.mix.largest_gib)
    g = options.gpu_seconds
    flow_runs = flow_runs_to_fill(slots, g / 8, g, g / 8)
    return tuple(
        replace(plan, launcher=options.launcher)
        for plan in plan_workers(ids, slots, flow_runs, options.limit_prefix)
    )


def run_memory_bench(options: MemoryBenchOptions, console: Console) -> MemoryBenchResult:
    """Run the placement and fixed-slot phases (and the licence phase); progress to ``console``."""
    g = options.gpu_seconds
    params = PipelineParams(
        items=1, download_s=g / 8, gpu_s=g, save_s=g / 8, simulate=True,
        artifacts=options.step_artifacts,
    )  # fmt: skip
    mix = options.mix
    runs = options.runs or 8 * len(mix.pattern) * options.gpus * options.workers
    ids = worker_ids(options.workers, options.worker_prefix)
    workdir, made_workdir = make_workdir(options.workdir, "pgw-memory-bench-")
    console.print(f"work directory (logs, records): {workdir}")
    console.print(SIMULATION_NOTE)
    console.print(
        f"{options.workers} worker(s) x {options.gpus} GPU(s) of {options.gpu_gib} GiB; "
        f"declared memory mix {', '.join(f'{s} x{n}' for s, n in mix.sizes)}; {runs} runs a phase"
    )
    placing, fixed = placement_plans(options, ids), fixed_plans(options, ids)
    with LocalSession(
        workdir,
        api_url=os.environ.get("PREFECT_API_URL") or None,
        database=options.database,
        api_timeout_s=options.api_timeout_s,
        say=plain_printer(console),
    ) as session:
        console.print(f"Prefect API: {session.api_url}")
        deployment = prepare_pool(session, options.pool, placing, MEMORY_BENCH_DEPLOYMENT)

        def vary(index: int, run: PipelineParams) -> PipelineParams:
            return replace(run, gpu_memory=mix.for_run(index))

        def phase(
            label: str,
            plans: tuple[WorkerPlan, ...],
            changes: Callable[[int, PipelineParams], PipelineParams] | None,
        ) -> BatchResult:
            return run_phase(session, console, label, plans, options, deployment, params, runs,
                              workdir, changes)  # fmt: skip

        placed = phase("placement", placing, vary)
        load = {"after_placement": _load()}
        prepare_pool(session, options.pool, fixed, MEMORY_BENCH_DEPLOYMENT)  # the fixed slots
        fixed_batch = phase("fixed-slots", fixed, None)
        load["after_fixed_slots"] = _load()
        licences = (
            _licence_phase(session, console, options, workdir) if options.licence_runs else None
        )
        if licences is not None:
            load["after_licences"] = _load()
        with session.client() as client:
            held = active_slots(client, _limit_names(placing))
    worker_gib = {plan.worker_id: plan.memory_limit_gib for plan in placing}
    declared = {
        str(run_id): mix.gib(mix.for_run(index))
        for index, run_id in enumerate(fixed_batch.submitted)
    }
    placement_use = memory_use(placed.records, options.gpu_gib, worker_gib)
    fixed_use = memory_use(fixed_batch.records, options.gpu_gib, worker_gib, declared)
    result = MemoryBenchResult(
        options,
        _memory_phase("placement", placing, placed, placement_use, held),
        _memory_phase("fixed-slots", fixed, fixed_batch, fixed_use, fixed_batch.slots_held_after),
        licences,
        load,
    )
    for path in options.timelines:
        limits = {plan.worker_id: plan.slots for plan in placing}
        written = write_timeline(
            path,
            TimelinePhase("placement by memory", placed.records, limits, [],
                          placed.submitted_at, placed.ended_at, options.gpu_gib),
            TimelinePhase("fixed slots (sized for the largest step)", fixed_batch.records,
                          {p.worker_id: p.slots for p in fixed}, [],
                          fixed_batch.submitted_at, fixed_batch.ended_at),
            title="prefect-gpu-workers bench --memory-mix: placement by memory vs fixed slots",
            subtitle=SIMULATION_NOTE,
        )  # fmt: skip
        console.print(f"timeline: {written}", soft_wrap=True)
    if made_workdir and not options.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _limit_names(plans: tuple[WorkerPlan, ...]) -> list[str]:
    names = [plan.limit_name for plan in plans]
    return names + [plan.memory_limit_name for plan in plans if plan.memory_limit_name]


def _memory_phase(
    label: str,
    plans: tuple[WorkerPlan, ...],
    batch: BatchResult,
    use: MemoryUse,
    held: dict[str, int],
) -> MemoryPhase:
    return MemoryPhase(
        label,
        plans[0].slots,
        plans[0].flow_runs,
        batch.metrics.runs_finished,
        batch.metrics.runs_submitted,
        use,
        batch.metrics,
        held,
        over_admissions(batch.records, {plan.worker_id: plan.slots for plan in plans}),
    )


def _licence_phase(
    session: LocalSession, console: Console, options: MemoryBenchOptions, workdir: Path
) -> LicencePhase:
    """Short steps on four workers, each holding a seat of both licences with its GPU."""
    suffix = os.urandom(3).hex()
    licences = [f"bench-licence-a-{suffix}", f"bench-licence-b-{suffix}"]
    ids = worker_ids(LICENCE_WORKERS, f"{options.worker_prefix}-lic")
    gib = options.gpu_gib
    plans = tuple(
        replace(plan, launcher=options.launcher, gpus=1, gpu_memory_gib=gib)
        for plan in plan_workers(ids, 2, 4, options.limit_prefix)
    )
    deployment = prepare_pool(session, options.pool, plans, MEMORY_BENCH_DEPLOYMENT)
    with session.client() as client:
        for name in licences:
            ensure_gpu_limit(client, name, LICENCE_SEATS)
    params = PipelineParams(
        items=1, gpu_s=LICENCE_GPU_S, simulate=True, artifacts=options.step_artifacts
    )

    def vary(index: int, run: PipelineParams) -> PipelineParams:
        # Half the runs name the licences in the other order: the broker takes them
        # in name order whatever the step says, so nobody waits in a circle.
        names = licences if index % 2 == 0 else licences[::-1]
        return replace(run, gpu_memory=options.mix.for_run(index), gpu_also=dict.fromkeys(names, 1))

    label = f"licences ({LICENCE_SEATS} seats each of 2)"
    batch = run_phase(
        session, console, label, plans, options, deployment, params, options.licence_runs,
        workdir, vary,
    )  # fmt: skip
    steps = [r for r in batch.records if r.stage == "gpu"]
    with session.client() as client:
        held = active_slots(client, licences)
    return LicencePhase(
        runs=options.licence_runs,
        completed=batch.metrics.runs_finished,
        seats=LICENCE_SEATS,
        peak_seats_held=peak_overlap((s.start, s.end, 1) for s in steps),
        held_after=held,
        span_s=batch.ended_at - batch.submitted_at,
    )


def render_memory_bench(result: MemoryBenchResult, console: Console) -> None:
    """The two phases side by side, then the licence phase."""
    table = Table(title="GPU memory: placement by memory vs fixed slots (one run)")
    table.add_column("")
    table.add_column("placement", justify="right")
    table.add_column("fixed slots", justify="right")
    p, f = result.placement, result.fixed

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    rows = [
        ("declared memory in use (GiB-s / capacity x span)", pct(p.utilisation),
         pct(f.utilisation)),
        ("slots per worker", str(p.slots_per_worker), str(f.slots_per_worker)),
        ("runs completed", f"{p.completed}/{p.submitted}", f"{f.completed}/{f.submitted}"),
        ("GPU span (s)", f"{p.use.span_s:.1f}", f"{f.use.span_s:.1f}"),
        ("runs/s", pct(p.metrics.runs_per_s), pct(f.metrics.runs_per_s)),
        ("placements beyond a GPU's memory", str(p.use.over_gpu), "-"),
        ("over-admissions: slot limit", str(p.slot_over_admissions),
         str(f.slot_over_admissions)),
        ("over-admissions: memory limit", str(p.use.over_memory_limit), "-"),
        ("steps above their declared memory (CUDA)", str(p.use.over_declared), "-"),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    if result.ratio is not None:
        console.print(f"placement / fixed slots, memory in use: {result.ratio:.2f}x")
    lic = result.licences
    if lic is not None:
        console.print(
            f"licences: {lic.completed}/{lic.runs} runs completed on {LICENCE_WORKERS} workers "
            f"sharing 2 licences of {lic.seats} seats ({lic.stalled} stalled: a deadlock would "
            f"stall them); at most {lic.peak_seats_held} step(s) held the seats at once; "
            f"held after: {sum(lic.held_after.values())}; {lic.span_s:.1f} s"
        )
    loads = ", ".join(f"{k} {v:.1f}" for k, v in result.load_average.items() if v is not None)
    console.print(f"load average (1 min): {loads} on {os.cpu_count()} cores")
    console.print(SIMULATION_NOTE)
