"""Timeline pictures of a batch of runs: PNG (matplotlib) or self-contained HTML (plotly).

One column per phase (the demo has one, the bench two, on one time scale).
Each column shows, top to bottom:

- one row per flow-run slot of each worker (runs assigned to rows by interval
  partitioning, so two runs on one row never overlap) with a bar per stage:
  the flow run's start-up (the worker starting its process -> its first
  task), download, preparing the GPU step on the CPU, waiting for a GPU slot, GPU
  step, save; failed steps hatched;
- GPU slots held per worker over time against its limit (dashed);
- GPU utilisation and memory per GPU, when telemetry was sampled.

The layout (rows, bars, step functions) is computed by pure functions; the two
renderers only draw it. matplotlib and plotly come with the ``viz`` extra and
are imported only when a picture is drawn.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.telemetry import GpuSample

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BarKind = Literal["start-up", "download", "prepare", "wait", "gpu", "save"]
BAR_KINDS: tuple[BarKind, ...] = ("start-up", "download", "prepare", "wait", "gpu", "save")
BAR_LABELS: dict[BarKind, str] = {
    "start-up": "flow-run start-up (process -> first task)",
    "download": "download",
    "prepare": "preparing on the CPU (torch, model)",
    "wait": "waiting for a GPU slot",
    "gpu": "GPU step",
    "save": "save",
}
COLOURS: dict[BarKind, str] = {
    "start-up": "#b3b3b3",
    "download": "#4c72b0",
    "prepare": "#a6c8e8",
    "wait": "#d0d0d0",
    "gpu": "#dd8452",
    "save": "#55a868",
}
FAILED_COLOUR = "#c44e52"
WORKER_COLOURS = ("#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
VIZ_HINT = "install the viz extra: pip install 'prefect-gpu-workers[viz]'"

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class TimelinePhase:
    """What one batch left behind: its records, limits and (optional) GPU samples.

    ``started_at`` is time zero (e.g. when the runs were submitted; default:
    the earliest record); ``ended_at`` stretches the axis past the last record.
    """

    label: str
    records: Sequence[StageRecord]
    limits: Mapping[str, int]
    samples: Sequence[GpuSample] = ()
    started_at: float | None = None
    ended_at: float | None = None
    # Each GPU's memory (GiB) where steps were placed by memory: the dashed line
    # of the declared-memory panel.
    gpu_memory_gib: int | None = None


@dataclass(frozen=True)
class Bar:
    row: int
    kind: BarKind
    run_id: str
    worker_id: str
    start: float  # seconds since the phase's time zero
    end: float
    failed: bool = False
    peak_memory_mib: float | None = None


@dataclass(frozen=True)
class PhaseLayout:
    label: str
    rows: list[str]  # row labels, row 0 at the top
    worker_rows: dict[str, range]
    bars: list[Bar]
    # Per worker: (time, slots held) steps, from time zero to the end.
    occupancy: dict[str, list[tuple[float, int]]]
    limits: dict[str, int]
    # Per GPU: (time, utilisation %, memory used %).
    gpu_series: dict[int, list[tuple[float, float, float]]] = field(default_factory=dict)
    duration: float = 0.0
    # Per placed GPU ("local-1 cuda:0"): (time, declared GiB held) steps.
    declared_memory: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    gpu_memory_gib: int | None = None


def assign_rows(intervals: Sequence[tuple[K, float, float]]) -> dict[K, int]:
    """Interval partitioning: each ``(key, start, end)`` to the lowest row free at ``start``.

    A row is free once its last interval has ended (half-open: ending at t
    frees it for one starting at t). Taken in order of start, this uses as
    many rows as the most intervals that overlap at one instant, and the same
    input always gives the same rows.

    Example:
        >>> assign_rows([("a", 0, 2), ("b", 1, 3), ("c", 2, 4)])
        {'a': 0, 'b': 1, 'c': 0}
    """
    row_free_at: list[float] = []
    assigned: dict[K, int] = {}
    for key, start, end in sorted(intervals, key=lambda item: (item[1], item[2], str(item[0]))):
        for row, free_at in enumerate(row_free_at):
            if free_at <= start:
                row_free_at[row] = end
                assigned[key] = row
                break
        else:
            assigned[key] = len(row_free_at)
            row_free_at.append(end)
    return assigned


def occupancy_steps(
    records: Sequence[StageRecord],
    until: float,
    weight: Callable[[StageRecord], int] = lambda record: record.occupy,
) -> list[tuple[float, int]]:
    """Slots held by GPU steps (weighted by ``occupy``, or ``weight``) as steps from 0
    to ``until``.

    Times are those of the records (already shifted by the caller). Releases
    sort before acquires at one instant, as in :func:`report.peak_overlap`.
    """
    events = sorted(
        [(r.start, weight(r)) for r in records if r.stage == "gpu"]
        + [(r.end, -weight(r)) for r in records if r.stage == "gpu"]
    )
    steps = [(0.0, 0)]
    held = 0
    for moment, delta in events:
        held += delta
        if steps[-1][0] == moment:
            steps[-1] = (moment, held)
        else:
            steps.append((moment, held))
    steps.append((max(until, steps[-1][0]), held))
    return steps


def _first_moment(record: StageRecord) -> float:
    first = min(record.requested, record.start) - (record.prepare_s or 0.0)
    return first if record.launched is None else min(first, record.launched)


def _origin(phase: TimelinePhase) -> float:
    if phase.started_at is not None:
        return phase.started_at
    times = [_first_moment(r) for r in phase.records]
    return min(times) if times else 0.0


def layout_phase(phase: TimelinePhase) -> PhaseLayout:
    """Rows, bars, occupancy and GPU series of one phase, times relative to its time zero."""
    origin = _origin(phase)
    by_run: dict[str, list[StageRecord]] = defaultdict(list)
    for record in phase.records:
        by_run[record.run_id].append(record)
    runs_of_worker: dict[str, list[tuple[str, float, float]]] = defaultdict(list)
    for run_id, stages in by_run.items():
        worker = stages[0].worker_id
        start = min(_first_moment(r) for r in stages)
        runs_of_worker[worker].append((run_id, start, max(r.end for r in stages)))
    workers = sorted(set(phase.limits) | set(runs_of_worker))
    rows: list[str] = []
    worker_rows: dict[str, range] = {}
    row_of_run: dict[str, int] = {}
    for worker in workers:
        assigned = assign_rows(runs_of_worker.get(worker, []))
        first = len(rows)
        count = max(assigned.values(), default=-1) + 1
        rows.extend(f"{worker} #{index + 1}" for index in range(count))
        worker_rows[worker] = range(first, first + count)
        row_of_run.update({run_id: first + row for run_id, row in assigned.items()})

    bars: list[Bar] = []
    for record in phase.records:
        row = row_of_run[record.run_id]
        failed = record.error is not None
        if record.launched is not None and record.launched < record.start:
            bars.append(
                Bar(row, "start-up", record.run_id, record.worker_id,
                    record.launched - origin, record.start - origin)
            )  # fmt: skip
        if record.stage == "gpu" and record.prepare_s:
            bars.append(
                Bar(row, "prepare", record.run_id, record.worker_id,
                    record.requested - record.prepare_s - origin, record.requested - origin)
            )  # fmt: skip
        if record.stage == "gpu" and record.start > record.requested:
            bars.append(
                Bar(row, "wait", record.run_id, record.worker_id,
                    record.requested - origin, record.start - origin)
            )  # fmt: skip
        bars.append(
            Bar(row, record.stage, record.run_id, record.worker_id, record.start - origin,
                record.end - origin, failed, record.peak_memory_mib)
        )  # fmt: skip

    ends = [r.end for r in phase.records]
    if phase.ended_at is not None:
        ends.append(phase.ended_at)
    duration = max([0.0, *(end - origin for end in ends)])
    shifted = [_shift(r, origin) for r in phase.records]
    occupancy = {
        worker: occupancy_steps([r for r in shifted if r.worker_id == worker], duration)
        for worker in workers
    }
    placed: dict[str, list[StageRecord]] = defaultdict(list)
    for record in shifted:
        if record.placed_on is not None and record.memory_gib is not None:
            placed[f"{record.worker_id} {record.placed_on}"].append(record)
    declared = {
        gpu: occupancy_steps(steps, duration, lambda record: record.memory_gib or 0)
        for gpu, steps in sorted(placed.items())
    }
    series: dict[int, list[tuple[float, float, float]]] = defaultdict(list)
    for sample in sorted(phase.samples, key=lambda s: (s.gpu, s.time)):
        moment = sample.time - origin
        if 0 <= moment <= duration and sample.memory_total_mib > 0:
            memory_pct = 100 * sample.memory_used_mib / sample.memory_total_mib
            series[sample.gpu].append((moment, sample.utilization_pct, memory_pct))
    return PhaseLayout(
        label=phase.label,
        rows=rows,
        worker_rows=worker_rows,
        bars=bars,
        occupancy=occupancy,
        limits={worker: phase.limits.get(worker, 0) for worker in workers},
        gpu_series=dict(series),
        duration=duration,
        declared_memory=declared,
        gpu_memory_gib=phase.gpu_memory_gib,
    )


def _shift(record: StageRecord, origin: float) -> StageRecord:
    return replace(
        record,
        requested=record.requested - origin,
        start=record.start - origin,
        end=record.end - origin,
        launched=None if record.launched is None else record.launched - origin,
    )


def _runs_count(layout: PhaseLayout) -> int:
    return len({bar.run_id for bar in layout.bars})


def _column_title(layout: PhaseLayout) -> str:
    steps = sum(1 for bar in layout.bars if bar.kind == "gpu")
    failed = sum(1 for bar in layout.bars if bar.kind == "gpu" and bar.failed)
    text = f"{layout.label}: {_runs_count(layout)} runs, {steps} GPU steps"
    return text + (f" ({failed} failed)" if failed else "")


# ---------------------------------------------------------------- PNG


def build_png_figure(layouts: Sequence[PhaseLayout], title: str = "", subtitle: str = "") -> Figure:
    """A matplotlib figure of ``layouts`` side by side (no pyplot: no global state)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise RuntimeError(f"PNG timelines need matplotlib: {VIZ_HINT}") from exc

    with_gpu = any(layout.gpu_series for layout in layouts)
    with_memory = any(layout.declared_memory for layout in layouts)
    most_rows = max([1, *(len(layout.rows) for layout in layouts)])
    heights = (
        [max(2.2, 0.24 * most_rows + 0.8), 1.7]
        + ([1.7] if with_memory else [])
        + ([1.7] if with_gpu else [])
    )
    width = 7.5 * len(layouts) + 2.5
    fig = Figure(figsize=(width, sum(heights) + 1.6), layout="constrained")
    axes = fig.subplots(
        len(heights), len(layouts), squeeze=False, sharex=True, height_ratios=heights
    )
    span = max([1.0, *(layout.duration for layout in layouts)])
    peak_slots = max(
        [1]
        + [max(layout.limits.values(), default=1) for layout in layouts]
        + [held for layout in layouts for steps in layout.occupancy.values() for _, held in steps]
    )
    for column, layout in enumerate(layouts):
        _draw_runs(axes[0][column], layout, first_column=column == 0)
        _draw_occupancy(axes[1][column], layout, peak_slots, first_column=column == 0)
        if with_memory:
            _draw_declared_memory(axes[2][column], layout, first_column=column == 0)
        if with_gpu:
            _draw_gpu(axes[-1][column], layout, first_column=column == 0)
        axes[-1][column].set_xlabel("seconds since the runs were submitted")
        axes[0][column].set_xlim(0, span * 1.02)
    handles = [Patch(facecolor=COLOURS[kind], label=BAR_LABELS[kind]) for kind in BAR_KINDS]
    handles.append(
        Patch(facecolor="white", edgecolor=FAILED_COLOUR, hatch="xxx", label="step failed")
    )
    # One column of panels is narrow: its legend takes two lines.
    columns = len(handles) if len(layouts) > 1 else math.ceil(len(handles) / 2)
    fig.legend(handles=handles, loc="outside lower center", ncols=columns, frameon=False)
    if title or subtitle:
        fig.suptitle(f"{title}\n{subtitle}".strip(), fontsize=12)
    return fig


