"""The pipeline's GPU step on this machine, run directly (``unlimited``: no Prefect server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pgw_flows.model import synthetic_tokens
from pgw_flows.pipeline import Batch, InjectedGpuFailure, inference
from prefect_gpu_workers.records import read_records


def test_gpu_step_runs_the_given_batches_and_records_them(tmp_path: Path) -> None:
    batch = Batch([0, 1], [synthetic_tokens(0), synthetic_tokens(1)])
    result = inference.fn(
        "run-1", batch, 1, "gpu", 0.1, False, str(tmp_path), batches=3, unlimited=True
    )
    assert result.limit is None
    assert len(result.labels) == 2
    assert result.batches == 3
    (record,) = read_records(tmp_path)
    assert (record.stage, record.limit, record.batches, record.error) == ("gpu", None, 3, None)
    assert record.device == result.device
    # Off CUDA there are no allocator statistics; on CUDA the step's peak is recorded.
    assert (record.peak_memory_mib is None) == (not result.device.startswith("cuda"))


def test_a_failing_gpu_step_records_its_error(tmp_path: Path) -> None:
    batch = Batch([0], [synthetic_tokens(0)])
    with pytest.raises(InjectedGpuFailure):
        inference.fn("run-2", batch, 1, "gpu", 0.0, False, str(tmp_path), fail=True, unlimited=True)
    (record,) = read_records(tmp_path)
    assert record.error is not None
    assert record.error.startswith("InjectedGpuFailure: injected failure")
    assert record.batches is None
