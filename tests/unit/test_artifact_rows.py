"""What demo, bench and each GPU step publish as Prefect artifacts, built from records.

Pure parts only: the rows, the keys, the Markdown timeline and the switches.
That they reach a real Prefect server is tests/integration/test_artifacts.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pgw_flows.artifacts import artifacts_enabled, describe_step, gpu_step_key
from prefect_gpu_workers.cli import _local_options, build_parser
from prefect_gpu_workers.local.artifacts import (
    Published,
    report_keys,
    report_run_name,
    report_tags,
    table_json,
)
from prefect_gpu_workers.local.plan import LocalOptions
from prefect_gpu_workers.local.timeline import (
    CHART_CHARS,
    TimelinePhase,
    chart_lines,
    layout_phase,
    timeline_markdown,
)
from prefect_gpu_workers.records import StageRecord, gpu_step_row
from prefect_gpu_workers.report import figure_rows, summarize

# Prefect's rule for artifact keys (prefect.types.names): lowercase letters, digits, dashes.
PREFECT_KEY = re.compile(r"^[a-z0-9-]+$")
RUN_ID = "0b6f0e3c-1a2b-4c5d-8e9f-a0b1c2d3e4f5"


def _gpu(device: str | None = "cuda:1", **fields: object) -> StageRecord:
    base: dict[str, object] = {
        "run_id": RUN_ID, "worker_id": "local-1", "stage": "gpu", "requested": 100.0,
        "start": 101.25, "end": 104.5, "occupy": 2, "limit": "gpu:local-1", "device": device,
    }  # fmt: skip
    return StageRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_a_cuda_steps_row_names_its_gpu_and_torchs_peak() -> None:
    row = gpu_step_row(_gpu(peak_memory_mib=1234.56, memory_gib=8), "GPU-abc")
    assert row == {
        "device": "cuda:1",
        "gpu": 1,
        "gpu_uuid": "GPU-abc",
        "work": "gpu",
        "limit": "gpu:local-1",
        "slots": 2,
        "waited_s": 1.25,
        "held_s": 3.25,
        "peak_memory_mib": 1234.6,
        "peak_memory_from": "torch (allocator peak)",
        "declared_memory_gib": 8,
        "worker": "local-1",
        "error": None,
    }
    # Every cell is JSON: Prefect stores the table as it is.
    assert json.loads(json.dumps(row)) == row


def test_a_step_off_cuda_runs_on_the_cpu_and_says_what_was_not_measured() -> None:
    simulated = gpu_step_row(_gpu("simulated"), "GPU-ignored")
    assert (simulated["device"], simulated["gpu"], simulated["gpu_uuid"]) == ("cpu", None, None)
    assert simulated["work"] == "simulated"
    assert simulated["peak_memory_mib"] is None
    assert simulated["peak_memory_from"] == "not measured (no CUDA)"
    cpu = gpu_step_row(_gpu("cpu", memory_gib=40))
    assert (cpu["device"], cpu["work"]) == ("cpu", "cpu")
    assert cpu["peak_memory_from"] == "not measured; declared 40 GiB"
    # A step that never learnt its device (it failed before) is still a row.
    assert gpu_step_row(_gpu(None, error="InjectedGpuFailure: x"))["error"] == (
        "InjectedGpuFailure: x"
    )


def test_only_gpu_steps_have_a_step_row() -> None:
    with pytest.raises(ValueError, match="not a GPU step"):
        gpu_step_row(StageRecord("r", "w", "download", 0.0, 0.0, 1.0))


def test_step_keys_are_prefect_keys_one_per_run() -> None:
    key = gpu_step_key(RUN_ID.upper())
    assert key == f"gpu-step-{RUN_ID}"
    assert PREFECT_KEY.match(key)
    assert gpu_step_key("other") != key
    # Whatever a run id is made of outside a flow run, the key stays valid.
    for odd in ("Run_1.x", "", "--"):
        assert PREFECT_KEY.match(gpu_step_key(odd)), odd


def test_step_description_says_wait_and_hold() -> None:
    assert describe_step(_gpu()) == (
        "GPU step of local-1 (done): waited 1.25 s for gpu:local-1, held 3.25 s"
    )
    assert "(failed)" in describe_step(_gpu(error="boom"))
    assert "for no limit" in describe_step(_gpu(limit=None))


@pytest.mark.parametrize(
    ("parameter", "env", "on"),
    [
        (None, {}, True),
        (None, {"PGW_ARTIFACTS": "1"}, True),
        (None, {"PGW_ARTIFACTS": "0"}, False),
        (None, {"PGW_ARTIFACTS": " Off "}, False),
        (None, {"PGW_ARTIFACTS": "false"}, False),
        (False, {}, False),
        (True, {"PGW_ARTIFACTS": "0"}, True),  # the parameter wins over the worker's env
    ],
)
def test_artifacts_are_on_unless_the_parameter_or_env_turns_them_off(
    parameter: bool | None, env: dict[str, str], on: bool
) -> None:
    assert artifacts_enabled(parameter, env) is on


def test_no_artifacts_reaches_both_commands_and_their_flow_parameter() -> None:
    parser = build_parser()
    for command in ("demo", "bench"):
        on = LocalOptions(**_local_options(parser.parse_args([command])))
        off = LocalOptions(**_local_options(parser.parse_args([command, "--no-artifacts"])))
        assert (on.artifacts, on.step_artifacts) == (True, None), command
        assert (off.artifacts, off.step_artifacts) == (False, False), command


def test_report_keys_tags_and_run_name() -> None:
    for command in ("demo", "bench"):
        for key in report_keys(command):
            assert PREFECT_KEY.match(key), key
    assert report_tags("pgw-local") == ["pgw-report", "pool:pgw-local"]
    assert re.fullmatch(r"demo report \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", report_run_name("demo", 0))


def test_published_says_where_or_why_not() -> None:
    where = Published(run_name="demo report x", run_id=None).describe("demo")
    assert "pgw-demo-report and pgw-demo-timeline on flow run 'demo report x'" in where
    assert "gpu-step-<flow run id>" in where
    failed = Published(error="ConnectError: refused").describe("bench")
    assert failed == "artifacts: not published (ConnectError: refused); the bench goes on"


def _records() -> list[StageRecord]:
    return [
        StageRecord("r1", "w-1", "download", 0.0, 0.0, 1.0),
        StageRecord("r1", "w-1", "gpu", 1.0, 1.0, 5.0, 1, "gpu:w-1", "simulated"),
        StageRecord("r1", "w-1", "save", 5.0, 5.0, 6.0),
        StageRecord("r2", "w-1", "download", 0.0, 0.0, 1.0),
        # r2 waits for r1's slot (limit 1), then fails inside it.
        StageRecord("r2", "w-1", "gpu", 1.0, 5.0, 7.0, 1, "gpu:w-1", "simulated", error="boom"),
    ]


def test_figure_rows_read_one_measure_across_the_phases() -> None:
    metrics = summarize(
        _records(), {"w-1": 1}, submitted=2, finished=1, failed=1, submitted_at=0.0, ended_at=8.0
    )
    rows = figure_rows([("demo", metrics), ("again", metrics)])
    by_measure = {row["measure"]: row for row in rows}
    assert all(set(row) == {"measure", "demo", "again"} for row in rows)
    assert by_measure["runs submitted"]["demo"] == 2
    assert by_measure["runs failed"]["again"] == 1
    assert by_measure["time to finish (submit -> last run end), s"]["demo"] == 8.0
    assert by_measure["GPU steps recorded"]["demo"] == 2
    assert by_measure["wait for a GPU slot p50, s"]["demo"] == 2.0  # waits 0 and 4
    assert by_measure["peak GPU steps at once / limit, per worker"]["demo"] == "w-1 1/1"
    assert by_measure["within every worker's limit"]["demo"] == "yes"
    # No record carries a launch time: the start-up was not measured.
    assert by_measure["flow-run start (worker starts it -> first task) p50, s"]["demo"] is None
    assert json.loads(table_json(rows)) == rows


def test_figure_rows_need_distinct_phase_labels() -> None:
    metrics = summarize([], {}, submitted=0, finished=0, failed=0, submitted_at=0, ended_at=0)
    with pytest.raises(ValueError, match="at least one phase"):
        figure_rows([])
    with pytest.raises(ValueError, match="distinct"):
        figure_rows([("a", metrics), ("a", metrics)])
    with pytest.raises(ValueError, match="distinct"):
        figure_rows([("measure", metrics)])


def test_chart_draws_each_run_on_its_row_and_the_slots_against_the_limit() -> None:
    phase = TimelinePhase("demo", _records(), {"w-1": 1}, started_at=0.0, ended_at=8.0)
    lines = chart_lines(layout_phase(phase), width=8)  # one column per second
    assert lines == [
        "w-1 #1      dGGGGs  ",
        "w-1 #2      d....XX ",
        "w-1 slots   01111110 |1",
    ]


def test_a_step_shorter_than_a_column_still_shows() -> None:
    records = [StageRecord("r", "w", "gpu", 0.0, 0.0, 0.01, 1, "gpu:w", "simulated")]
    phase = TimelinePhase("x", records, {"w": 1}, started_at=0.0, ended_at=100.0)
    (row, slots) = chart_lines(layout_phase(phase), width=10)
    assert row.split()[-1] == CHART_CHARS["gpu"]
    assert slots.split()[2] == "1000000000"


def test_timeline_markdown_has_a_chart_per_phase_a_legend_and_the_pictures(
    tmp_path: Path,
) -> None:
    a = TimelinePhase("task-level", _records(), {"w-1": 1}, started_at=0.0)
    b = TimelinePhase("flow-level", _records()[:3], {"w-1": 1}, started_at=0.0)
    picture = tmp_path / "t.png"
    text = timeline_markdown([a, b], "bench", "telemetry off", [picture])
    assert text.startswith("# bench\n\ntelemetry off\n")
    assert "## task-level: 2 runs, 2 GPU steps (1 failed)" in text
    assert "## flow-level: 1 runs, 1 GPU steps" in text
    assert text.count("```text") == 2
    assert "| w-1 | 1 | 1 |" in text
    assert "`G` GPU step" in text
    assert "`X` GPU step failed" in text
    assert f"[t.png]({picture.resolve().as_uri()})" in text
    assert "No picture drawn" in timeline_markdown([a], "demo")
    with pytest.raises(ValueError, match="at least one phase"):
        timeline_markdown([], "nothing")