def _draw_runs(ax: Any, layout: PhaseLayout, first_column: bool) -> None:
    for bar in layout.bars:
        failed = bar.failed and bar.kind != "wait"
        (patch,) = ax.barh(
            bar.row,
            bar.end - bar.start,
            left=bar.start,
            height=0.35 if bar.kind in ("start-up", "wait", "prepare") else 0.7,
            color="white" if failed else COLOURS[bar.kind],
            edgecolor=FAILED_COLOUR if failed else "none",
            hatch="xxx" if failed else None,
            linewidth=0.8,
        ).patches
        patch.set_gid(f"{bar.kind}:{bar.run_id}")
    ax.set_ylim(len(layout.rows) - 0.5, -0.5)  # row 0 at the top
    ax.set_yticks(range(len(layout.rows)))
    ax.set_yticklabels(layout.rows, fontsize=8 if len(layout.rows) <= 24 else 6)
    for worker_range in list(layout.worker_rows.values())[1:]:
        ax.axhline(worker_range.start - 0.5, color="#555555", linewidth=0.8)
    ax.set_title(_column_title(layout), fontsize=10)
    if first_column:
        ax.set_ylabel("flow-run slot of a worker")
    ax.grid(axis="x", color="#eeeeee")
    ax.set_axisbelow(True)


