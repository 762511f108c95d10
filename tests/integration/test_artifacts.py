"""A short ``demo`` on the test server leaves its artifacts where Prefect's API shows them.

Each GPU step's table is on its flow run (and task run); the report's table
and the timeline's Markdown are on the report's own run, which the demo names.
With ``--no-artifacts`` there are none. Everything is read back through
Prefect's client, as the UI reads it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from uuid import UUID

import pytest
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
    """The runs' artifacts, less Prefect's own result records (no type, no key: a failed
    run's persisted exception is one)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )
    return [artifact for artifact in found if artifact.type is not None]


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


def _limit_for(worker: str) -> None:
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=f"gpu:{worker}", limit=1)
        )


def _flow_run_id(state: object) -> UUID:
    run_id = state.state_details.flow_run_id  # type: ignore[attr-defined]
    assert isinstance(run_id, UUID)
    return run_id


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_gpu_step_publishes_its_table_with_the_error_and_env_zero_publishes_none(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The flow in this process, its step polling Prefect (no broker): the failure path,
    and the worker's PGW_ARTIFACTS=0 with the parameter left to it."""
    from pgw_flows.pipeline import gpu_pipeline

    worker = f"f{uuid.uuid4().hex[:6]}"
    _limit_for(worker)
    monkeypatch.setenv("WORKER_ID", worker)
    failed = gpu_pipeline(
        items=1, simulate=True, fail_in_gpu_step=True, record_dir=str(tmp_path),
        return_state=True,
    )  # fmt: skip
    assert failed.is_failed()
    (artifact,) = artifacts_of([_flow_run_id(failed)])
    (row,) = table(artifact)
    assert str(row["error"]).startswith("InjectedGpuFailure: injected failure")
    assert row["limit"] == f"gpu:{worker}"
    assert artifact.description is not None
    assert "(failed)" in artifact.description

    monkeypatch.setenv("PGW_ARTIFACTS", "0")
    quiet = gpu_pipeline(items=1, simulate=True, record_dir=str(tmp_path), return_state=True)
    assert quiet.is_completed()
    assert artifacts_of([_flow_run_id(quiet)]) == []
    # The parameter wins over the worker's environment.
    loud = gpu_pipeline(items=1, simulate=True, artifacts=True, return_state=True)
    assert loud.is_completed()
    assert [a.key for a in artifacts_of([_flow_run_id(loud)])] == [f"gpu-step-{_flow_run_id(loud)}"]


# Outside a run (as here) Prefect warns that such artifacts are deprecated; a step is in one.
@pytest.mark.filterwarnings("ignore:Artifact creation outside:FutureWarning")
def test_an_api_that_refuses_the_artifact_is_one_warning_and_no_failure(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real refusal (nothing listens on the port), no stand-in: publishing returns,
    says so once, and says nothing the second time."""
    import socket

    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from pgw_flows import artifacts
    from prefect_gpu_workers.records import StageRecord

    with socket.socket() as probe:  # a port nothing listens on once it is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    record = StageRecord("r", "w", "gpu", 0.0, 0.5, 1.0, 1, "gpu:w", "simulated")
    logger = logging.getLogger("test-artifacts")
    monkeypatch.setattr(artifacts, "_warned", False)  # this process may have warned before
    with (
        temporary_settings(
            updates={
                PREFECT_API_URL: f"http://127.0.0.1:{port}/api",
                PREFECT_CLIENT_MAX_RETRIES: 0,
            }
        ),
        caplog.at_level(logging.WARNING, logger="test-artifacts"),
    ):
        artifacts.publish_gpu_step(record, None, logger)
        artifacts.publish_gpu_step(record, None, logger)
    warnings = [r for r in caplog.records if r.name == "test-artifacts"]
    assert len(warnings) == 1
    assert "could not publish the GPU step's artifact" in warnings[0].getMessage()
    assert "PGW_ARTIFACTS=0" in warnings[0].getMessage()
