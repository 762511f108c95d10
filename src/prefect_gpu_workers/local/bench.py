"""``prefect-gpu-workers bench``: task-level vs flow-level GPU limiting on the same workers.

Every phase runs the same deployment on the same worker ids with the same
per-worker limits; the GPU step holds its GCL slot in each. What differs:

- task-level (this project's pattern): ``--flow-runs`` large enough to keep the
  slots busy, and the GCL alone keeps the GPU within its slots; the GPU steps
  wait at the worker's slot broker, which hands a freed slot over at once;
- task-level, polling: the same, with workers started without their broker
  (``--no-slot-broker``): GPU steps poll Prefect and sleep its Retry-After, as
  a plain ``concurrency()`` does. The two handoff gaps side by side are what
  the broker buys;
- flow-level: ``--flow-runs`` equal to the worker's slots, the usual way to
  protect a GPU without a GCL. The GCL never has to block then; it only costs
  the same acquire/release as in the other phases.

Stage work is simulated (each stage sleeps its duration, GPU = a third of a
run), so the numbers measure Prefect's coordination, not this machine's CPU.
Prefect runs with its default server and worker settings unless told
otherwise (``--poll-seconds``).

The defaults (one worker with 2 slots, 4 s GPU steps) aim to keep the GPU
the bottleneck on a small machine: every flow run is a new Python process
whose start-up costs CPU-seconds, so the CPU caps how many runs per second a
machine can start (docs/benchmarks.md gives measured figures), and the task-level ceiling
here is 2 slots / 4 s = 0.5 runs/s. With more slots or shorter steps the bench
measures the CPU; the output gives both ceilings and the load average so that
a reader can tell.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import prefect
from rich.console import Console

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.gpu import detect_gpus
from prefect_gpu_workers.local.artifacts import print_published, publish_report
from prefect_gpu_workers.local.batch import BatchResult, prepare_pool, run_batch
from prefect_gpu_workers.local.demo import make_workdir
from prefect_gpu_workers.local.gpu_work import check_timeline_paths, step_gpus
from prefect_gpu_workers.local.plan import (
    DEFAULT_POOL,
    LocalOptions,
    WorkerPlan,
    flow_runs_to_fill,
    plan_capacity,
    plan_workers,
    worker_ids,
)
from prefect_gpu_workers.local.prefect_ops import active_slots
from prefect_gpu_workers.local.process_memory import MemoryFigures, ProcessMemorySampler
from prefect_gpu_workers.local.processes import SESSION_MARKER_ENV, WORKER_QUERY_SECONDS_ENV
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.local.timeline import (
    TimelinePhase,
    timeline_markdown,
    write_timeline,
)
from prefect_gpu_workers.local.views import (
    ProgressView,
    bench_table,
    describe_memory,
    plain_printer,
)
from prefect_gpu_workers.local.watch import LatencySummary, summarize_latencies
from prefect_gpu_workers.report import PhaseMetrics, figure_rows, speedup
from prefect_gpu_workers.telemetry import (
    GpuSample,
    GpuSampler,
    TelemetrySummary,
    describe_telemetry,
    held_intervals,
    summarize_samples,
)

BENCH_DEPLOYMENT = "gpu-pipeline-bench"
SUBPROCESS_PHASE = "task-level-subprocess"
NO_LATENCY = summarize_latencies([])
TIMELINE_TITLE = "prefect-gpu-workers bench: slot broker, Prefect polling, flow-level limiting"
TIMELINE_SUBTITLE = "stage work simulated (sleeps); same workers, limits and runs in every phase"
SIMULATION_NOTE = (
    "stage work is simulated: each stage sleeps its duration (GPU = a third of a run); "
    "the figures measure Prefect coordination, not model speed"
)


@dataclass(frozen=True)
class BenchOptions(LocalOptions):
    pool: str = f"{DEFAULT_POOL}-bench"
    runs: int | None = None  # per phase; None: enough to reach a steady state
    gpu_seconds: float = 4.0
    gpus: int | None = None
    slots_per_gpu: int | None = None
    # False: leave out the flow-level phase (with long GPU steps it takes longest).
    flow_level: bool = True
    # With the fork launcher: one more task-level phase whose runs start as
    # subprocesses, so both start-ups are measured in one run.
    compare_launchers: bool = True


def default_runs(total_slots: int) -> int:
    """Runs per phase: five per slot, so each slot hands over several times."""
    return 5 * total_slots


@dataclass(frozen=True)
class Ceilings:
    """Best throughput each phase could reach if its GPU slots never idled."""

    task_level_runs_per_s: float | None
    flow_level_runs_per_s: float | None


def ceilings(total_slots: int, params: PipelineParams) -> Ceilings:
    run_s = params.download_s + params.gpu_s + params.save_s
    return Ceilings(
        total_slots / params.gpu_s if params.gpu_s > 0 else None,
        # A flow-level slot is taken for the whole run, start-up not counted.
        total_slots / run_s if run_s > 0 else None,
    )


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass(frozen=True)
class BenchResult:
    options: BenchOptions
    pipeline: PipelineParams
    runs_per_phase: int
    task_level_flow_runs: int
    flow_level_flow_runs: int
    task_level: PhaseMetrics
    flow_level: PhaseMetrics | None
    task_level_polling: PhaseMetrics
    slots_held_after: dict[str, int]
    ceilings: Ceilings
    # 1-minute load average at the end of each phase: above the core count,
    # flow-run start-up was waiting for CPU and the figures say less about Prefect.
    load_after_task_level: float | None
    load_after_flow_level: float | None
    load_after_task_level_polling: float | None
    # Per phase: GPU telemetry (None without NVML) and the one-line report.
    telemetry: dict[str, TelemetrySummary | None] = field(default_factory=dict)
    telemetry_lines: dict[str, str] = field(default_factory=dict)
    # postgres, sqlite, or external (PREFECT_API_URL); why not postgres, if it fell back.
    database: str = "postgres"
    database_fallback_reason: str | None = None
    # Progress polls' API requests as this client timed them, per phase.
    task_level_api_latency: LatencySummary = field(default_factory=lambda: NO_LATENCY)
    flow_level_api_latency: LatencySummary = field(default_factory=lambda: NO_LATENCY)
    task_level_polling_api_latency: LatencySummary = field(default_factory=lambda: NO_LATENCY)
    # The task-level phase again, its flow runs started as subprocesses (None: not run).
    task_level_subprocess: PhaseMetrics | None = None
    # Per phase: the launchers' resident size and the flow-run processes' own memory.
    memory: dict[str, MemoryFigures] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return speedup(self.task_level, self.flow_level) if self.flow_level else None

    @property
    def phases(self) -> list[PhaseMetrics]:
        """Every phase that ran."""
        return [
            m
            for m in (
                self.task_level,
                self.task_level_subprocess,
                self.task_level_polling,
                self.flow_level,
            )
            if m is not None
        ]

    def as_json(self) -> dict[str, Any]:
        """One object; the headline keys describe the task-level (GCL) phase."""
        task = self.task_level
        return {
            "simulated": True,
            "note": SIMULATION_NOTE,
            "task_level_runs_per_s": task.runs_per_s,
            "task_level_polling_runs_per_s": self.task_level_polling.runs_per_s,
            "flow_level_runs_per_s": self.flow_level.runs_per_s if self.flow_level else None,
            "ratio": self.ratio,
            "slot_utilization": task.slot_utilization,
            "handoff_gap_p50_s": task.gcl_handoff_gap_p50_s,
            "handoff_gap_p95_s": task.gcl_handoff_gap_p95_s,
            "launcher": self.options.launcher,
            "start_up_p50_s": task.start_up_p50_s,
            "start_up_p95_s": task.start_up_p95_s,
            "start_cpu_mean_s": task.start_cpu_mean_s,
            "task_level_subprocess": (
                asdict(self.task_level_subprocess) if self.task_level_subprocess else None
            ),
            "max_gpu_overlap_per_worker": task.max_gpu_overlap_per_worker,
            "limit_per_worker": task.limit_per_worker,
            "database": self.database,
            "database_fallback_reason": self.database_fallback_reason,
            "api_latency_p50_s": self.task_level_api_latency.p50_s,
            "api_latency_p95_s": self.task_level_api_latency.p95_s,
            "api_latency": {
                "measured": "client side: each progress-poll request (read runs, read limit)",
                "task_level": asdict(self.task_level_api_latency),
                "flow_level": asdict(self.flow_level_api_latency),
            },
            "settings": {
                "workers": self.options.workers,
                "runs_per_phase": self.runs_per_phase,
                "download_s": self.pipeline.download_s,
                "gpu_s": self.pipeline.gpu_s,
                "save_s": self.pipeline.save_s,
                "task_level_flow_runs_per_worker": self.task_level_flow_runs,
                "flow_level_flow_runs_per_worker": self.flow_level_flow_runs,
                "worker_query_seconds": self.options.worker_query_seconds,
                "api_timeout_s": self.options.api_timeout_s,
                "prefect_version": prefect.__version__,
                "cpu_count": os.cpu_count(),
            },
            "ceiling_runs_per_s": asdict(self.ceilings),
            "load_average_1m": {
                "after_task_level": self.load_after_task_level,
                "after_flow_level": self.load_after_flow_level,
                "after_task_level_polling": self.load_after_task_level_polling,
            },
            "slot_utilization_per_worker": task.slot_utilization_per_worker,
            "polling_slot_utilization": self.task_level_polling.slot_utilization,
            "polling_slot_utilization_per_worker": (
                self.task_level_polling.slot_utilization_per_worker
            ),
            "polling_handoff_gap_p50_s": self.task_level_polling.gcl_handoff_gap_p50_s,
            "polling_handoff_gap_p95_s": self.task_level_polling.gcl_handoff_gap_p95_s,
            "task_level_polling": asdict(self.task_level_polling),
            "task_level": asdict(task),
            "flow_level": asdict(self.flow_level) if self.flow_level else None,
            "slots_held_after": self.slots_held_after,
            "process_memory": {label: asdict(figures) for label, figures in self.memory.items()},
            "gpu_telemetry": {
                label: asdict(summary) if summary is not None else None
                for label, summary in self.telemetry.items()
            },
        }


def run_phase(
    session: LocalSession,
    console: Console,
    label: str,
    plans: tuple[WorkerPlan, ...],
    options: LocalOptions,
    deployment_id: Any,
    params: PipelineParams,
    runs: int,
    workdir: Path,
    vary: Callable[[int, PipelineParams], PipelineParams] | None = None,
) -> BatchResult:
    """One phase of a bench: start ``plans``' workers, run ``runs`` runs, stop them."""
    worker_env = (
        {WORKER_QUERY_SECONDS_ENV: str(options.worker_query_seconds)}
        if options.worker_query_seconds
        else {}
    )
    memory = plans[0].memory_limit_gib
    console.print(
        f"[bold]{label}[/bold]: {len(plans)} worker(s), {plans[0].flow_runs} flow run(s) "
        f"at once each, {plans[0].slots} GPU slot(s) each"
        + (f", {memory} GiB placed by memory each" if memory else "")
        + f", {runs} runs"
    )
    session.start_workers(plans, options.pool, worker_env)
    try:
        session.wait_for_workers(options.pool)
        with ProgressView(console, label, plans) as progress:
            return run_batch(
                session,
                deployment_id,
                plans,
                params,
                runs,
                workdir / "records" / label,
                progress,
                options.timeout_s,
                vary,
            )
    finally:
        session.stop_workers()


