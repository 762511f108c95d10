"""GPU telemetry: the sampler without NVML, and the pure summaries."""

from __future__ import annotations

import threading

import pytest

from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.telemetry import (
    GpuSample,
    GpuSampler,
    describe_telemetry,
    first_visible_gpu,
    held_intervals,
    summarize_samples,
)


def _no_nvml() -> None:
    raise ImportError("libnvidia-ml.so.1: cannot open shared object file")


def test_sampler_without_nvml_starts_nothing_and_says_why() -> None:
    threads_before = threading.active_count()
    with GpuSampler(open_nvml=_no_nvml) as sampler:
        assert not sampler.available
        assert threading.active_count() == threads_before
    assert sampler.samples == []
    assert sampler.stop() == []  # idempotent
    assert sampler.unavailable_reason == (
        "NVML unavailable: libnvidia-ml.so.1: cannot open shared object file"
    )
    line = describe_telemetry(None, sampler.unavailable_reason)
    assert line.startswith("no GPU: telemetry off")
    assert "\n" not in line


def test_sampler_on_this_machine_never_raises() -> None:
    # Real NVML: on a machine without a driver this is the degraded path,
    # with a GPU it samples; either way start/stop must work and agree.
    sampler = GpuSampler(interval_s=0.05).start()
    samples = sampler.stop()
    if sampler.available or samples:
        assert all(0 <= s.utilization_pct <= 100 for s in samples)
    else:
        assert sampler.unavailable_reason


class _FakeNvml:
    """Two GPUs whose readings come from a list; stops the sampler after the last."""

    gpus = 2

    def __init__(self, done: threading.Event) -> None:
        self.reads = 0
        self.closed = False
        self.done = done

    def read(self, now: float) -> list[GpuSample]:
        self.reads += 1
        if self.reads >= 3:
            self.done.set()
        return [GpuSample(now, gpu, 50.0, 1000.0, 8000.0) for gpu in range(self.gpus)]

    def close(self) -> None:
        self.closed = True


def test_sampler_collects_every_gpu_until_stopped() -> None:
    done = threading.Event()
    fake = _FakeNvml(done)
    sampler = GpuSampler(interval_s=0.01, open_nvml=lambda: fake).start()
    assert sampler.available
    assert done.wait(30)
    samples = sampler.stop()
    assert fake.closed
    assert len(samples) == 2 * fake.reads
    assert {s.gpu for s in samples} == {0, 1}
    with pytest.raises(RuntimeError, match="already started"):
        sampler.start()


def _gpu(start: float, end: float) -> StageRecord:
    return StageRecord("r", "w", "gpu", start, start, end, 1)


def test_held_intervals_merge_overlapping_gpu_steps() -> None:
    records = [
        _gpu(1, 3),
        _gpu(2, 4),
        _gpu(6, 7),
        StageRecord("r", "w", "download", 0, 0, 10),
    ]
    assert held_intervals(records) == [(1, 4), (6, 7)]


def test_summary_over_the_run_and_while_steps_were_held() -> None:
    samples = [
        GpuSample(0.5, 0, 0.0, 500.0, 80000.0),
        GpuSample(1.5, 0, 90.0, 30000.0, 80000.0),
        GpuSample(2.5, 0, 100.0, 60000.0, 80000.0),
        GpuSample(5.0, 0, 10.0, 1000.0, 80000.0),
        GpuSample(99.0, 0, 0.0, 99999.0, 80000.0),  # outside the window
    ]
    summary = summarize_samples(samples, held=[(1.0, 3.0)], window=(0.0, 10.0))
    assert summary is not None
    assert summary.samples == 4
    assert summary.mean_utilization_pct == pytest.approx(50.0)
    assert summary.peak_utilization_pct == 100.0
    assert summary.held_samples == 2
    assert summary.held_mean_utilization_pct == pytest.approx(95.0)
    assert summary.held_peak_utilization_pct == 100.0
    assert summary.peak_memory_used_mib == 60000.0
    assert summary.memory_total_mib == 80000.0
    line = describe_telemetry(summary, None)
    assert "95% mean" in line
    assert "60000 of 80000 MiB" in line


def test_summary_of_no_samples_is_none() -> None:
    assert summarize_samples([], held=[(0, 1)]) is None
    assert describe_telemetry(None, None) == "GPU telemetry: no samples"


def test_summary_of_the_steps_gpu_leaves_idle_gpus_out() -> None:
    samples = [GpuSample(1.0, 0, 100.0, 9000.0, 80000.0), GpuSample(1.0, 1, 0.0, 10.0, 80000.0)]
    every = summarize_samples(samples)
    only_first = summarize_samples(samples, gpus={0})
    assert every is not None
    assert only_first is not None
    assert (every.gpus, every.mean_utilization_pct) == (2, 50.0)
    assert (only_first.gpus, only_first.mean_utilization_pct) == (1, 100.0)
    assert summarize_samples(samples, gpus={7}) is None


@pytest.mark.parametrize(
    ("environ", "index"),
    [
        ({}, None),
        ({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, 0),
        ({"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, 2),
        ({"CUDA_VISIBLE_DEVICES": "2"}, None),  # CUDA's default order may differ from NVML's
        ({"CUDA_VISIBLE_DEVICES": "GPU-8a1b", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, None),
    ],
)
def test_first_visible_gpu(environ: dict[str, str], index: int | None) -> None:
    assert first_visible_gpu(environ) == index
