"""``prefect-gpu-workers``: the worker entrypoint, the local demo and the bench.

The top layer. It imports local mode's pure plan for its defaults and the
rest of local mode only when a command runs, so that ``--help`` and the
worker entrypoint do not pay for it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from rich.console import Console

from prefect_gpu_workers.argtypes import (
    limit_prefix,
    memory_size,
    non_negative_float,
    positive_float,
    positive_int,
)
from prefect_gpu_workers.commands import DEFAULT_LAUNCHER, LAUNCHERS, validate_metrics_port
from prefect_gpu_workers.database import DATABASES
from prefect_gpu_workers.local.plan import (
    DEFAULT_API_TIMEOUT_S,
    DEFAULT_POOL,
    DEFAULT_WORKER_PREFIX,
    DEMO_PIPELINE,
    MemoryMix,
)
from prefect_gpu_workers.naming import (
    DEFAULT_LIMIT_PREFIX,
    LIMIT_PREFIX_ENV,
    WorkerIdentityError,
    validate_worker_id,
)
from prefect_gpu_workers.service.options import (
    add_start_parser,
    add_status_parser,
    run_start,
    run_status,
)
from prefect_gpu_workers.stopping import StopSignals
from prefect_gpu_workers.worker.drain import DEFAULT_DRAIN_S

T = TypeVar("T")


def _worker_prefix(text: str) -> str:
    try:
        validate_worker_id(f"{text}-1")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value}")
    return value


def _timeline_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".png", ".html", ".htm"):
        raise argparse.ArgumentTypeError(f"must end in .png or .html, got {text!r}")
    return path


def _add_timeline(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeline",
        type=_timeline_path,
        action="append",
        default=[],
        metavar="FILE",
        help="write a timeline picture: FILE.png (matplotlib) or FILE.html (plotly, "
        "self-contained); repeat for both; needs the viz extra",
    )


def _add_common(parser: argparse.ArgumentParser, pool: str, workers: int) -> None:
    parser.add_argument(
        "--workers", type=positive_int, default=workers, help=f"local workers ({workers})"
    )
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=DEFAULT_LAUNCHER,
        help="how the workers start flow runs: fork (from a warm launcher that has imported "
        f"Prefect) or subprocess (a new interpreter each, as Prefect does) ({DEFAULT_LAUNCHER})",
    )
    parser.add_argument(
        "--gpus",
        type=positive_int,
        help="GPUs per worker; default: detected, or 1 when none is found (said aloud)",
    )
    parser.add_argument(
        "--slots-per-gpu", type=positive_int, help="GPU steps one GPU takes at once (2)"
    )
    parser.add_argument("--pool", default=pool, help=f"process work pool ({pool})")
    parser.add_argument(
        "--worker-prefix",
        type=_worker_prefix,
        default=DEFAULT_WORKER_PREFIX,
        help=f"worker ids are <prefix>-1 .. <prefix>-N ({DEFAULT_WORKER_PREFIX})",
    )
    parser.add_argument(
        "--limit-prefix",
        type=limit_prefix,
        default=DEFAULT_LIMIT_PREFIX,
        help=f"limit name prefix: <limit prefix>:<worker> ({DEFAULT_LIMIT_PREFIX})",
    )
    parser.add_argument(
        "--poll-seconds",
        type=non_negative_float,
        help="worker poll interval (PREFECT_WORKER_QUERY_SECONDS); default: Prefect's, 10",
    )
    parser.add_argument(
        "--workdir", type=Path, help="logs, records and the database (default: a temp dir)"
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep the temp work dir after success"
    )
    parser.add_argument(
        "--timeout", type=positive_int, default=1800, help="give up after this many seconds"
    )
    parser.add_argument(
        "--database",
        choices=DATABASES,
        default=DATABASES[0],
        help="database of the Prefect server started here: an embedded PostgreSQL (default; "
        "falls back to SQLite, saying so, where it cannot start) or SQLite (fine for small "
        "runs). Ignored with PREFECT_API_URL, which means: use that server, start none",
    )
    parser.add_argument(
        "--api-timeout",
        type=positive_float,
        default=DEFAULT_API_TIMEOUT_S,
        help="seconds the Prefect API may stay silent before everything started here is "
        f"stopped and the command fails ({DEFAULT_API_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--no-artifacts",
        dest="artifacts",
        action="store_false",
        help="publish no Prefect artifacts: neither the report and timeline (on a run of "
        "their own) nor each GPU step's table (on its run)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefect-gpu-workers",
        description="Per-worker GPU concurrency limits for Prefect process workers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="run the pipeline on local workers and report GPU overlap per worker",
        description="Start a Prefect server (unless PREFECT_API_URL is set), a process pool, "
        "one GPU limit and one worker per local worker; run the pipeline; report.",
    )
    _add_common(demo, DEFAULT_POOL, workers=2)
    demo.add_argument("--runs", type=positive_int, default=12, help="flow runs to submit (12)")
    d = DEMO_PIPELINE
    demo.add_argument(
        "--items", type=positive_int, default=d.items, help=f"inputs per run ({d.items})"
    )
    demo.add_argument(
        "--occupy", type=positive_int, default=d.occupy, help=f"slots per GPU step ({d.occupy})"
    )
    # Minimums: a stage does its work, then sleeps out the rest.
    demo.add_argument(
        "--download-seconds",
        type=non_negative_float,
        default=d.download_s,
        help=f"download stage ({d.download_s:g})",
    )
    demo.add_argument(
        "--gpu-seconds",
        type=non_negative_float,
        default=d.gpu_s,
        help="GPU stage, in the slot: on a GPU a work target (batches calibrated once so "
        "that a step takes this long while the steps the limits allow share the GPU), "
        f"on the CPU a minimum ({d.gpu_s:g})",
    )
    demo.add_argument(
        "--save-seconds",
        type=non_negative_float,
        default=d.save_s,
        help=f"save stage ({d.save_s:g})",
    )
    demo.add_argument(
        "--simulate", action="store_true", help="sleep instead of running the model (no torch)"
    )
    demo.add_argument(
        "--no-limit",
        action="store_true",
        help="GPU machines only: run the same GPU steps without taking a slot and report "
        "what happens (out-of-memory failures, slower steps)",
    )
    demo.add_argument(
        "--gpu-memory-fraction",
        type=_fraction,
        help="share of the GPU's memory each GPU step sets aside (default: 0.85 / the steps "
        "the limits allow on the GPU; 0: only what the model needs)",
    )
    _add_timeline(demo)
    _add_memory_mix(demo)
    demo.add_argument(
        "--flow-runs-per-worker",
        type=positive_int,
        help="each worker's --flow-runs; default: enough to keep its GPU slots busy, at most "
        "its share of the runs",
    )

    bench = commands.add_parser(
        "bench",
        help="compare task-level (GCL) with flow-level (--flow-runs) GPU limiting",
        description="Run the pipeline twice on the same local workers: GPU step limited by "
        "the per-worker GCL with many flow runs per worker, then flow runs limited to the "
        "GPU slots. Stage work is simulated; the GPU stage is a third of a run.",
    )
    # One worker by default: on a small machine more slots would measure
    # flow-run start-up CPU instead of the slot handoff.
    _add_common(bench, f"{DEFAULT_POOL}-bench", workers=1)
    bench.add_argument(
        "--gpu-seconds",
        type=positive_float,
        help="GPU step length; download and save take as long (4; try 32 for long steps; "
        "with --memory-mix: 8, download and save an eighth of it)",
    )
    bench.add_argument("--runs", type=positive_int, help="runs per phase (5 per GPU slot)")
    bench.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_timeline(bench)
    bench.add_argument(
        "--faults",
        action="store_true",
        help="instead of the comparison: one task-level batch during which a GPU step is "
        "killed with SIGKILL and the Prefect server is restarted; reports over-admissions, "
        "reclaim time, leaked slots and failed runs",
    )
    bench.add_argument(
        "--skip-flow-level",
        action="store_true",
        help="only the two task-level phases (broker, polling): long GPU steps make the "
        "flow-level phase the longest",
    )
    _add_memory_mix(bench)
    bench.add_argument(
        "--licence-runs",
        type=positive_int,
        help="with --memory-mix: one more phase of N short runs on 4 workers whose GPU steps "
        "also hold a seat of each of two licence limits (2 seats each), to show that none "
        "deadlocks",
    )
    bench.add_argument(
        "--skip-launcher-comparison",
        action="store_true",
        help="with --launcher fork, leave out the task-level phase whose flow runs start as "
        "subprocesses (the flow-run start-up comparison)",
    )

    worker = commands.add_parser(
        "worker",
        help="wait for this worker's GPU limit, then run its slot broker and Prefect worker",
        description="The worker pods' entrypoint (the operator starts it; WORKER_ID must be set). "
        "Waits until <limit prefix>:<WORKER_ID> exists and is active, then runs, in one "
        "process, the slot broker that hands this worker's GPU slots to its flow runs "
        "(Unix socket, PGW_SLOT_BROKER) and the Prefect process worker named WORKER_ID.",
    )
    worker.add_argument("--pool", required=True, help="process work pool")
    worker.add_argument(
        "--flow-runs",
        type=positive_int,
        required=True,
        help="flow runs this worker takes at once (prefect worker start --limit)",
    )
    worker.add_argument(
        "--limit-prefix",
        type=limit_prefix,
        default=os.environ.get(LIMIT_PREFIX_ENV) or DEFAULT_LIMIT_PREFIX,
        help=f"limit name prefix (${LIMIT_PREFIX_ENV}, else {DEFAULT_LIMIT_PREFIX})",
    )
    worker.add_argument(
        "--wait-timeout",
        type=non_negative_float,
        default=300.0,
        help="seconds to wait for the limit before failing (300)",
    )
    worker.add_argument(
        "--drain-seconds",
        type=non_negative_float,
        default=DEFAULT_DRAIN_S,
        help="on SIGTERM or Ctrl-C: seconds the flow runs in flight get to finish before the "
        "worker stops them and schedules them again (PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
        f"=reschedule) or marks them Crashed ({DEFAULT_DRAIN_S:.0f})",
    )
    worker.add_argument("--with-healthcheck", action="store_true", help="serve /health")
    worker.add_argument(
        "--intake",
        choices=["gpu-queue", "flow-runs"],
        default="gpu-queue",
        help="gpu-queue: a poll takes new flow runs only while the GPU queue is shorter than "
        "the slots; flow-runs: only --flow-runs caps intake (gpu-queue)",
    )
    worker.add_argument(
        "--no-slot-broker",
        dest="slot_broker",
        action="store_false",
        help="no slot broker: GPU steps poll Prefect (for comparisons)",
    )
    worker.add_argument(
        "--metrics-socket",
        type=Path,
        help="serve the slot broker's Prometheus metrics on this Unix socket (none by default)",
    )
    worker.add_argument(
        "--metrics-port",
        type=_metrics_port,
        metavar="PORT",
        help="serve the worker's Prometheus metrics over HTTP on 0.0.0.0:PORT, path /metrics "
        "(1..65535; none by default)",
    )
    worker.add_argument(
        "--gpus",
        type=positive_int,
        help="this worker's GPUs where NVML finds none (memory placement splits its memory "
        "limit over them; default 1)",
    )
    worker.add_argument(
        "--gpu-memory",
        type=memory_size,
        help="each GPU's memory (80GiB) where NVML finds none; default: the memory limit "
        "<limit prefix>-memory:<WORKER_ID> split over --gpus",
    )
    add_launcher_arguments(worker)
    add_start_parser(commands)
    add_status_parser(commands)
    return parser


def _metrics_port(text: str) -> int:
    """``--metrics-port``: a TCP port, 1..65535."""
    try:
        return validate_metrics_port(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _memory_mix(text: str) -> MemoryMix:
    try:
        return MemoryMix.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _add_memory_mix(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory-mix",
        type=_memory_mix,
        metavar="SIZE:SHARE,...",
        help="GPU steps declare GPU memory in these proportions (8GiB:3,40GiB:1) and each "
        "worker's broker places them on its GPUs by memory (gpu_slot(memory=...))",
    )
    parser.add_argument(
        "--gpu-memory",
        type=memory_size,
        help="with --memory-mix: each GPU's memory (default: NVML's, else 80GiB)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command not in ("worker", "start"):
        # The worker and start drain on signals their own way. Here the first
        # Ctrl-C or SIGTERM stops everything started (KeyboardInterrupt), and a
        # second one makes that stop kill at once instead of waiting.
        signals = StopSignals()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signals)
    # With --json, stdout carries only the JSON object; progress goes to stderr.
    console = Console(stderr=bool(getattr(args, "json", False)))
    try:
        code = _run(args, console)
    except KeyboardInterrupt:
        # A local session has said how its stop went (and what, if anything, is left).
        console.print("[yellow]interrupted[/yellow]")
        code = 130
    sys.exit(code)


def _or_failure(console: Console, command: Callable[[], T]) -> T | None:
    """Run a local-mode command; a failed session is reported (reason, logs) as ``None``."""
    from prefect_gpu_workers.local.session import SessionFailed

    try:
        return command()
    except SessionFailed as exc:
        console.print(f"[red bold]stopped:[/red bold] {exc.reason}", highlight=False)
        if exc.left_running:
            console.print(f"[red]processes still running after cleanup: {exc.left_running}[/red]")
        else:
            console.print("every process started here has been stopped")
        console.print(f"logs: {exc.log_dir}", highlight=False)
        for log in exc.log_files():
            console.print(f"  {log}", highlight=False)
        return None


def add_launcher_arguments(parser: argparse.ArgumentParser) -> None:
    """``--launcher`` and ``--preload``: how a worker starts its flow runs' processes."""
    parser.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=DEFAULT_LAUNCHER,
        help="fork: each flow run is a fork of a warm process that has imported Prefect "
        "(milliseconds; falls back to a subprocess, saying why); subprocess: a new "
        f"interpreter per run, as Prefect does (default: {DEFAULT_LAUNCHER})",
    )
    parser.add_argument(
        "--preload",
        action="append",
        metavar="MODULE",
        help="a module the warm launcher imports before forking (repeatable; default: "
        "pgw_flows.pipeline where installed; it also learns what runs import)",
    )


