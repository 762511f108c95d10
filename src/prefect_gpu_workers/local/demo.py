"""``prefect-gpu-workers demo``: the pattern end to end on this machine.

Server (unless ``PREFECT_API_URL`` is set) -> process pool -> one limit
``gpu:<worker>`` per local worker -> N workers -> deployment -> M runs ->
report. Everything it started is stopped when it ends, however it ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.gpu import GpuInventory, detect_gpus
from prefect_gpu_workers.local.artifacts import print_published, publish_report
from prefect_gpu_workers.local.batch import prepare_pool, run_batch
from prefect_gpu_workers.local.gpu_work import (
    GpuStepPlan,
    calibrate_gpu_step,
    check_timeline_paths,
    no_limit_refusal,
    peak_step_memory_mib,
    plan_gpu_step,
    step_gpus,
)
from prefect_gpu_workers.local.plan import (
    DEMO_PIPELINE,
    LocalOptions,
    MemoryMix,
    WorkerPlan,
    flow_runs_per_worker,
    placing_plans,
    plan_capacity,
    plan_workers,
    worker_ids,
)
from prefect_gpu_workers.local.process_memory import ProcessMemorySampler
from prefect_gpu_workers.local.processes import SESSION_MARKER_ENV, WORKER_QUERY_SECONDS_ENV
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.local.timeline import (
    TimelinePhase,
    timeline_markdown,
    write_timeline,
)
from prefect_gpu_workers.local.views import (
    ProgressView,
    describe_memory,
    describe_memory_use,
    metrics_table,
    no_limit_table,
    plain_printer,
    plan_table,
    worker_table,
)
from prefect_gpu_workers.naming import gib_capacity, parse_memory_mib
from prefect_gpu_workers.report import figure_rows, memory_use
from prefect_gpu_workers.telemetry import (
    GpuSampler,
    describe_telemetry,
    held_intervals,
    summarize_samples,
)

DEMO_DEPLOYMENT = "gpu-pipeline-demo"


@dataclass(frozen=True)
class DemoOptions(LocalOptions):
    workers: int = 2
    timeout_s: float = 900.0
    runs: int = 12
    gpus: int | None = None
    slots_per_gpu: int | None = None
    flow_runs_per_worker: int | None = None
    pipeline: PipelineParams = DEMO_PIPELINE
    # GPU machines only: the same GPU steps without taking a slot.
    no_limit: bool = False
    # Share of the GPU's memory each step sets aside; None: 0.85 / steps sharing the GPU.
    gpu_memory_fraction: float | None = None
    # GPU steps declare memory in these proportions and are placed by it.
    memory_mix: MemoryMix | None = None
    # Each GPU's memory for placement; None: NVML's, else 80GiB (said aloud).
    gpu_memory: str | None = None


# What local mode takes each GPU's memory to be for --memory-mix when NVML finds none.
FALLBACK_GPU_MEMORY = "80GiB"


def placing_by_memory(
    plans: tuple[WorkerPlan, ...],
    mix: MemoryMix,
    gpus: int,
    gpu_memory: str | None,
    inventory: GpuInventory,
) -> tuple[tuple[WorkerPlan, ...], str]:
    """The plans placing by memory, and a line saying where each GPU's memory came from.

    Each worker gets slots enough for its GPUs full of the mix's smallest step
    (:func:`plan.placing_plans`).
    """
    if gpu_memory is not None:
        gib, source = gib_capacity(parse_memory_mib(gpu_memory)), "stated"
    elif inventory.count:
        gib, source = min(gib_capacity(d.memory_mib) for d in inventory.devices), "NVML"
    else:
        gib = gib_capacity(parse_memory_mib(FALLBACK_GPU_MEMORY))
        source = f"no GPU found: taken to be {FALLBACK_GPU_MEMORY} (--gpu-memory)"
    if mix.largest_gib > gib:
        raise ValueError(
            f"--memory-mix asks for {mix.largest_gib} GiB, more than a GPU's {gib} GiB"
        )
    placed = placing_plans(plans, mix, gpus, gib)
    line = (
        f"GPU steps declare {', '.join(f'{s} x{n}' for s, n in mix.sizes)} and are placed on "
        f"{gpus} GPU(s) of {gib} GiB per worker ({source})"
    )
    return placed, line


def make_workdir(requested: Path | None, prefix: str) -> tuple[Path, bool]:
    """The directory for logs, records and the database; ``True`` if we made it."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return requested, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def run_demo(options: DemoOptions, console: Console) -> int:
    """Run the demo; returns the exit code.

    0: every run finished within its limit (with ``no_limit``: the runs ran and
    every process stopped; failed runs are what it shows); 2: refused.
    """
    inventory = detect_gpus()
    if options.no_limit:
        refusal = no_limit_refusal(inventory.count, options.pipeline.simulate)
        if refusal:
            console.print(f"[red]{refusal}[/red] ({inventory.describe()})")
            return 2
    try:
        check_timeline_paths(options.timelines)
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]--timeline: {exc}[/red]")
        return 2
    capacity_plan = plan_capacity(inventory, options.gpus, options.slots_per_gpu)
    for message in capacity_plan.messages:
        console.print(f"[bold]GPU:[/bold] {message}")
    slots = capacity_plan.capacity.slots
    p = options.pipeline
    flow_runs = options.flow_runs_per_worker or flow_runs_per_worker(
        slots, options.runs, options.workers, p.download_s, p.gpu_s, p.save_s
    )
    plans = tuple(
        replace(plan, launcher=options.launcher)
        for plan in plan_workers(
            worker_ids(options.workers, options.worker_prefix),
            slots,
            flow_runs,
            options.limit_prefix,
        )
    )
    if options.memory_mix is not None:
        try:
            plans, placing = placing_by_memory(
                plans, options.memory_mix, capacity_plan.capacity.gpus, options.gpu_memory,
                inventory,
            )  # fmt: skip
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            return 2
        console.print(f"[bold]GPU memory:[/bold] {placing}")
    step_plan = _plan_gpu_step(options, inventory.count, slots, console)
    p = replace(
        p,
        gpu_batches=step_plan.batches,
        gpu_memory_fraction=step_plan.memory_fraction,
        unlimited=options.no_limit,
        artifacts=options.step_artifacts,
    )
    workdir, made_workdir = make_workdir(options.workdir, "pgw-demo-")
    console.print(f"work directory (logs, records): {workdir}")
    worker_env = (
        {WORKER_QUERY_SECONDS_ENV: str(options.worker_query_seconds)}
        if options.worker_query_seconds
        else {}
    )
    external = os.environ.get("PREFECT_API_URL") or None
    console.print(
        f"using the Prefect API at {external}"
        if external
        else f"starting a Prefect server on {options.database} for this demo ..."
    )
    ok = False
    ok_memory = True
    with LocalSession(
        workdir,
        api_url=external,
        database=options.database,
        api_timeout_s=options.api_timeout_s,
        say=plain_printer(console),
    ) as session:
        console.print(f"Prefect API: {session.api_url}")
        fell_back = session.server is not None and session.server.fallback_reason
        console.print(
            session.describe_database(),
            style="yellow" if fell_back else None,
            markup=False,
            highlight=False,
        )
        deployment_id = prepare_pool(session, options.pool, plans, DEMO_DEPLOYMENT)
        console.print(plan_table(plans, options.pool))
        console.print(
            f"GPU step: {'simulated' if p.simulate else step_plan.description}; "
            f"occupy={p.occupy}; download {p.download_s:g}s and save {p.save_s:g}s at least"
        )
        if options.no_limit:
            console.print(
                "[bold yellow]--no-limit: GPU steps take no slot; each worker still runs "
                f"{flow_runs} flow runs at once[/bold yellow]"
            )
        session.start_workers(plans, options.pool, worker_env)
        session.wait_for_workers(options.pool)
        console.print(f"{len(plans)} worker(s) online; submitting {options.runs} flow run(s)")
        with (
            GpuSampler() as sampler,
            ProcessMemorySampler(SESSION_MARKER_ENV, session.marker) as memory,
            ProgressView(console, "demo", plans) as progress,
        ):
            mix = options.memory_mix
            result = run_batch(
                session,
                deployment_id,
                plans,
                p,
                options.runs,
                workdir / "records",
                progress,
                options.timeout_s,
                None if mix is None else lambda i, run: replace(run, gpu_memory=mix.for_run(i)),
            )
        samples = sampler.stop()
        metrics = result.metrics
        console.print(metrics_table("Demo report", metrics, result.api_latency))
        console.print(worker_table(metrics))
        console.print(describe_memory(memory.figures()), highlight=False)
        devices = sorted({r.device for r in result.records if r.stage == "gpu" and r.device})
        if devices:
            console.print(f"GPU steps ran on: {', '.join(devices)}")
        summary = summarize_samples(
            samples, held_intervals(result.records), gpus=step_gpus(os.environ)
        )
        telemetry = describe_telemetry(summary, sampler.unavailable_reason)
        console.print(telemetry)
        if options.memory_mix is not None:
            use = memory_use(
                result.records,
                plans[0].gpu_memory_gib or 0,
                {plan.worker_id: plan.memory_limit_gib for plan in plans},
            )
            console.print(describe_memory_use(use))
            ok_memory = use.over_gpu == 0 and use.over_memory_limit == 0
        peak = peak_step_memory_mib(result.records)
        if peak is not None:
            total = f" of {summary.memory_total_mib:.0f} MiB" if summary else ""
            console.print(f"peak GPU memory one GPU step used (torch): {peak:.0f} MiB{total}")
        if options.no_limit:
            console.print(no_limit_table(result.records, metrics, summary, step_plan.batches))
        for message in result.failure_messages():
            console.print(f"[red]failed run[/red] {message}")
        leaked = {name: held for name, held in result.slots_held_after.items() if held}
        if leaked:
            console.print(f"[red]slots still held after all runs ended: {leaked}[/red]")
        if options.no_limit:
            ok = not leaked
        else:
            ok = (
                metrics.runs_failed == 0
                and metrics.runs_finished == options.runs
                and metrics.within_limits
                and not leaked
                and ok_memory
            )
        title = "prefect-gpu-workers demo" + (" --no-limit" if options.no_limit else "")
        phase = TimelinePhase(
            "demo (no limit)" if options.no_limit else "demo",
            result.records,
            {plan.worker_id: plan.slots for plan in plans},
            samples,
            result.submitted_at,
            result.ended_at,
            plans[0].gpu_memory_gib,
        )
        # Drawn while the server is up, so that the timeline artifact can link them.
        pictures = [
            write_timeline(path, phase, title=title, subtitle=telemetry)
            for path in options.timelines
        ]
        published = None
        if options.artifacts:
            description = (
                f"{options.runs} runs of {DEMO_DEPLOYMENT} on {len(plans)} worker(s) of pool "
                f"{options.pool}, {slots} GPU slot(s) each"
                + ("; GPU step simulated" if p.simulate else "")
            )
            with session.client() as client:
                published = publish_report(
                    client,
                    "demo",
                    options.pool,
                    figure_rows([(phase.label, metrics)]),
                    timeline_markdown([phase], title, telemetry, pictures),
                    description,
                )
        print_published(console, published, "demo")
    remaining = session.remaining_pids()
    if remaining:
        console.print(f"[red]processes still running after shutdown: {remaining}[/red]")
        ok = False
    else:
        console.print("all processes started by the demo have stopped")
    for written in pictures:
        # Never wrapped: a person copies the path.
        console.print(f"timeline: {written}", soft_wrap=True)
    if ok and made_workdir and not options.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        console.print(f"logs kept in {workdir / 'logs'}")
    return 0 if ok else 1


def _plan_gpu_step(
    options: DemoOptions, gpus_detected: int, slots: int, console: Console
) -> GpuStepPlan:
    """Calibrate once, before any run and outside every slot, when a GPU is there."""
    p = options.pipeline
    # Local workers all run their steps on the first GPU.
    steps_per_gpu = options.workers * slots
    if p.simulate or gpus_detected == 0:
        return plan_gpu_step(p.gpu_s, steps_per_gpu, None)
    console.print("calibrating the GPU step on the idle GPU (once, in a child process) ...")
    calibration = calibrate_gpu_step(p.gpu_s / steps_per_gpu)
    return plan_gpu_step(p.gpu_s, steps_per_gpu, calibration, options.gpu_memory_fraction)
