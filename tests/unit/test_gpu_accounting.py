"""Per-step GPU accounting (pure), the ``labels`` field of an acquire, and the NVML mapping."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from prefect_gpu_workers.slots.accounting import (
    OVERFLOW,
    GpuAccounting,
    GpuReading,
    StepLabels,
)
from prefect_gpu_workers.slots.wire import MAX_LABEL_CHARS, parse_acquire
from prefect_gpu_workers.telemetry import GpuSample, feed_gpu_readings, readings_by_position

LIMIT = "gpu:w-1"
TRAIN = StepLabels.of("train", "pipeline", "fit")
SCORE = StepLabels.of("score", "pipeline", "predict")
GIB = 1024**3


def test_a_released_step_counts_its_wait_and_slot_seconds() -> None:
    accounting = GpuAccounting()
    accounting.granted(1, LIMIT, TRAIN, slots=2, waited_s=1.5, now=10.0)
    accounting.released(1, now=14.0)
    usage = accounting.usage(now=100.0)[(LIMIT, TRAIN)]
    assert (usage.steps, usage.waited_s, usage.held_slot_s) == (1, 1.5, 8.0)
    assert (usage.busy_slot_s, usage.memory_byte_s) == (0.0, 0.0)
    assert not accounting.measured


def test_a_live_holder_counts_up_to_now_and_never_twice() -> None:
    accounting = GpuAccounting()
    accounting.granted(1, LIMIT, TRAIN, slots=1, waited_s=0.0, now=0.0)
    assert accounting.usage(now=5.0)[(LIMIT, TRAIN)].held_slot_s == 5.0
    assert accounting.usage(now=7.0)[(LIMIT, TRAIN)].held_slot_s == 7.0
    # A clock read out of order subtracts nothing.
    assert accounting.usage(now=6.0)[(LIMIT, TRAIN)].held_slot_s == 7.0
    accounting.released(1, now=10.0)
    assert accounting.usage(now=50.0)[(LIMIT, TRAIN)].held_slot_s == 10.0
    assert accounting.holding == 0


def test_busy_and_memory_follow_the_readings_of_the_steps_gpu() -> None:
    accounting = GpuAccounting()
    accounting.sample({0: GpuReading(1.0, 4 * GIB, 80 * GIB), 1: GpuReading(0.0, 0, 80 * GIB)}, 0.0)
    accounting.granted(1, LIMIT, TRAIN, slots=1, waited_s=0.0, now=0.0, gpu=0)
    accounting.granted(2, LIMIT, SCORE, slots=1, waited_s=0.0, now=0.0, gpu=1)
    # From 10 s on, GPU 0 is idle: the reading counts from when it was taken.
    accounting.sample({0: GpuReading(0.0, 2 * GIB, 80 * GIB), 1: GpuReading(0.5, 0, 80 * GIB)}, 10)
    accounting.released(1, now=20.0)
    accounting.released(2, now=20.0)
    usage = accounting.usage(now=30.0)
    train, score = usage[(LIMIT, TRAIN)], usage[(LIMIT, SCORE)]
    assert (train.held_slot_s, train.busy_slot_s) == (20.0, 10.0)
    assert train.memory_byte_s == 10 * 4 * GIB + 10 * 2 * GIB
    assert (score.held_slot_s, score.busy_slot_s, score.memory_byte_s) == (20.0, 5.0, 0.0)
    assert accounting.measured


def test_a_step_not_placed_gets_the_mean_utilisation_and_every_gpus_memory() -> None:
    accounting = GpuAccounting()
    accounting.sample({0: GpuReading(1.0, GIB, 8 * GIB), 1: GpuReading(0.5, GIB, 8 * GIB)}, 0.0)
    accounting.granted(1, LIMIT, TRAIN, slots=2, waited_s=0.0, now=0.0)
    usage = accounting.usage(now=4.0)[(LIMIT, TRAIN)]
    assert (usage.held_slot_s, usage.busy_slot_s) == (8.0, 6.0)
    assert usage.memory_byte_s == 4 * 2 * GIB


def test_label_sets_past_the_bound_count_as_other() -> None:
    accounting = GpuAccounting(max_label_sets=3)
    for ticket in range(5):
        labels = StepLabels.of(f"d{ticket}", "f", "t")
        accounting.granted(ticket, LIMIT, labels, slots=1, waited_s=1.0, now=0.0)
        accounting.released(ticket, now=1.0)
    # A set seen before the bound keeps its own series.
    accounting.granted(9, LIMIT, StepLabels.of("d0", "f", "t"), slots=1, waited_s=0, now=0)
    # The bound is per limit.
    accounting.granted(10, "gpu:w-2", StepLabels.of("d4", "f", "t"), slots=1, waited_s=0, now=0)
    usage = accounting.usage(now=1.0)
    sets = sorted(labels for limit, labels in usage if limit == LIMIT)
    assert sets == sorted([*(StepLabels.of(f"d{i}", "f", "t") for i in range(3)), OVERFLOW])
    assert usage[(LIMIT, OVERFLOW)].steps == 2
    assert usage[(LIMIT, OVERFLOW)].held_slot_s == 2.0
    assert usage[(LIMIT, StepLabels.of("d0", "f", "t"))].steps == 2
    assert ("gpu:w-2", StepLabels.of("d4", "f", "t")) in usage


def test_labels_without_values_are_none_and_long_ones_are_cut() -> None:
    assert StepLabels.of("", None, "fit") == StepLabels("none", "none", "fit")
    assert len(StepLabels.of("x" * 500, "f", "t").deployment) == MAX_LABEL_CHARS


def test_an_acquire_without_labels_still_parses() -> None:
    assert parse_acquire({"limit": LIMIT, "occupy": 1}).labels == {}
    assert parse_acquire({"limit": LIMIT, "labels": None}).labels == {}


def test_an_acquire_carries_its_labels() -> None:
    labels = {
        "deployment_id": "0b9f6f7e-4f0a-4c43-9a53-0d4f0bb6f6a1",
        "flow": "pipeline",
        "task": "fit",
    }
    assert parse_acquire({"limit": LIMIT, "labels": labels}).labels == labels


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ({"owner": "x"}, "labels.owner is not a label"),
        ({"flow": 3}, "labels.flow must be a string"),
        ({"task": "t" * (MAX_LABEL_CHARS + 1)}, "labels.task must be a string of at most"),
        ({"deployment_id": "not-a-uuid"}, "labels.deployment_id must be a UUID"),
        (["flow"], "labels must be an object"),
    ],
)
def test_a_bad_labels_field_is_refused_naming_it(labels: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says) as caught:
        parse_acquire({"limit": LIMIT, "labels": labels})
    assert "\n" not in str(caught.value)


def test_nvml_readings_map_to_cuda_positions_by_uuid() -> None:
    samples = [GpuSample(0.0, 0, 20.0, 512.0, 1024.0), GpuSample(0.0, 1, 80.0, 256.0, 1024.0)]
    found = readings_by_position(samples, ["GPU-a", "GPU-b"], ["GPU-b", "GPU-gone", ""])
    assert found[0] == GpuReading(0.8, 256 * 1024**2, 1024**3)
    assert 1 not in found  # a GPU NVML does not list has no reading
    assert 2 not in found  # no UUID, and NVML has no device 2
    assert readings_by_position(samples, ["GPU-a", "GPU-b"], ["", ""])[1].utilization == 0.8


class _FakeNvml:
    """NVML as the sampler uses it: two GPUs; the first read fails, the rest work."""

    gpus = 2
    uuids = ("GPU-a", "GPU-b")

    def __init__(self) -> None:
        self.reads = 0
        self.closed = False

    def read(self, now: float) -> list[GpuSample]:
        self.reads += 1
        if self.reads == 1:
            raise RuntimeError("GPU is lost")
        return [GpuSample(now, 0, 50.0, 1.0, 2.0), GpuSample(now, 1, 0.0, 0.0, 2.0)]

    def close(self) -> None:
        self.closed = True


def test_the_worker_sampler_feeds_readings_and_says_a_failure_once() -> None:
    nvml = _FakeNvml()
    fed: list[dict[int, GpuReading]] = []
    said: list[str] = []

    async def scenario() -> None:
        done = asyncio.Event()

        def feed(readings: dict[int, GpuReading]) -> None:
            fed.append(readings)
            if len(fed) == 2:
                done.set()

        task = asyncio.ensure_future(
            feed_gpu_readings(feed, ["GPU-a", "GPU-b"], 0.001, lambda: nvml, said.append)
        )
        await done.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert said == ["NVML read failed: GPU is lost"]
    assert fed[0][0].utilization == 0.5
    assert fed[0][1].utilization == 0.0
    assert nvml.closed


def test_the_worker_sampler_without_nvml_says_why_and_returns() -> None:
    said: list[str] = []

    def no_nvml() -> Any:
        raise OSError("libnvidia-ml.so.1 not found")

    asyncio.run(feed_gpu_readings(lambda readings: None, [""], 0.001, no_nvml, said.append))
    assert said == [
        "GPU accounting without utilisation or memory: NVML unavailable: "
        "libnvidia-ml.so.1 not found"
    ]