def _draw_occupancy(ax: Any, layout: PhaseLayout, peak: int, first_column: bool) -> None:
    for index, (worker, steps) in enumerate(sorted(layout.occupancy.items())):
        colour = WORKER_COLOURS[index % len(WORKER_COLOURS)]
        ax.step(
            [t for t, _ in steps],
            [held for _, held in steps],
            where="post",
            color=colour,
            linewidth=1.6,
            label=f"{worker} (limit {layout.limits.get(worker, 0)})",
        )
    for limit in sorted(set(layout.limits.values())):
        ax.axhline(limit, color="black", linestyle="--", linewidth=1.0)
    # Head room above the highest line for the legend.
    ax.set_ylim(0, peak + 1.2)
    ax.yaxis.get_major_locator().set_params(integer=True)
    if first_column:
        ax.set_ylabel("GPU slots held\n(dashed: limit)")
    ax.legend(loc="upper right", fontsize=8, frameon=False, ncols=min(3, len(layout.occupancy)))
    ax.grid(color="#eeeeee")


def _draw_declared_memory(ax: Any, layout: PhaseLayout, first_column: bool) -> None:
    for index, (gpu, steps) in enumerate(layout.declared_memory.items()):
        ax.step(
            [t for t, _ in steps], [gib for _, gib in steps], where="post",
            color=WORKER_COLOURS[index % len(WORKER_COLOURS)], linewidth=1.4, label=gpu,
        )  # fmt: skip
    if layout.gpu_memory_gib is not None:
        ax.axhline(layout.gpu_memory_gib, color="black", linestyle="--", linewidth=1.0)
        ax.set_ylim(0, layout.gpu_memory_gib * 1.25)
    if first_column:
        ax.set_ylabel("declared GPU memory\nheld, GiB (dashed: a GPU)")
    if layout.declared_memory:
        ax.legend(loc="upper right", fontsize=8, frameon=False, ncols=2)
    else:
        ax.text(0.5, 0.5, "not placed by memory", transform=ax.transAxes, ha="center",
                color="#777777")  # fmt: skip
    ax.grid(color="#eeeeee")