def _run(args: argparse.Namespace, console: Console) -> int:
    if args.command == "start":
        return run_start(args, console)
    if args.command == "status":
        return run_status(args, console)
    if args.command == "worker":
        from prefect_gpu_workers.worker.entrypoint import run_worker

        try:
            # Runs the slot broker and the Prefect worker until stopped.
            run_worker(
                args.pool,
                args.flow_runs,
                args.limit_prefix,
                args.wait_timeout,
                args.with_healthcheck,
                args.intake,
                args.metrics_socket,
                args.slot_broker,
                args.drain_seconds,
                args.launcher,
                args.preload,
                args.gpus,
                args.gpu_memory,
                args.metrics_port,
            )
            return 0
        except (TimeoutError, WorkerIdentityError) as exc:
            print(f"prefect-gpu-workers worker: {exc}", file=sys.stderr)
        return 1
    if args.command == "demo":
        from prefect_gpu_workers.local.demo import DemoOptions, run_demo

        pipeline = replace(
            DEMO_PIPELINE,
            items=args.items,
            occupy=args.occupy,
            download_s=args.download_seconds,
            gpu_s=args.gpu_seconds,
            save_s=args.save_seconds,
            simulate=args.simulate,
        )
        options = DemoOptions(
            **_local_options(args),
            runs=args.runs,
            gpus=args.gpus,
            slots_per_gpu=args.slots_per_gpu,
            flow_runs_per_worker=args.flow_runs_per_worker,
            pipeline=pipeline,
            no_limit=args.no_limit,
            gpu_memory_fraction=args.gpu_memory_fraction,
            memory_mix=args.memory_mix,
            gpu_memory=args.gpu_memory,
        )
        code = _or_failure(console, lambda: run_demo(options, console))
        return 1 if code is None else code

    from prefect_gpu_workers.local.bench import BenchOptions, render, run_bench
    from prefect_gpu_workers.local.gpu_work import check_timeline_paths

    try:
        check_timeline_paths(args.timeline)
    except (ValueError, RuntimeError) as exc:
        console.print(f"[red]--timeline: {exc}[/red]")
        return 2

    if args.memory_mix is not None:
        return _run_memory_bench(args, console)
    bench_options = BenchOptions(
        **_local_options(args),
        runs=args.runs,
        gpu_seconds=args.gpu_seconds or 4.0,
        gpus=args.gpus,
        slots_per_gpu=args.slots_per_gpu,
        flow_level=not args.skip_flow_level,
        compare_launchers=not args.skip_launcher_comparison,
    )
    if args.faults:
        from prefect_gpu_workers.local.faults import render_faults, run_faults

        faults = run_faults(bench_options, console)
        if args.json:
            print(json.dumps(faults.as_json(), sort_keys=True))
        else:
            render_faults(faults, console)
        return 0 if faults.ok else 1
    result = _or_failure(console, lambda: run_bench(bench_options, console))
    if result is None:
        return 1
    if args.json:
        print(json.dumps(result.as_json(), sort_keys=True))
    else:
        render(result, console)
    ok = all(phase.runs_failed == 0 and phase.within_limits for phase in result.phases) and not any(
        result.slots_held_after.values()
    )
    return 0 if ok else 1


