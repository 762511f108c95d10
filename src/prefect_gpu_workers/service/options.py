"""Command-line options of ``start`` and ``status``, and what runs them.

Kept beside the service so that the top-level CLI only registers them.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from prefect_gpu_workers.argtypes import (
    limit_prefix,
    non_negative_float,
    positive_int,
)
from prefect_gpu_workers.commands import DEFAULT_LAUNCHER, LAUNCHERS
from prefect_gpu_workers.naming import DEFAULT_LIMIT_PREFIX, LIMIT_PREFIX_ENV, parse_memory_mib
from prefect_gpu_workers.service.sizing import parse_memory_size

DEFAULT_DRAIN_TIMEOUT_S = 300.0


def _argument(parse: Callable[[str], int]) -> Callable[[str], int]:
    """``parse`` as an argparse type: its ValueError becomes a usage error with its message."""

    @functools.wraps(parse)
    def parsed(text: str) -> int:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parsed


def add_start_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``start`` on the top-level CLI's subcommands."""
    start = commands.add_parser(
        "start",
        help="serve a work pool from this GPU machine: limits, workers, drain, cleanup",
        description="A long-running service against PREFECT_API_URL (PREFECT_API_KEY when set): "
        "detects the GPUs with NVML, creates this machine's GPU limit(s), runs the worker(s), "
        "restarts a crashed worker, and on SIGTERM or Ctrl-C drains, then deletes its limits.",
    )
    start.add_argument("--pool", required=True, help="process work pool (created if missing)")
    start.add_argument(
        "--worker-id",
        help="worker id; default: $WORKER_ID, else the host name made valid (said aloud)",
    )
    start.add_argument(
        "--per-gpu",
        action="store_true",
        help="one worker per GPU (MIG instance), named <id>-gpu<N>, pinned with "
        "CUDA_VISIBLE_DEVICES, each with its own limit",
    )
    sizing = start.add_mutually_exclusive_group()
    sizing.add_argument(
        "--memory-per-slot",
        type=_argument(parse_memory_size),
        metavar="SIZE",
        help="GPU memory one GPU step needs (20GiB): slots = floor(GPU memory / SIZE), at least 1",
    )
    sizing.add_argument(
        "--slots-per-gpu", type=positive_int, help="GPU steps one GPU takes at once (1)"
    )
    start.add_argument(
        "--gpus",
        type=positive_int,
        help="GPUs of this machine when NVML finds none (stated capacity)",
    )
    start.add_argument(
        "--gpu-memory",
        type=_argument(parse_memory_mib),
        metavar="SIZE",
        help="each GPU's memory (80GiB, 80Gi, 80GB; a bare number is GiB) when NVML finds none, "
        "with --gpus. Where the GPUs' memory is known (NVML's own, else this), each worker "
        "gets a second limit <prefix>-memory:<worker> of its GPUs' memory in whole GiB; "
        "without it, none. Where NVML finds GPUs their memory is used, and a SIZE that "
        "differs from it (in whole GiB) is refused",
    )
    start.add_argument(
        "--flow-runs", type=positive_int, help="flow runs per worker at once (3 per GPU slot)"
    )
    start.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=DEFAULT_DRAIN_TIMEOUT_S,
        metavar="S",
        help=f"seconds the workers get to drain on stop ({DEFAULT_DRAIN_TIMEOUT_S:.0f})",
    )
    start.add_argument(
        "--limit-prefix",
        type=limit_prefix,
        default=os.environ.get(LIMIT_PREFIX_ENV) or DEFAULT_LIMIT_PREFIX,
        help=f"limit names are <prefix>:<worker> (${LIMIT_PREFIX_ENV}, "
        f"else {DEFAULT_LIMIT_PREFIX})",
    )
    start.add_argument(
        "--log-dir", type=Path, help="one log file per worker here (default: this output)"
    )
    start.add_argument(
        "--launcher",
        choices=LAUNCHERS,
        default=DEFAULT_LAUNCHER,
        help="how the workers start flow runs: fork (from a warm launcher that has imported "
        f"Prefect) or subprocess (a new interpreter each) ({DEFAULT_LAUNCHER})",
    )


def add_status_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``status`` on the top-level CLI's subcommands."""
    status = commands.add_parser(
        "status",
        help="GPU limits, slots and GPU memory in use, and the workers behind them",
        description="One row per worker id with a limit <prefix>:<worker id>: slots in use of "
        "its size, GiB in use of its memory limit <prefix>-memory:<worker id> where it has one, "
        "and the Prefect worker of that name (pool, status, last heartbeat).",
    )
    status.add_argument("--pool", help="only this work pool's workers and their limits")
    status.add_argument("--json", action="store_true", help="print one JSON object")


def _api_url_missing() -> str | None:
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    return (
        "PREFECT_API_URL is not set: point it at your Prefect server "
        "(http://HOST:4200/api) or Prefect Cloud workspace (with PREFECT_API_KEY)"
    )


def run_start(args: argparse.Namespace, console: Console) -> int:
    """Run the service until it is stopped; the exit code."""
    from prefect_gpu_workers.service.run import EXIT_REFUSED, StartOptions, StartService

    def say(line: str) -> None:
        console.print(
            f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(line)}",
            highlight=False,
            soft_wrap=True,
        )

    missing = _api_url_missing()
    if missing:
        say(f"refused: {missing}")
        return EXIT_REFUSED
    options = StartOptions(
        pool=args.pool,
        worker_id=args.worker_id,
        per_gpu=args.per_gpu,
        memory_per_slot=args.memory_per_slot,
        slots_per_gpu=args.slots_per_gpu,
        gpus=args.gpus,
        gpu_memory_mib=args.gpu_memory,
        flow_runs=args.flow_runs,
        drain_timeout_s=args.drain_timeout,
        limit_prefix=args.limit_prefix,
        log_dir=args.log_dir,
        launcher=args.launcher,
    )
    return StartService(options, say).run()


def run_status(args: argparse.Namespace, console: Console) -> int:
    """Print the status table (or JSON); the exit code."""
    from prefect.client.orchestration import get_client

    from prefect_gpu_workers.service.status import read_status, render_status, status_json

    missing = _api_url_missing()
    if missing:
        console.print(f"[red]{escape(missing)}[/red]")
        return 2
    with get_client(sync_client=True) as client:
        status = read_status(client, args.pool)
    if args.json:
        print(json.dumps(status_json(status), sort_keys=True))
    else:
        console.print(render_status(status))
    return 0