def _draw_gpu(ax: Any, layout: PhaseLayout, first_column: bool) -> None:
    for gpu, points in sorted(layout.gpu_series.items()):
        times = [t for t, _, _ in points]
        ax.plot(times, [u for _, u, _ in points], linewidth=1.2, label=f"GPU {gpu} utilisation")
        ax.plot(
            times, [m for _, _, m in points], linewidth=1.0, linestyle=":",
            label=f"GPU {gpu} memory used",
        )  # fmt: skip
    ax.set_ylim(0, 105)
    if first_column:
        ax.set_ylabel("GPU (NVML) %")
    if layout.gpu_series:
        ax.legend(loc="lower right", fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "not sampled", transform=ax.transAxes, ha="center", color="#777777")
    ax.grid(color="#eeeeee")


# ---------------------------------------------------------------- HTML


def build_html_figure(layouts: Sequence[PhaseLayout], title: str = "", subtitle: str = "") -> Any:
    """A plotly figure of ``layouts`` side by side, bars with hover details."""
    try:
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots
    except ImportError as exc:
        raise RuntimeError(f"HTML timelines need plotly: {VIZ_HINT}") from exc

    with_gpu = any(layout.gpu_series for layout in layouts)
    with_memory = any(layout.declared_memory for layout in layouts)
    most_rows = max([1, *(len(layout.rows) for layout in layouts)])
    runs_height = max(220, 22 * most_rows + 60)
    heights = [runs_height, 180] + ([180] if with_memory else []) + ([180] if with_gpu else [])
    fig = make_subplots(
        rows=len(heights),
        cols=len(layouts),
        shared_xaxes="all",
        row_heights=[h / sum(heights) for h in heights],
        vertical_spacing=0.06,
        horizontal_spacing=0.08,
        subplot_titles=[
            _column_title(layout) if row == 0 else ""
            for row in range(len(heights))
            for layout in layouts
        ],
    )
    for column, layout in enumerate(layouts, start=1):
        first = column == 1
        for kind in BAR_KINDS:
            bars = [bar for bar in layout.bars if bar.kind == kind]
            if not bars:
                continue
            fig.add_trace(
                go.Bar(
                    orientation="h",
                    name=BAR_LABELS[kind],
                    legendgroup=kind,
                    showlegend=first,
                    base=[bar.start for bar in bars],
                    x=[bar.end - bar.start for bar in bars],
                    y=[layout.rows[bar.row] for bar in bars],
                    width=0.35 if kind in ("start-up", "wait", "prepare") else 0.7,
                    marker={
                        "color": [FAILED_COLOUR if bar.failed else COLOURS[kind] for bar in bars]
                    },
                    hovertext=[_hover(bar) for bar in bars],
                    hoverinfo="text",
                ),
                row=1,
                col=column,
            )
        fig.update_yaxes(
            categoryorder="array",
            categoryarray=list(reversed(layout.rows)),
            row=1,
            col=column,
            title_text="flow-run slot of a worker" if first else None,
        )
        for index, (worker, steps) in enumerate(sorted(layout.occupancy.items())):
            fig.add_trace(
                go.Scatter(
                    x=[t for t, _ in steps],
                    y=[held for _, held in steps],
                    line={"shape": "hv", "color": WORKER_COLOURS[index % len(WORKER_COLOURS)]},
                    name=f"{worker} slots held (limit {layout.limits.get(worker, 0)})",
                    legendgroup=f"occupancy-{worker}",
                    showlegend=first,
                ),
                row=2,
                col=column,
            )
        for limit in sorted(set(layout.limits.values())):
            fig.add_hline(y=limit, line_dash="dash", line_color="black", row=2, col=column)
        fig.update_yaxes(
            title_text="GPU slots held (dashed: limit)" if first else None, row=2, col=column
        )
        if with_memory:
            for placed, steps in layout.declared_memory.items():
                fig.add_trace(
                    go.Scatter(x=[t for t, _ in steps], y=[gib for _, gib in steps],
                               line={"shape": "hv"}, name=f"{placed} declared GiB held",
                               legendgroup=f"declared-{placed}", showlegend=first),
                    row=3, col=column,
                )  # fmt: skip
            if layout.gpu_memory_gib is not None:
                fig.add_hline(y=layout.gpu_memory_gib, line_dash="dash", line_color="black",
                              row=3, col=column)  # fmt: skip
            fig.update_yaxes(
                title_text="declared GPU memory held, GiB" if first else None, row=3, col=column
            )
        if with_gpu:
            gpu_row = len(heights)
            for gpu, points in sorted(layout.gpu_series.items()):
                times = [t for t, _, _ in points]
                fig.add_trace(
                    go.Scatter(x=times, y=[u for _, u, _ in points],
                               name=f"GPU {gpu} utilisation %", legendgroup=f"util-{gpu}",
                               showlegend=first),
                    row=gpu_row, col=column,
                )  # fmt: skip
                fig.add_trace(
                    go.Scatter(x=times, y=[m for _, _, m in points], line={"dash": "dot"},
                               name=f"GPU {gpu} memory used %", legendgroup=f"memory-{gpu}",
                               showlegend=first),
                    row=gpu_row, col=column,
                )  # fmt: skip
            fig.update_yaxes(
                range=[0, 105], title_text="GPU (NVML) %" if first else None, row=gpu_row,
                col=column,
            )  # fmt: skip
        fig.update_xaxes(title_text="seconds since the runs were submitted", row=len(heights),
                         col=column)  # fmt: skip
    fig.update_layout(
        title={"text": f"{title}<br><sup>{subtitle}</sup>" if subtitle else title},
        barmode="overlay",
        height=sum(heights) + 160,
        width=None,
        template="plotly_white",
        legend={"orientation": "h", "y": -0.08},
    )
    return fig


