"""The GPU step's model on its CPU configuration: calibration and work counted in batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pgw_flows.model import (
    CPU_CONFIG,
    CPU_WORK_CAP_S,
    CUDA_CONFIG,
    Engine,
    batches_for,
    build_model,
    cached_seconds_per_batch,
    calibrate,
    config_for,
    synthetic_tokens,
    work_target_s,
)


def test_batches_for_is_the_fewest_whole_batches_reaching_the_target() -> None:
    assert batches_for(3.0, 0.02) == 150
    assert batches_for(3.0, 0.021) == 143  # 142 batches would be 2.982 s
    assert batches_for(0.001, 0.5) == 1
    assert batches_for(0.0, 0.5) == 1
    with pytest.raises(ValueError, match="positive"):
        batches_for(1.0, 0.0)


def test_work_target_is_all_of_gpu_seconds_on_cuda_and_capped_on_the_cpu() -> None:
    assert work_target_s(30.0, "cuda") == 30.0
    assert work_target_s(30.0, "cpu") == CPU_WORK_CAP_S
    assert work_target_s(0.2, "cpu") == 0.2


def test_configs_by_device() -> None:
    assert config_for("cuda") == config_for("cuda:0") == CUDA_CONFIG
    assert config_for("cpu") == CPU_CONFIG
    # BERT-base-sized: the parameter count the docs quote matches the built model.
    assert 100e6 < CUDA_CONFIG.parameters < 120e6
    model = build_model(CPU_CONFIG)
    assert sum(p.numel() for p in model.parameters()) == CPU_CONFIG.parameters


def test_calibration_on_the_cpu_picks_batches_that_meet_the_target() -> None:
    target = 0.3
    result = calibrate(target, device="cpu", probe_s=0.05)

    assert (result.config, result.device, result.target_s) == (CPU_CONFIG.name, "cpu", target)
    assert result.seconds_per_batch > 0
    # Enough batches at the measured rate, and not one more than needed.
    assert result.batches * result.seconds_per_batch >= target
    assert (result.batches - 1) * result.seconds_per_batch < target
    # The engine runs exactly that work and labels the items it was given.
    items = [synthetic_tokens(i) for i in range(3)]
    done = Engine(build_model(CPU_CONFIG), CPU_CONFIG, "cpu").run(result.batches, items)
    assert done.batches == result.batches
    assert len(done.labels) == 3
    assert done.peak_memory_mib is None  # no allocator statistics off CUDA


def test_calibration_target_on_the_cpu_is_capped() -> None:
    result = calibrate(60.0, device="cpu", probe_s=0.02)
    assert result.target_s == CPU_WORK_CAP_S
    assert result.batches * result.seconds_per_batch >= CPU_WORK_CAP_S


def test_items_beyond_one_batch_run_in_extra_batches() -> None:
    items = [synthetic_tokens(i) for i in range(CPU_CONFIG.batch_size + 1)]
    done = Engine(build_model(CPU_CONFIG), CPU_CONFIG, "cpu").run(1, items)
    assert done.batches == 2
    assert len(done.labels) == len(items)


def test_seconds_per_batch_are_measured_once_and_cached(tmp_path: Path) -> None:
    engine = Engine(build_model(CPU_CONFIG), CPU_CONFIG, "cpu")
    first = cached_seconds_per_batch(engine, 0.02, tmp_path)
    (cached,) = (tmp_path / "calibration").glob("*.json")
    assert json.loads(cached.read_text())["seconds_per_batch"] == first
    # A planted value proves the second call reads the file instead of measuring.
    cached.write_text(json.dumps({"seconds_per_batch": 123.0}))
    assert cached_seconds_per_batch(engine, 0.02, tmp_path) == 123.0
