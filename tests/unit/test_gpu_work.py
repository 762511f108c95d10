"""Local mode's GPU-step helpers: calibration in a child process, memory shares, step facts."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.local.gpu_work import (
    StepCalibration,
    no_limit_refusal,
    peak_step_memory_mib,
    plan_gpu_step,
    step_durations,
    step_errors,
    step_memory_fraction,
)
from prefect_gpu_workers.records import StageRecord


def test_memory_share_splits_the_headroom_between_steps() -> None:
    assert step_memory_fraction(1) == pytest.approx(0.85)
    assert step_memory_fraction(4) == pytest.approx(0.2125)
    with pytest.raises(ValueError, match="at least 1"):
        step_memory_fraction(0)


def _gpu(start: float, end: float, **extra: object) -> StageRecord:
    return StageRecord("r", "w", "gpu", start, start, end, 1, "gpu:w", "cuda", **extra)  # type: ignore[arg-type]


def test_step_facts_from_records() -> None:
    records = [
        _gpu(0, 3, peak_memory_mib=17000.0, batches=150),
        _gpu(1, 5, peak_memory_mib=17400.0, batches=150),
        _gpu(2, 2.5, peak_memory_mib=900.0, error="OutOfMemoryError: CUDA out of memory"),
        _gpu(2, 2.1, error="OutOfMemoryError: CUDA out of memory"),
        StageRecord("r", "w", "download", 0, 0, 1),
    ]
    assert peak_step_memory_mib(records) == 17400.0
    assert peak_step_memory_mib(records[-1:]) is None
    assert step_errors(records) == {"OutOfMemoryError": 2}
    durations = step_durations(records)
    assert (durations.count, durations.p50_s, durations.max_s) == (2, 3.5, 4)


def test_gpu_step_plan_with_and_without_a_calibration() -> None:
    measured = StepCalibration(
        config="encoder-base",
        device="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        seconds_per_batch=0.01,
        target_s=0.75,
        batches=75,
        tflops=290.0,
    )
    plan = plan_gpu_step(3.0, 4, measured)
    assert plan.batches == 75
    assert plan.memory_fraction == pytest.approx(0.2125)
    assert "0.8 s alone, about 3.0 s with the 4 steps" in plan.description
    assert plan_gpu_step(3.0, 4, measured, memory_fraction=0.0).memory_fraction == 0.0
    on_cpu = plan_gpu_step(3.0, 4, None)
    assert (on_cpu.batches, on_cpu.memory_fraction) == (None, 0.0)
    assert "on the CPU" in on_cpu.description


def test_no_limit_needs_a_gpu_and_the_real_step() -> None:
    assert no_limit_refusal(0, simulate=False) is not None
    assert "drop --simulate" in str(no_limit_refusal(1, simulate=True))
    assert no_limit_refusal(1, simulate=False) is None