def _hover(bar: Bar) -> str:
    text = (
        f"{BAR_LABELS[bar.kind]}<br>run {bar.run_id}<br>worker {bar.worker_id}<br>"
        f"{bar.start:.2f} s -> {bar.end:.2f} s ({bar.end - bar.start:.2f} s)"
    )
    if bar.peak_memory_mib is not None:
        text += f"<br>peak GPU memory {bar.peak_memory_mib:.0f} MiB"
    if bar.failed:
        text += "<br>FAILED"
    return text


# ---------------------------------------------------------------- files


def write_timeline(path: Path, *phases: TimelinePhase, title: str = "", subtitle: str = "") -> Path:
    """Draw ``phases`` side by side into ``path``: ``.png`` or ``.html`` (self-contained).

    Raises:
        ValueError: for another extension or no phase.
        RuntimeError: when the plotting library is missing (the ``viz`` extra).
    """
    if not phases:
        raise ValueError("a timeline needs at least one phase")
    suffix = path.suffix.lower()
    if suffix not in (".png", ".html", ".htm"):
        raise ValueError(f"timeline file must end in .png or .html, got {path.name!r}")
    layouts = [layout_phase(phase) for phase in phases]
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".png":
        build_png_figure(layouts, title, subtitle).savefig(path, dpi=110)
    else:
        figure = build_html_figure(layouts, title, subtitle)
        # include_plotlyjs=True embeds plotly.js: the file opens offline.
        figure.write_html(path, include_plotlyjs=True, full_html=True)
    return path


