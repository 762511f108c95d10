"""The GPU step's model and its calibration, run for real on this machine's CPU (torch,
a child process): slower than a unit test, so it lives in this tier."""

from __future__ import annotations

import pytest

from pgw_flows.model import CPU_CONFIG, CPU_WORK_CAP_S, classify, synthetic_tokens
from prefect_gpu_workers.local.gpu_work import calibrate_gpu_step


def test_calibration_in_a_child_process_on_the_cpu() -> None:
    result = calibrate_gpu_step(5.0, device="cpu")
    assert (result.config, result.device) == (CPU_CONFIG.name, "cpu")
    assert result.target_s == CPU_WORK_CAP_S
    assert result.batches * result.seconds_per_batch >= CPU_WORK_CAP_S
    assert "batches" in result.describe()


def test_calibration_failure_names_the_cause() -> None:
    with pytest.raises(RuntimeError, match="calibrating the GPU step failed"):
        calibrate_gpu_step(1.0, device="no-such-device")


def test_model_classifies_deterministically() -> None:
    items = [synthetic_tokens(i) for i in range(5)]
    predictions = classify(items)
    assert len(predictions.labels) == 5
    assert all(0 <= label < 10 for label in predictions.labels)
    assert predictions.device in ("cpu", "cuda", "cuda:0")
    assert classify(items).labels == predictions.labels
    assert classify([]).labels == []
