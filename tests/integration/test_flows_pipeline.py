"""The pipeline flow in this process (against the real test server) and its tiny model."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from pgw_flows.model import classify, synthetic_tokens
from pgw_flows.pipeline import gpu_pipeline
from prefect_gpu_workers.naming import limit_prefix_from_env
from prefect_gpu_workers.records import read_records
from prefect_gpu_workers.slots.client import GpuLimitUnavailable


@pytest.mark.usefixtures("prefect_server")
def test_pipeline_runs_the_model_inside_the_slot_and_records_each_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = f"w-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=f"gpu:{worker}", limit=1)
        )
    monkeypatch.setenv("WORKER_ID", worker)

    result = gpu_pipeline(items=3, gpu_s=0.2, record_dir=str(tmp_path))

    assert result["limit"] == f"gpu:{worker}"
    assert result["worker_id"] == worker
    assert len(result["labels"]) == 3
    assert result["labels"] == classify([synthetic_tokens(i) for i in range(3)]).labels
    records = read_records(tmp_path)
    assert [r.stage for r in records] == ["download", "gpu", "save"]
    (gpu,) = [r for r in records if r.stage == "gpu"]
    assert (gpu.worker_id, gpu.limit, gpu.occupy) == (worker, f"gpu:{worker}", 1)
    assert gpu.end - gpu.start >= 0.2
    assert gpu.batches is not None
    assert gpu.batches >= 1
    assert gpu.error is None
    saved = json.loads((tmp_path / f"{result['run_id']}.result.json").read_text())
    assert saved["labels"] == result["labels"]


@pytest.mark.usefixtures("prefect_server")
def test_pipeline_without_a_limit_stops_before_the_gpu_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = f"w-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("WORKER_ID", worker)
    with pytest.raises(GpuLimitUnavailable, match=f"gpu:{worker}' does not exist"):
        gpu_pipeline(items=1, simulate=True, record_dir=str(tmp_path))
    assert [r.stage for r in read_records(tmp_path)] == ["download"]


@pytest.mark.usefixtures("prefect_server")
def test_pipeline_takes_the_limit_prefix_from_its_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = f"w-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=f"licence:{worker}", limit=1)
        )
    monkeypatch.setenv("WORKER_ID", worker)
    monkeypatch.setenv("PGW_LIMIT_PREFIX", "licence")
    result = gpu_pipeline(items=1, simulate=True, record_dir=str(tmp_path))
    assert result["limit"] == f"licence:{worker}"
    monkeypatch.setenv("PGW_LIMIT_PREFIX", "Not/Valid")
    with pytest.raises(ValueError, match="limit prefix"):
        limit_prefix_from_env()
