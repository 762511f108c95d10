"""Timeline pictures: row assignment, and both formats show every recorded step."""

from __future__ import annotations

import itertools
import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from prefect_gpu_workers.local.timeline import (
    BAR_LABELS,
    TimelinePhase,
    assign_rows,
    build_html_figure,
    build_png_figure,
    layout_phase,
    occupancy_steps,
    write_timeline,
)
from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.telemetry import GpuSample


def _run(
    run: str, worker: str, t0: float, wait: float, gpu_s: float, launched: float | None = None,
    **gpu: object,
) -> list[StageRecord]:  # fmt: skip
    download_end = t0 + 1.0
    gpu_start = download_end + wait
    gpu_end = gpu_start + gpu_s
    return [
        StageRecord(run, worker, "download", t0, t0, download_end, launched=launched),
        StageRecord(run, worker, "gpu", download_end, gpu_start, gpu_end, 1, f"gpu:{worker}",
                    "cuda", **gpu),  # type: ignore[arg-type]
        StageRecord(run, worker, "save", gpu_end, gpu_end, gpu_end + 1.0),
    ]  # fmt: skip


def _phase(label: str = "demo", with_samples: bool = True) -> TimelinePhase:
    records = [
        *_run("r1", "local-1", 100.0, 0.0, 3.0, peak_memory_mib=1200.0, batches=150, prepare_s=0.5),
        *_run("r2", "local-1", 100.5, 0.0, 3.0, launched=99.8),
        *_run("r3", "local-1", 101.0, 2.5, 3.0),
        *_run("r4", "local-2", 100.2, 0.0, 2.0),
    ]
    # A run whose GPU step failed has no save record.
    records.append(StageRecord("r5", "local-2", "download", 100.3, 100.3, 101.3))
    records.append(
        StageRecord("r5", "local-2", "gpu", 101.3, 101.3, 101.9, 1, "gpu:local-2", "cuda",
                    error="OutOfMemoryError: CUDA out of memory")
    )  # fmt: skip
    samples = (
        [GpuSample(100.0 + t / 4, 0, 90.0, 20000.0, 80000.0) for t in range(40)]
        if with_samples
        else []
    )
    return TimelinePhase(label, records, {"local-1": 2, "local-2": 2}, samples, 99.5, 110.0)


def _expected_bars(phase: TimelinePhase) -> Counter[str]:
    counts: Counter[str] = Counter(r.stage for r in phase.records)
    counts["wait"] = sum(1 for r in phase.records if r.stage == "gpu" and r.start > r.requested)
    counts["prepare"] = sum(1 for r in phase.records if r.stage == "gpu" and r.prepare_s)
    counts["start-up"] = sum(1 for r in phase.records if r.launched is not None)
    return counts


def test_assign_rows_packs_intervals_into_the_fewest_rows() -> None:
    assert assign_rows([("a", 0, 2), ("b", 1, 3), ("c", 2, 4)]) == {"a": 0, "b": 1, "c": 0}
    assert assign_rows([]) == {}


def test_assign_rows_never_puts_overlapping_intervals_on_one_row() -> None:
    rng = random.Random(7)  # fixed seed: the same intervals every run
    for _ in range(200):
        intervals = []
        for index in range(rng.randint(1, 30)):
            start = rng.uniform(0, 50)
            intervals.append((f"run-{index}", start, start + rng.uniform(0, 10)))
        rows = assign_rows(intervals)
        assert set(rows) == {key for key, _, _ in intervals}
        for (key_a, start_a, end_a), (key_b, start_b, end_b) in itertools.combinations(
            intervals, 2
        ):
            if rows[key_a] == rows[key_b]:
                assert end_a <= start_b or end_b <= start_a, (key_a, key_b)
        # As many rows as intervals overlapping at the busiest instant, no more.
        busiest = max(
            sum(1 for _, s, e in intervals if s <= moment < e) for _, moment, _ in intervals
        )
        assert max(rows.values()) + 1 == busiest
        assert assign_rows(list(reversed(intervals))) == rows  # order of input does not matter


def test_occupancy_steps_follow_gpu_steps() -> None:
    records = _run("a", "w", 0.0, 0.0, 3.0) + _run("b", "w", 0.5, 0.0, 3.0)
    assert occupancy_steps(records, until=10.0) == [
        (0.0, 0), (1.0, 1), (1.5, 2), (4.0, 1), (4.5, 0), (10.0, 0)
    ]  # fmt: skip


def test_layout_rows_per_worker_and_every_step_as_a_bar() -> None:
    phase = _phase()
    layout = layout_phase(phase)
    assert layout.rows == ["local-1 #1", "local-1 #2", "local-1 #3", "local-2 #1", "local-2 #2"]
    assert Counter(bar.kind for bar in layout.bars) == _expected_bars(phase)
    assert [bar.run_id for bar in layout.bars if bar.failed] == ["r5"]
    assert layout.duration == pytest.approx(10.5)
    (start_up,) = [bar for bar in layout.bars if bar.kind == "start-up"]
    assert start_up.run_id == "r2"
    assert start_up.start == pytest.approx(0.3)  # launched 99.8, time zero 99.5
    assert start_up.end == pytest.approx(1.0)
    assert max(held for _, held in layout.occupancy["local-1"]) == 2


def test_png_figure_draws_a_bar_per_recorded_step(tmp_path: Path) -> None:
    phases = [_phase("task-level"), _phase("flow-level", with_samples=False)]
    figure = build_png_figure([layout_phase(p) for p in phases], "bench")
    for column, phase in enumerate(phases):
        runs_axes = figure.axes[column]  # first row of subplots
        kinds = Counter(
            str(patch.get_gid()).split(":")[0] for patch in runs_axes.patches if patch.get_gid()
        )
        assert kinds == _expected_bars(phase)
        assert runs_axes.get_title().startswith(phase.label)
    path = write_timeline(tmp_path / "t.png", *phases, title="bench")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_html_figure_draws_a_bar_per_recorded_step(tmp_path: Path) -> None:
    phase = _phase()
    figure = build_html_figure([layout_phase(phase)], "demo")
    bars = Counter({trace.name: len(trace.x) for trace in figure.data if trace.type == "bar"})
    expected = _expected_bars(phase)
    assert bars == Counter({BAR_LABELS[kind]: n for kind, n in expected.items()})  # type: ignore[index]
    path = write_timeline(tmp_path / "t.html", phase, title="demo")
    html = path.read_text(encoding="utf-8")
    assert "<html>" in html
    # Self-contained: plotly.js is embedded, no script is loaded from elsewhere.
    assert not re.search(r"<script[^>]*\bsrc=", html)
    assert "Plotly.newPlot" in html
    # Every run's bars are in the embedded data (run ids appear in hover text,
    # where plotly writes "<" as \u003c).
    for run in ("r1", "r2", "r3", "r4", "r5"):
        assert f"run {run}\\u003cbr" in html
    assert json.dumps("GPU 0 utilisation %")[1:-1] in html


def test_unknown_extension_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.png or \.html"):
        write_timeline(tmp_path / "t.svg", _phase())
    with pytest.raises(ValueError, match="at least one phase"):
        write_timeline(tmp_path / "t.png")
