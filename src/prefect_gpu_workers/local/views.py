"""What local mode shows a person: live progress and the report tables (rich)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType

from prefect.client.schemas.objects import FlowRun
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from prefect_gpu_workers.local.gpu_work import step_durations, step_errors
from prefect_gpu_workers.local.plan import BatchCounts, WorkerPlan, count_runs
from prefect_gpu_workers.local.process_memory import MemoryFigures
from prefect_gpu_workers.local.watch import LatencySummary
from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.report import MemoryUse, PhaseMetrics
from prefect_gpu_workers.telemetry import TelemetrySummary

# The progress line says the API is silent once it has been for this long
# (a healthy API answers a poll within a second or two, even on a busy machine).
API_SILENCE_NOTICE_S = 10.0


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _counts_text(counts: BatchCounts) -> str:
    return (
        f"{counts.completed}/{counts.total} done, {counts.running} running, "
        f"{counts.waiting} waiting, {counts.failed} failed"
    )


def _slots_text(slots: Mapping[str, int], plans: Sequence[WorkerPlan]) -> str:
    return "  ".join(f"{p.limit_name} {slots.get(p.limit_name, 0)}/{p.slots}" for p in plans)


def api_silence_text(silent_for_s: float) -> str:
    """What the progress line adds while the API is silent ('' while it answers).

    Example:
        >>> api_silence_text(23.4)
        'Prefect API not answering for 23 s'
    """
    if silent_for_s < API_SILENCE_NOTICE_S:
        return ""
    return f"Prefect API not answering for {silent_for_s:.0f} s"


class ProgressView:
    """Live line of run counts and GPU slots in use; plain lines when not on a terminal.

    Plain lines come every ``plain_every_s``, and at once when the API falls
    silent or answers again.
    """

    def __init__(
        self,
        console: Console,
        label: str,
        plans: Sequence[WorkerPlan],
        plain_every_s: float = 10.0,
    ) -> None:
        self.console = console
        self.label = label
        self.plans = plans
        self.plain_every_s = plain_every_s
        self._live: Live | None = None
        self._last_plain = -math.inf  # the first line is always printed
        self._last_text = ""
        self._last_printed = ""
        self._api_silent = False

    def __enter__(self) -> ProgressView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
        elif self._last_text and self._last_text != self._last_printed:
            # Plain mode prints every few seconds; make sure the final state shows.
            self.console.print(self._last_text, soft_wrap=True, markup=False, highlight=False)

    def __call__(
        self, runs: list[FlowRun], slots: dict[str, int], elapsed: float, api_silent_s: float = 0.0
    ) -> None:
        counts = count_runs(runs)
        silence = api_silence_text(api_silent_s)
        text = (
            f"{self.label} {elapsed:4.0f}s:  {_counts_text(counts)}  "
            f"GPU slots in use: {_slots_text(slots, self.plans)}"
        )
        if silence:
            text = f"{text}  [{silence}; figures as of its last answer]"
        self._last_text = text
        changed = bool(silence) != self._api_silent
        self._api_silent = bool(silence)
        if self._live is not None:
            self._live.update(Text(text, style="bold red" if silence else ""))
            return
        now = time.monotonic()
        if changed or now - self._last_plain >= self.plain_every_s:
            self._last_plain = now
            self._last_printed = text
            self.console.print(text, soft_wrap=True, markup=False, highlight=False)


def plain_printer(console: Console) -> Callable[[str], None]:
    """Print a line as it is: no markup, no highlighting (paths and pids stay plain)."""

    def say(line: str) -> None:
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    return say


def plan_table(plans: Sequence[WorkerPlan], pool: str) -> Table:
    table = Table(title=f"Local workers in pool {pool!r}")
    table.add_column("worker (WORKER_ID)")
    table.add_column("GPU limit")
    table.add_column("slots", justify="right")
    table.add_column("flow runs at once (--flow-runs)", justify="right")
    for plan in plans:
        table.add_row(plan.worker_id, plan.limit_name, str(plan.slots), str(plan.flow_runs))
    return table


def latency_text(latency: LatencySummary) -> str:
    """``p50 / p95 (N requests)`` of API request durations."""
    return f"{_seconds(latency.p50_s)} / {_seconds(latency.p95_s)} ({latency.requests} requests)"


def metrics_table(
    title: str, metrics: PhaseMetrics, api_latency: LatencySummary | None = None
) -> Table:
    table = Table(title=title, show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("runs finished / failed", f"{metrics.runs_finished} / {metrics.runs_failed}")
    table.add_row("time to finish (submit -> last run end)", _seconds(metrics.makespan_s))
    table.add_row("throughput", f"{metrics.runs_per_s:.3f} runs/s")
    table.add_row("GPU steps recorded", str(metrics.gpu_steps))
    table.add_row("GPU-slot utilisation", _percent(metrics.slot_utilization))
    table.add_row(
        "slot idle after a release while a step waited, p50 / p95",
        f"{_seconds(metrics.gcl_handoff_gap_p50_s)} / {_seconds(metrics.gcl_handoff_gap_p95_s)}",
    )
    table.add_row("wait for a GPU slot p50", _seconds(metrics.gpu_wait_p50_s))
    table.add_row(START_UP_ROW, start_up_text(metrics))
    table.add_row(START_CPU_ROW, _cpu(metrics.start_cpu_mean_s))
    if api_latency is not None:
        table.add_row("Prefect API latency (progress polls) p50 / p95", latency_text(api_latency))
    return table


START_UP_ROW = "flow-run start (worker starts it -> first task), p50 / p95"
START_CPU_ROW = "CPU-seconds per flow-run start (mean)"


def describe_memory(figures: MemoryFigures) -> str:
    """One line: what the launchers held and what each flow-run process added."""
    if figures.runs_seen == 0 and figures.launcher_rss_mib is None:
        return "process memory: no process seen"
    launcher = (
        f"launcher resident {figures.launcher_rss_mib:.0f} MiB; "
        if figures.launcher_rss_mib is not None
        else "no launcher; "
    )
    return (
        f"process memory: {launcher}flow-run processes' own memory (USS) p50 "
        f"{_mib(figures.run_uss_p50_mib)} / max {_mib(figures.run_uss_max_mib)}, resident "
        f"p50 {_mib(figures.run_rss_p50_mib)} ({figures.runs_seen} runs)"
    )


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"


def start_up_text(metrics: PhaseMetrics) -> str:
    return f"{_gap(metrics.start_up_p50_s)} / {_gap(metrics.start_up_p95_s)}"


def _cpu(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} CPU-s"


def worker_table(metrics: PhaseMetrics) -> Table:
    table = Table(title="Per worker")
    table.add_column("worker")
    table.add_column("peak GPU steps at once", justify="right")
    table.add_column("limit", justify="right")
    table.add_column("peak download/save at once", justify="right")
    table.add_column("within limit")
    for worker, limit in sorted(metrics.limit_per_worker.items()):
        peak = metrics.max_gpu_overlap_per_worker.get(worker, 0)
        table.add_row(
            worker,
            str(peak),
            str(limit),
            str(metrics.max_other_overlap_per_worker.get(worker, 0)),
            "yes" if peak <= limit else "[red]NO[/red]",
        )
    return table


def bench_table(
    phases: Sequence[tuple[str, PhaseMetrics]],
    ratio: float | None,
    api_latency: Sequence[LatencySummary] | None = None,
) -> Table:
    """One column per phase; the caption gives task-level (first) over flow-level (last).

    ``api_latency``, one per phase, adds the progress polls' Prefect API latency.
    """
    table = Table(title="GPU limiting compared (stage work simulated)")
    table.add_column("measure")
    for label, _ in phases:
        table.add_column(label, justify="right")
    metrics = [m for _, m in phases]
    rows: list[list[str]] = [
        ["runs finished / failed", *(f"{m.runs_finished} / {m.runs_failed}" for m in metrics)],
        ["time to finish", *(_seconds(m.makespan_s) for m in metrics)],
        ["throughput (runs/s)", *(f"{m.runs_per_s:.3f}" for m in metrics)],
        ["GPU-slot utilisation", *(_percent(m.slot_utilization) for m in metrics)],
        ["utilisation per worker", *(_per_worker(m) for m in metrics)],
        [
            "slot idle after a release while a step waited, p50 / p95",
            *(
                f"{_gap(m.gcl_handoff_gap_p50_s)} / {_gap(m.gcl_handoff_gap_p95_s)}"
                for m in metrics
            ),
        ],
        [
            "release -> next GPU step while runs were queued, p50 / p95",
            *(
                f"{_gap(m.backlog_handoff_gap_p50_s)} / {_gap(m.backlog_handoff_gap_p95_s)}"
                for m in metrics
            ),
        ],
        ["peak GPU steps at once per worker", *(_peaks(m) for m in metrics)],
        [START_UP_ROW, *(start_up_text(m) for m in metrics)],
        [START_CPU_ROW, *(_cpu(m.start_cpu_mean_s) for m in metrics)],
    ]
    if api_latency is not None:
        rows.append(
            [
                "Prefect API latency (progress polls) p50 / p95",
                *(latency_text(latency) for latency in api_latency),
            ]
        )
    for row in rows:
        table.add_row(*row)
    table.caption = "throughput ratio task-level / flow-level: " + (
        "-" if ratio is None else f"{ratio:.2f}x"
    )
    return table


def _gap(value: float | None) -> str:
    """Seconds, with milliseconds visible: the broker's gaps are a few ms."""
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _per_worker(metrics: PhaseMetrics) -> str:
    return ", ".join(
        f"{worker} {_percent(value)}"
        for worker, value in sorted(metrics.slot_utilization_per_worker.items())
    )


