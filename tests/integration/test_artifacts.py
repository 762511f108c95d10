"""A short ``demo`` on the test server leaves its artifacts where Prefect's API shows them.

Each GPU step's table is on its flow run (and task run); the report's table
and the timeline's Markdown are on the report's own run, which the demo names.
With ``--no-artifacts`` there are none. Everything is read back through
Prefect's client, as the UI reads it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    WorkPoolFilter,
    WorkPoolFilterName,
)
from prefect.client.schemas.objects import Artifact, FlowRun

from prefect_gpu_workers.server import LocalPrefectServer

REPORT_RUN = re.compile(r"on flow run '([^']+)' \(([0-9a-f-]{36})\)")


def run_demo(tmp_path: Path, prefix: str, *extra: str) -> str:
    """The smallest demo the other tests run: one worker, two simulated runs, 1 s GPU steps."""
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_workers.cli", "demo", "--simulate",
         "--workers", "1", "--runs", "2", "--download-seconds", "0", "--gpu-seconds", "1",
         "--save-seconds", "0", "--poll-seconds", "2", "--worker-prefix", prefix,
         "--pool", f"demo-{prefix}", "--workdir", str(tmp_path / "work"), *extra],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # Nothing Prefect's client does in the demo's process (its events) speaks up.
    assert "EventsWorker" not in output
    return output


def runs_of_pool(pool: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool]))
        )


def artifacts_of(run_ids: list[UUID]) -> list[Artifact]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )


def report_runs_of(pool: str) -> list[FlowRun]:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                tags=FlowRunFilterTags(all_=["pgw-report", f"pool:{pool}"])
            )
        )


def table(artifact: Artifact) -> list[dict[str, object]]:
    # Prefect keeps a table's rows as a JSON string (as create_table_artifact sends them).
    data = artifact.data
    rows = json.loads(data) if isinstance(data, str) else data
    assert isinstance(rows, list), data
    return rows


def test_a_demo_leaves_each_gpu_steps_table_on_its_run_and_the_report_on_its_own(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    prefix = f"a{uuid.uuid4().hex[:6]}"
    worker, pool = f"{prefix}-1", f"demo-{prefix}"
    picture = tmp_path / "timeline.html"
    output = run_demo(tmp_path, prefix, "--timeline", str(picture))

    runs = runs_of_pool(pool)
    assert len(runs) == 2
    assert all(run.state is not None and run.state.is_completed() for run in runs)
    steps = artifacts_of([run.id for run in runs])
    assert sorted(a.key or "" for a in steps) == sorted(f"gpu-step-{run.id}" for run in runs)
    for artifact in steps:
        assert artifact.type == "table"
        assert artifact.task_run_id is not None  # published from the GPU task itself
        assert artifact.key == f"gpu-step-{artifact.flow_run_id}"
        (row,) = table(artifact)
        assert row["device"] == "cpu"
        assert row["work"] == "simulated"
        assert row["limit"] == f"gpu:{worker}"
        assert row["worker"] == worker
        assert row["slots"] == 1
        assert isinstance(row["waited_s"], float)
        assert row["waited_s"] >= 0
        # The step sleeps out --gpu-seconds inside its slot.
        assert isinstance(row["held_s"], float)
        assert row["held_s"] >= 0.99
        assert row["peak_memory_mib"] is None
        assert row["error"] is None
        assert artifact.description is not None
        assert "held" in artifact.description

    found = REPORT_RUN.search(output)
    assert found, output
    report_run_id = UUID(found.group(2))
    (report_run,) = report_runs_of(pool)
    assert report_run.id == report_run_id
    assert report_run.name == found.group(1)
    assert report_run.state is not None
    assert report_run.state.is_completed()
    report = {a.key: a for a in artifacts_of([report_run_id])}
    assert set(report) == {"pgw-demo-report", "pgw-demo-timeline"}
    figures = {row["measure"]: row["demo"] for row in table(report["pgw-demo-report"])}
    assert figures["runs submitted"] == 2
    assert figures["runs finished"] == 2
    assert figures["runs failed"] == 0
    assert figures["GPU steps recorded"] == 2
    assert figures["peak GPU steps at once / limit, per worker"] in (f"{worker} 1/2",
                                                                     f"{worker} 2/2")  # fmt: skip
    timeline = report["pgw-demo-timeline"]
    assert timeline.type == "markdown"
    text = str(timeline.data)
    assert "## demo: 2 runs, 2 GPU steps" in text
    assert f"{worker} slots" in text
    assert picture.resolve().as_uri() in text
    assert "Plotly.newPlot" in picture.read_text(encoding="utf-8")
    assert output.rstrip().endswith(f"timeline: {picture}")


def test_no_artifacts_leaves_none(prefect_server: LocalPrefectServer, tmp_path: Path) -> None:
    prefix = f"n{uuid.uuid4().hex[:6]}"
    output = run_demo(tmp_path, prefix, "--no-artifacts")
    assert "artifacts: off (--no-artifacts)" in output
    runs = runs_of_pool(f"demo-{prefix}")
    assert len(runs) == 2
    assert all(run.state is not None and run.state.is_completed() for run in runs)
    assert artifacts_of([run.id for run in runs]) == []
    assert report_runs_of(f"demo-{prefix}") == []


def test_a_bench_leaves_its_report_with_a_column_and_a_chart_per_phase(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    prefix = f"b{uuid.uuid4().hex[:6]}"
    pool = f"bench-{prefix}"
    result = subprocess.run(
        [sys.executable, "-m", "prefect_gpu_workers.cli", "bench", "--json",
         "--workers", "1", "--runs", "2", "--gpu-seconds", "1", "--poll-seconds", "2",
         "--skip-flow-level", "--skip-launcher-comparison", "--worker-prefix", prefix,
         "--pool", pool],
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=400,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    json.loads(result.stdout)  # stdout is still the JSON object alone
    assert "EventsWorker" not in result.stderr
    found = REPORT_RUN.search(result.stderr)
    assert found, result.stderr
    report = {a.key: a for a in artifacts_of([UUID(found.group(2))])}
    assert set(report) == {"pgw-bench-report", "pgw-bench-timeline"}
    rows = table(report["pgw-bench-report"])
    phases = ["task-level, slot broker (fork)", "task-level, Prefect polling"]
    assert all(list(row) == ["measure", *phases] for row in rows)
    finished = next(row for row in rows if row["measure"] == "runs finished")
    assert [finished[phase] for phase in phases] == [2, 2]
    text = str(report["pgw-bench-timeline"].data)
    assert text.count("```text") == 2
    assert "No picture drawn" in text
    # The GPU steps of both phases ran in the bench's pool and published their tables.
    runs = runs_of_pool(pool)
    assert len(runs) == 4
    steps = artifacts_of([run.id for run in runs])
    assert sorted(a.key or "" for a in steps) == sorted(f"gpu-step-{run.id}" for run in runs)
