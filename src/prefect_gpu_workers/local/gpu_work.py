"""Local mode's side of the real GPU step: calibration, memory shares, what steps used.

The demo calibrates the GPU step once, before it submits any flow run (so
outside every slot, on an idle GPU), in a Python process of its own: that
process's CUDA context and memory are gone when it exits, and the demo itself
never imports torch. The flow runs then get the batch count as a parameter.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pgw_flows.model import CPU_WORK_CAP_S
from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.report import percentile
from prefect_gpu_workers.telemetry import first_visible_gpu

# Share of a GPU's memory that the GPU steps sharing it may set aside in all;
# the rest is for CUDA contexts (about 0.5 GiB per process) and fragmentation.
MEMORY_HEADROOM = 0.85


@dataclass(frozen=True)
class StepCalibration:
    """What ``python -m pgw_flows.model calibrate`` measured (see ``pgw_flows.model``)."""

    config: str
    device: str
    device_name: str
    seconds_per_batch: float
    target_s: float
    batches: int
    tflops: float

    def describe(self) -> str:
        return (
            f"{self.config} on {self.device_name}: {self.seconds_per_batch * 1000:.1f} ms per "
            f"batch ({self.tflops:.0f} TFLOP/s), {self.batches} batches = "
            f"{self.batches * self.seconds_per_batch:.1f} s of work per GPU step on an idle GPU"
        )


def calibrate_gpu_step(
    gpu_s: float,
    device: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 300.0,
) -> StepCalibration:
    """Measure the GPU step's model in a child process; raises ``RuntimeError`` if it fails.

    ``device`` defaults to CUDA when torch sees one, else the CPU.
    """
    command = [sys.executable, "-m", "pgw_flows.model", "calibrate", "--seconds", str(gpu_s)]
    if device is not None:
        command += ["--device", device]
    done = subprocess.run(
        command,
        env=dict(env) if env is not None else None,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"calibrating the GPU step failed (exit {done.returncode}):\n{tail}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return StepCalibration(
        config=str(data["config"]),
        device=str(data["device"]),
        device_name=str(data["device_name"]),
        seconds_per_batch=float(data["seconds_per_batch"]),
        target_s=float(data["target_s"]),
        batches=int(data["batches"]),
        tflops=float(data["tflops"]),
    )


def step_memory_fraction(steps_per_gpu: int, headroom: float = MEMORY_HEADROOM) -> float:
    """The share of a GPU's memory each step may take when ``steps_per_gpu`` steps share it.

    Local workers all run their steps on the machine's first GPU, so there
    ``steps_per_gpu`` is every local worker's slots together.

    Example:
        >>> step_memory_fraction(4)
        0.2125
    """
    if steps_per_gpu < 1:
        raise ValueError(f"steps per GPU must be at least 1, got {steps_per_gpu}")
    return headroom / steps_per_gpu


def step_gpus(environ: Mapping[str, str]) -> set[int] | None:
    """NVML indices of the GPU local GPU steps run on (``cuda:0``); None: not known, all."""
    index = first_visible_gpu(environ)
    return None if index is None else {index}


def gpu_steps(records: Iterable[StageRecord]) -> list[StageRecord]:
    return [r for r in records if r.stage == "gpu"]


def peak_step_memory_mib(records: Iterable[StageRecord]) -> float | None:
    """The most GPU memory one step's allocator held (None: no step reported any)."""
    peaks = [r.peak_memory_mib for r in gpu_steps(records) if r.peak_memory_mib is not None]
    return max(peaks) if peaks else None


def step_errors(records: Iterable[StageRecord]) -> Counter[str]:
    """GPU steps that failed, by exception type (``"OutOfMemoryError"``, ...)."""
    return Counter(r.error.split(":", 1)[0] for r in gpu_steps(records) if r.error)


@dataclass(frozen=True)
class StepDurations:
    """GPU-step seconds (successful steps), to compare with the calibrated work."""

    count: int
    p50_s: float | None
    max_s: float | None


def step_durations(records: Iterable[StageRecord]) -> StepDurations:
    seconds = [r.end - r.start for r in gpu_steps(records) if not r.error]
    return StepDurations(len(seconds), percentile(seconds, 50), max(seconds, default=None))


def no_limit_refusal(gpus_detected: int, simulate: bool) -> str | None:
    """Why ``demo --no-limit`` cannot run here, or None when it can.

    Without a GPU the steps run a small model on the CPU and sleep: running
    them without the limit shows nothing about GPUs, so the demo refuses.
    """
    if gpus_detected == 0:
        return (
            "demo --no-limit needs an NVIDIA GPU: it runs the real GPU steps without the "
            "limit to show what happens to the GPU (out-of-memory failures, slower steps), "
            "and no GPU was found here"
        )
    if simulate:
        return "demo --no-limit runs the real GPU steps; drop --simulate"
    return None


@dataclass(frozen=True)
class GpuStepPlan:
    """The work and memory each GPU step of a demo gets, and how to say it."""

    batches: int | None
    memory_fraction: float
    description: str


def plan_gpu_step(
    gpu_s: float,
    steps_per_gpu: int,
    calibration: StepCalibration | None,
    memory_fraction: float | None = None,
) -> GpuStepPlan:
    """Batches that make ``gpu_s`` while ``steps_per_gpu`` steps share the GPU, and memory.

    Each step saturates the GPU on its own, so ``steps_per_gpu`` steps at once
    each take about that many times longer than one alone: the batches are
    calibrated for ``gpu_s / steps_per_gpu`` on an idle GPU. Without a
    calibration (no GPU) the flow runs calibrate on the CPU themselves.
    """
    if calibration is None:
        work_s = min(gpu_s, CPU_WORK_CAP_S)
        return GpuStepPlan(
            None,
            0.0,
            f"a small encoder on the CPU (no GPU), {work_s:g} s of real work per step, "
            f"then it sleeps out the rest of its {gpu_s:g} s",
        )
    fraction = step_memory_fraction(steps_per_gpu) if memory_fraction is None else memory_fraction
    alone_s = calibration.batches * calibration.seconds_per_batch
    return GpuStepPlan(
        calibration.batches,
        fraction,
        f"{calibration.config} on {calibration.device_name}, {calibration.batches} batches "
        f"({calibration.seconds_per_batch * 1000:.1f} ms each, {calibration.tflops:.0f} "
        f"TFLOP/s): {alone_s:.1f} s alone, about {alone_s * steps_per_gpu:.1f} s with the "
        f"{steps_per_gpu} steps the limits allow sharing the GPU; each step sets aside "
        f"{fraction:.0%} of the GPU's memory",
    )


def check_timeline_paths(paths: Iterable[Path]) -> None:
    """Fail before anything starts if a timeline cannot be written.

    Raises:
        ValueError: an extension other than .png / .html.
        RuntimeError: the plotting library for it is missing (the ``viz`` extra).
    """
    for path in paths:
        suffix = path.suffix.lower()
        if suffix not in (".png", ".html", ".htm"):
            raise ValueError(f"timeline file must end in .png or .html, got {path.name!r}")
        module = "matplotlib" if suffix == ".png" else "plotly"
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(
                f"{path.name} needs {module}: install the viz extra "
                "(pip install 'prefect-gpu-workers[viz]')"
            )