def _local_options(args: argparse.Namespace) -> dict[str, Any]:
    """What demo, bench and bench --memory-mix take alike from their common options."""
    return {
        "workers": args.workers,
        "worker_prefix": args.worker_prefix,
        "pool": args.pool,
        "limit_prefix": args.limit_prefix,
        "worker_query_seconds": args.poll_seconds,
        "workdir": args.workdir,
        "keep_workdir": args.keep_workdir,
        "timeout_s": args.timeout,
        "timelines": tuple(args.timeline),
        "database": args.database,
        "api_timeout_s": args.api_timeout,
        "launcher": args.launcher,
        "artifacts": args.artifacts,
    }


def _run_memory_bench(args: argparse.Namespace, console: Console) -> int:
    from prefect_gpu_workers.local.memory_bench import (
        MemoryBenchOptions,
        render_memory_bench,
        run_memory_bench,
    )

    options = MemoryBenchOptions(
        **_local_options(args),
        mix=args.memory_mix,
        gpus=args.gpus or 2,
        gpu_memory=args.gpu_memory or "80GiB",
        runs=args.runs,
        gpu_seconds=args.gpu_seconds or 8.0,
        licence_runs=args.licence_runs or 0,
    )
    result = _or_failure(console, lambda: run_memory_bench(options, console))
    if result is None:
        return 1
    if args.json:
        print(json.dumps(result.as_json(), sort_keys=True))
    else:
        render_memory_bench(result, console)
    p, f, lic = result.placement, result.fixed, result.licences
    ok = (
        p.completed == p.submitted
        and f.completed == f.submitted
        and p.use.over_gpu == p.use.over_memory_limit == 0
        and p.slot_over_admissions == f.slot_over_admissions == 0
        and not any(p.slots_held_after.values())
        and (lic is None or (lic.stalled == 0 and lic.peak_seats_held <= lic.seats))
    )
    return 0 if ok else 1


if __name__ == "__main__":
    main()