def run_bench(options: BenchOptions, console: Console) -> BenchResult:
    """Run both phases; progress goes to ``console``.

    Raises:
        ValueError, RuntimeError: a ``timelines`` file that cannot be written
            (extension, missing plotting library), before anything starts.
    """
    check_timeline_paths(options.timelines)
    capacity_plan = plan_capacity(detect_gpus(), options.gpus, options.slots_per_gpu)
    for message in capacity_plan.messages:
        console.print(f"GPU: {message}")
    console.print(SIMULATION_NOTE)
    slots = capacity_plan.capacity.slots
    g = options.gpu_seconds
    params = PipelineParams(
        items=1, download_s=g, gpu_s=g, save_s=g, simulate=True,
        artifacts=options.step_artifacts,
    )  # fmt: skip
    ids = worker_ids(options.workers, options.worker_prefix)
    task_flow_runs = flow_runs_to_fill(slots, g, g, g)
    task_plans = tuple(
        replace(plan, launcher=options.launcher)
        for plan in plan_workers(ids, slots, task_flow_runs, options.limit_prefix)
    )
    flow_plans = tuple(replace(plan, flow_runs=slots) for plan in task_plans)
    runs = options.runs or default_runs(slots * options.workers)
    workdir, made_workdir = make_workdir(options.workdir, "pgw-bench-")
    console.print(f"work directory (logs, records): {workdir}")
    external = os.environ.get("PREFECT_API_URL") or None
    if not external:
        console.print(f"starting a Prefect server on {options.database} ...")
    with LocalSession(
        workdir,
        api_url=external,
        database=options.database,
        api_timeout_s=options.api_timeout_s,
        say=plain_printer(console),
    ) as session:
        console.print(f"Prefect API: {session.api_url}")
        console.print(session.describe_database(), markup=False, highlight=False)
        deployment_id = prepare_pool(session, options.pool, task_plans, BENCH_DEPLOYMENT)

        sampled: dict[str, tuple[list[GpuSample], str | None]] = {}

        memory: dict[str, MemoryFigures] = {}

        def phase(label: str, plans: tuple[WorkerPlan, ...]) -> BatchResult:
            with (
                GpuSampler() as sampler,
                ProcessMemorySampler(SESSION_MARKER_ENV, session.marker) as memory_sampler,
            ):
                batch = run_phase(
                    session, console, label, plans, options, deployment_id, params, runs, workdir
                )
            sampled[label] = (sampler.stop(), sampler.unavailable_reason)
            memory[label] = memory_sampler.figures()
            return batch

        task_level = phase("task-level", task_plans)
        load_after_task_level = load_average()
        subprocess_phase = None
        if options.launcher == "fork" and options.compare_launchers:
            subprocess_phase = phase(
                SUBPROCESS_PHASE,
                tuple(replace(plan, launcher="subprocess") for plan in task_plans),
            )
        polling = phase(
            "task-level-polling",
            tuple(replace(plan, slot_broker=False) for plan in task_plans),
        )
        load_after_polling = load_average()
        flow_level = phase("flow-level", flow_plans) if options.flow_level else None
        load_after_flow_level = load_average() if flow_level else None
        with session.client() as client:
            held = active_slots(client, [plan.limit_name for plan in task_plans])
        result = BenchResult(
            options=options,
            pipeline=params,
            runs_per_phase=runs,
            task_level_flow_runs=task_flow_runs,
            flow_level_flow_runs=slots,
            task_level=task_level.metrics,
            flow_level=flow_level.metrics if flow_level else None,
            task_level_polling=polling.metrics,
            slots_held_after=held,
            ceilings=ceilings(slots * options.workers, params),
            load_after_task_level=load_after_task_level,
            load_after_flow_level=load_after_flow_level,
            load_after_task_level_polling=load_after_polling,
            database=session.database_in_use,
            database_fallback_reason=session.server.fallback_reason if session.server else None,
            task_level_api_latency=task_level.api_latency,
            flow_level_api_latency=flow_level.api_latency if flow_level else NO_LATENCY,
            task_level_polling_api_latency=polling.api_latency,
            task_level_subprocess=subprocess_phase.metrics if subprocess_phase else None,
            memory=memory,
        )
        limits = {plan.worker_id: plan.slots for plan in task_plans}
        timeline_phases = []
        ran = [("task-level", task_level), ("task-level-polling", polling)]
        if subprocess_phase is not None:
            ran.insert(1, (SUBPROCESS_PHASE, subprocess_phase))
        if flow_level is not None:
            ran.append(("flow-level", flow_level))
        for label, batch in ran:
            samples, reason = sampled[label]
            summary = summarize_samples(
                samples, held_intervals(batch.records), gpus=step_gpus(os.environ)
            )
            result.telemetry[label] = summary
            result.telemetry_lines[label] = describe_telemetry(summary, reason)
            timeline_phases.append(
                TimelinePhase(
                    f"{label} (flow runs per worker: "
                    f"{slots if label == 'flow-level' else task_flow_runs})",
                    batch.records,
                    limits,
                    samples,
                    batch.submitted_at,
                    batch.ended_at,
                )
            )
        # Drawn while the server is up, so that the timeline artifact can link them.
        pictures = [
            write_timeline(path, *timeline_phases, title=TIMELINE_TITLE, subtitle=TIMELINE_SUBTITLE)
            for path in options.timelines
        ]
        published = None
        if options.artifacts:
            with session.client() as client:
                published = publish_report(
                    client,
                    "bench",
                    options.pool,
                    figure_rows(labelled_phases(result)),
                    timeline_markdown(timeline_phases, TIMELINE_TITLE, TIMELINE_SUBTITLE, pictures),
                    f"{runs} runs per phase on {options.workers} worker(s) of pool {options.pool}; "
                    + SIMULATION_NOTE,
                )
        print_published(console, published, "bench")
    for written in pictures:
        # Never wrapped: a person copies the path.
        console.print(f"timeline: {written}", soft_wrap=True)
    if made_workdir and not options.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def labelled_phases(result: BenchResult) -> list[tuple[str, PhaseMetrics]]:
    """Every phase that ran, named as the report names it (the table's columns)."""
    phases = [(f"task-level, slot broker ({result.options.launcher})", result.task_level)]
    if result.task_level_subprocess is not None:
        phases.append(("task-level, slot broker (subprocess)", result.task_level_subprocess))
    phases.append(("task-level, Prefect polling", result.task_level_polling))
    if result.flow_level is not None:
        phases.append(("flow-level (--flow-runs = slots)", result.flow_level))
    return phases