def _peaks(metrics: PhaseMetrics) -> str:
    return ", ".join(
        f"{worker} {metrics.max_gpu_overlap_per_worker.get(worker, 0)}/{limit}"
        for worker, limit in sorted(metrics.limit_per_worker.items())
    )


def no_limit_table(
    records: Sequence[StageRecord],
    metrics: PhaseMetrics,
    telemetry: TelemetrySummary | None,
    batches: int | None,
) -> Table:
    """What the GPU steps did without the limit: overlap, failures, duration, memory."""
    table = Table(title="Without the limit (demo --no-limit)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row(
        "peak GPU steps at once per worker / the limit it would have had", _peaks(metrics)
    )
    errors = step_errors(records)
    failed = sum(errors.values())
    steps = len([r for r in records if r.stage == "gpu"])
    table.add_row(
        "GPU steps failed",
        f"{failed} of {steps}"
        + (f" ({', '.join(f'{n} {kind}' for kind, n in errors.most_common())})" if errors else ""),
    )
    durations = step_durations(records)
    table.add_row(
        "GPU step that finished, p50 / max",
        f"{_seconds(durations.p50_s)} / {_seconds(durations.max_s)}"
        + (f" for {batches} batches each" if batches else ""),
    )
    if telemetry is not None:
        table.add_row(
            "GPU memory used, peak (NVML)",
            f"{telemetry.peak_memory_used_mib:.0f} of {telemetry.memory_total_mib:.0f} MiB "
            f"({telemetry.peak_memory_used_mib / telemetry.memory_total_mib:.0%})",
        )
    return table


def describe_memory_use(use: MemoryUse) -> str:
    """One line on GPU steps placed by memory: how full the GPUs were kept, and any fault."""
    utilisation = "-" if use.utilisation is None else f"{use.utilisation:.2f}"
    line = (
        f"GPU memory declared and held: {use.declared_gib_s:.0f} GiB-s of "
        f"{use.capacity_gib} GiB x {use.span_s:.1f} s = {utilisation} in use; "
        f"{use.over_gpu} placement(s) beyond a GPU's memory, "
        f"{use.over_memory_limit} past a memory limit"
    )
    if use.over_declared:
        line += f"; {use.over_declared} step(s) used more than they declared (see their logs)"
    return line