# ---------------------------------------------------------------- markdown (Prefect artifacts)

# One character per bar kind in the text chart. Painted in this order, so the
# GPU step is drawn over anything it touches and a short one still shows.
CHART_CHARS: dict[BarKind, str] = {
    "start-up": ":",
    "download": "d",
    "prepare": "p",
    "wait": ".",
    "save": "s",
    "gpu": "G",
}
FAILED_CHAR = "X"
CHART_WIDTH = 72


def chart_lines(layout: PhaseLayout, width: int = CHART_WIDTH) -> list[str]:
    """The phase as fixed-width text: a line per row of runs, then slots held per worker.

    Each column covers ``duration / width`` seconds. A bar paints at least
    the column it starts in, so a step shorter than a column is not lost. A
    worker's slot line gives the most slots held during each column (a digit,
    ``+`` above 9), ``|`` after it its limit.

    Example:
        >>> steps = [StageRecord("r", "w", "gpu", 0.0, 1.0, 3.0, 1, "gpu:w")]
        >>> chart_lines(layout_phase(TimelinePhase("x", steps, {"w": 1}, started_at=0.0)), 6)
        ['w #1        ..GGGG', 'w slots     001111 |1']
    """
    if width < 1:
        raise ValueError(f"width must be at least 1, got {width}")
    span = layout.duration if layout.duration > 0 else 1.0
    step = span / width

    def column(moment: float) -> int:
        return min(width - 1, max(0, math.floor(moment / step)))

    names = [*layout.rows, *(f"{worker} slots" for worker in layout.occupancy)]
    pad = max([12, *(len(name) + 1 for name in names)])
    grid = [[" "] * width for _ in layout.rows]
    order = {kind: index for index, kind in enumerate(CHART_CHARS)}
    for bar in sorted(layout.bars, key=lambda b: order[b.kind]):
        first = column(bar.start)
        last = max(first, math.ceil(bar.end / step) - 1)
        char = FAILED_CHAR if bar.failed and bar.kind == "gpu" else CHART_CHARS[bar.kind]
        for index in range(first, min(last, width - 1) + 1):
            grid[bar.row][index] = char
    rows = zip(layout.rows, grid, strict=True)
    lines = [f"{name:<{pad}}{''.join(cells)}" for name, cells in rows]
    for worker, steps in layout.occupancy.items():
        held = [0] * width
        # Each (moment, slots) holds until the next step's moment.
        for (moment, slots), (until, _) in itertools.pairwise(steps):
            if slots and until > moment:
                for index in range(column(moment), column(max(moment, until - step / 2)) + 1):
                    held[index] = max(held[index], slots)
        digits = "".join(str(n) if n < 10 else "+" for n in held)
        lines.append(f"{worker + ' slots':<{pad}}{digits} |{layout.limits.get(worker, 0)}")
    return lines