def render(result: BenchResult, console: Console) -> None:
    phases = labelled_phases(result)
    latencies = [result.task_level_api_latency]
    if result.task_level_subprocess is not None:
        latencies.append(NO_LATENCY)
    latencies.append(result.task_level_polling_api_latency)
    if result.flow_level is not None:
        latencies.append(result.flow_level_api_latency)
    console.print(bench_table(phases, result.ratio, latencies))
    for label, figures in result.memory.items():
        console.print(f"{label}: {describe_memory(figures)}")
    c = result.ceilings
    if c.task_level_runs_per_s and c.flow_level_runs_per_s:
        console.print(
            f"ceilings if slots never idled: task-level {c.task_level_runs_per_s:.3f} runs/s, "
            f"flow-level {c.flow_level_runs_per_s:.3f} runs/s (flow-run start-up not counted)"
        )
    cores = os.cpu_count() or 1
    loads = [
        x
        for x in (
            result.load_after_task_level,
            result.load_after_task_level_polling,
            result.load_after_flow_level,
        )
        if x
    ]
    if loads and max(loads) > cores:
        console.print(
            f"[yellow]load average reached {max(loads):.1f} on {cores} cores: flow runs waited "
            "for CPU to start, so throughput reflects this machine as much as Prefect[/yellow]"
        )
    for label, line in result.telemetry_lines.items():
        console.print(f"{label}: {line}")
    console.print(SIMULATION_NOTE)