def timeline_markdown(
    phases: Sequence[TimelinePhase],
    title: str,
    subtitle: str = "",
    pictures: Sequence[Path] = (),
    width: int = CHART_WIDTH,
) -> str:
    """The timeline as Markdown for a Prefect artifact: a text chart per phase, a legend,
    the slots each worker held against its limit, and links to the pictures drawn.

    ``pictures`` are files written with ``--timeline``; they stay on the machine
    that drew them, so the link names the path there.

    Raises:
        ValueError: no phase.
    """
    if not phases:
        raise ValueError("a timeline needs at least one phase")
    legend = ", ".join(f"`{CHART_CHARS[kind]}` {BAR_LABELS[kind]}" for kind in CHART_CHARS)
    parts = [f"# {title}"]
    if subtitle:
        parts.append(subtitle)
    for phase in phases:
        layout = layout_phase(phase)
        span = layout.duration
        parts.append(f"## {_column_title(layout)}")
        parts.append(
            f"0 s to {span:.1f} s since the runs were submitted, one column = "
            f"{(span or 1.0) / width:.2f} s; a row per flow run at a time of each worker."
        )
        parts.append("```text\n" + "\n".join(chart_lines(layout, width)) + "\n```")
        peaks = [
            f"| {worker} | {max((held for _, held in steps), default=0)} | "
            f"{layout.limits.get(worker, 0)} |"
            for worker, steps in layout.occupancy.items()
        ]
        parts.append("| worker | most GPU slots held at once | limit |\n|---|---|---|\n"
                     + "\n".join(peaks))  # fmt: skip
    parts.append(f"Legend: {legend}, `{FAILED_CHAR}` GPU step failed; slot lines: slots held, "
                 "`|` then the limit.")  # fmt: skip
    if pictures:
        links = "\n".join(f"- [{path.name}]({path.resolve().as_uri()}): `{path.resolve()}`"
                          for path in pictures)  # fmt: skip
        parts.append(f"Pictures drawn with `--timeline` (on the machine that ran it):\n{links}")
    else:
        parts.append("No picture drawn: `--timeline FILE.png` or `FILE.html` draws one.")
    return "\n\n".join(parts) + "\n"
