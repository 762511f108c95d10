"""GPU telemetry: NVML sampled in a background thread, and pure summaries of the samples.

:class:`GpuSampler` reads utilisation and memory of every GPU about four times
a second while the demo or the bench runs; :func:`feed_gpu_readings` reads
them once a second in a worker for its broker's accounting
(``slots/accounting.py``). Without NVML (no driver, no GPU) it
starts nothing and says why in one line; callers report that instead of
numbers. :func:`summarize_samples` and :func:`held_intervals` are pure: the
samples and the stage records in, means and peaks out.

NVML's utilisation is the share of its last sample period (1/6 s to 1 s by
GPU) during which a kernel ran, so it says "busy", not "how much of the SMs".
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.slots.accounting import GpuReading

DEFAULT_INTERVAL_S = 0.25


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU; ``time`` is wall-clock (``time.time()``), as in the records."""

    time: float
    gpu: int
    utilization_pct: float
    memory_used_mib: float
    memory_total_mib: float


class _Nvml:
    """The few NVML calls the sampler needs; raises on any NVML failure."""

    def __init__(self) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception:
            pynvml.nvmlShutdown()
            raise
        self.uuids = tuple(_uuid(pynvml, handle) for handle in self._handles)

    @property
    def gpus(self) -> int:
        return len(self._handles)

    def read(self, now: float) -> list[GpuSample]:
        samples = []
        for index, handle in enumerate(self._handles):
            rates = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            samples.append(
                GpuSample(
                    time=now,
                    gpu=index,
                    utilization_pct=float(rates.gpu),
                    memory_used_mib=int(memory.used) / (1024 * 1024),
                    memory_total_mib=int(memory.total) / (1024 * 1024),
                )
            )
        return samples

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def _uuid(pynvml: Any, handle: Any) -> str:
    """The GPU's ``GPU-...`` UUID; empty when NVML will not say."""
    try:
        value = pynvml.nvmlDeviceGetUUID(handle)
    except Exception:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _open_nvml() -> _Nvml:
    return _Nvml()


# How often a worker reads its GPUs for its broker's accounting (NVML's own
# utilisation is an average over up to a second: reading faster adds nothing).
WORKER_SAMPLE_S = 1.0
MIB = 1024 * 1024


def readings_by_position(
    samples: Sequence[GpuSample], nvml_uuids: Sequence[str], worker_uuids: Sequence[str]
) -> dict[int, GpuReading]:
    """NVML's readings (by NVML index) as the worker's GPUs (by CUDA position); pure.

    A worker GPU of known UUID gets the NVML device of that UUID; one without
    (stated capacity) the NVML device of its position's index (CUDA's order is
    NVML's when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or on one GPU). A GPU NVML
    cannot read (a MIG instance: NVML has no utilisation for it) has none.

    Example:
        >>> a = GpuSample(0.0, 0, 50.0, 1024.0, 2048.0)
        >>> b = GpuSample(0.0, 1, 100.0, 0.0, 2048.0)
        >>> found = readings_by_position([a, b], ["GPU-a", "GPU-b"], ["GPU-b", "GPU-a"])
        >>> {position: reading.utilization for position, reading in found.items()}
        {0: 1.0, 1: 0.5}
        >>> found[1].memory_used_bytes
        1073741824
    """
    by_index = {sample.gpu: sample for sample in samples}
    readings: dict[int, GpuReading] = {}
    for position, uuid in enumerate(worker_uuids):
        index = nvml_uuids.index(uuid) if uuid and uuid in nvml_uuids else position
        sample = by_index.get(index) if not uuid or uuid in nvml_uuids else None
        if sample is None:
            continue
        readings[position] = GpuReading(
            utilization=min(max(sample.utilization_pct / 100.0, 0.0), 1.0),
            memory_used_bytes=round(sample.memory_used_mib * MIB),
            memory_total_bytes=round(sample.memory_total_mib * MIB),
        )
    return readings


async def feed_gpu_readings(
    feed: Callable[[dict[int, GpuReading]], None],
    worker_uuids: Sequence[str],
    interval_s: float = WORKER_SAMPLE_S,
    open_nvml: Callable[[], Any] = _open_nvml,
    say: Callable[[str], None] = print,
) -> None:
    """Read the worker's GPUs every ``interval_s`` and ``feed`` the readings, until cancelled.

    Without NVML it says why once and returns (the accounting then has no busy
    or memory figures). A failed read is said once per distinct reason and
    tried again at the next interval (a GPU may come back); NVML's calls run
    in a thread, so a slow driver never holds the event loop.
    """
    try:
        nvml = await asyncio.to_thread(open_nvml)
    except Exception as exc:  # ImportError, NVMLError, OSError: all mean "no readings"
        say(f"GPU accounting without utilisation or memory: NVML unavailable: {exc}")
        return
    said: set[str] = set()
    try:
        if nvml.gpus == 0:
            say("GPU accounting without utilisation or memory: NVML reports 0 GPUs")
            return
        uuids = tuple(getattr(nvml, "uuids", ()) or ("",) * nvml.gpus)
        while True:
            try:
                samples = await asyncio.to_thread(nvml.read, time.time())
            except Exception as exc:
                reason = f"NVML read failed: {exc}"
                if reason not in said:
                    said.add(reason)
                    say(reason)
            else:
                feed(readings_by_position(samples, uuids, worker_uuids))
            await asyncio.sleep(interval_s)
    finally:
        nvml.close()


class GpuSampler:
    """Samples every GPU every ``interval_s`` in a daemon thread between start and stop.

    Example:
        >>> with GpuSampler() as sampler:  # doctest: +SKIP
        ...     run_the_batch()
        >>> sampler.samples  # doctest: +SKIP

    ``open_nvml`` is the NVML opener; tests pass one that fails.
    """

    def __init__(
        self,
        interval_s: float = DEFAULT_INTERVAL_S,
        open_nvml: Callable[[], Any] = _open_nvml,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval must be positive, got {interval_s}")
        self.interval_s = interval_s
        self._open_nvml = open_nvml
        self._nvml: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._samples: list[GpuSample] = []
        self.unavailable_reason: str | None = None
        self.error: str | None = None

    @property
    def available(self) -> bool:
        """True once started with NVML and at least one GPU."""
        return self._nvml is not None

    @property
    def samples(self) -> list[GpuSample]:
        with self._lock:
            return list(self._samples)

    def start(self) -> GpuSampler:
        """Open NVML and start sampling; without NVML or GPUs, record why and do nothing."""
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        try:
            nvml = self._open_nvml()
        except Exception as exc:  # ImportError, NVMLError, OSError: all mean "no telemetry"
            self.unavailable_reason = f"NVML unavailable: {exc or type(exc).__name__}"
            return self
        if nvml.gpus == 0:
            nvml.close()
            self.unavailable_reason = "NVML reports 0 GPUs"
            return self
        self._nvml = nvml
        self._thread = threading.Thread(target=self._loop, name="gpu-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        # Event.wait paces the loop and ends it the moment stop() is called.
        while True:
            try:
                readings = self._nvml.read(time.time())
            except Exception as exc:  # a GPU fell off the bus: keep what we have
                self.error = f"sampling stopped: {exc}"
                return
            with self._lock:
                self._samples.extend(readings)
            if self._stop.wait(self.interval_s):
                return

    def stop(self) -> list[GpuSample]:
        """Stop sampling, close NVML, return the samples (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._nvml is not None:
            self._nvml.close()
            self._nvml = None
        return self.samples

    def __enter__(self) -> GpuSampler:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------- summaries


def first_visible_gpu(environ: Mapping[str, str]) -> int | None:
    """NVML index of the GPU that ``cuda:0`` is, when the environment says; else None.

    NVML numbers GPUs in PCI bus order, CUDA by default fastest first; the two
    agree on one GPU, or when ``CUDA_DEVICE_ORDER=PCI_BUS_ID``. A UUID in
    ``CUDA_VISIBLE_DEVICES`` is not resolved here (None: use every GPU).

    Example:
        >>> first_visible_gpu({"CUDA_VISIBLE_DEVICES": "3,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
        3
    """
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    ordered = environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
    if visible is None:
        return 0 if ordered else None
    first = visible.split(",")[0].strip()
    return int(first) if first.isdigit() and ordered else None


def held_intervals(records: Iterable[StageRecord]) -> list[tuple[float, float]]:
    """The union of every GPU step's ``[start, end)``: when at least one step held a slot."""
    spans = sorted((r.start, r.end) for r in records if r.stage == "gpu" and r.end > r.start)
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _inside(moment: float, intervals: Sequence[tuple[float, float]]) -> bool:
    return any(start <= moment < end for start, end in intervals)


@dataclass(frozen=True)
class TelemetrySummary:
    """Utilisation (percent, all GPUs together) and memory (MiB, the fullest GPU)."""

    gpus: int
    samples: int
    mean_utilization_pct: float
    peak_utilization_pct: float
    # None when no sample fell while a GPU step was held.
    held_mean_utilization_pct: float | None
    held_peak_utilization_pct: float | None
    held_samples: int
    peak_memory_used_mib: float
    memory_total_mib: float


def summarize_samples(
    samples: Sequence[GpuSample],
    held: Sequence[tuple[float, float]] = (),
    window: tuple[float, float] | None = None,
    gpus: Collection[int] | None = None,
) -> TelemetrySummary | None:
    """Means and peaks over ``window`` (default: all samples) and over ``held`` intervals.

    ``gpus`` keeps only those NVML indices (default: every GPU), e.g. the one
    GPU the steps ran on, so that idle GPUs do not dilute the mean. Returns
    None when no sample is left.
    """
    chosen = [
        s
        for s in samples
        if (window is None or window[0] <= s.time <= window[1]) and (gpus is None or s.gpu in gpus)
    ]
    if not chosen:
        return None
    during = [s for s in chosen if _inside(s.time, held)]
    utilization = [s.utilization_pct for s in chosen]
    held_utilization = [s.utilization_pct for s in during]
    return TelemetrySummary(
        gpus=len({s.gpu for s in chosen}),
        samples=len(chosen),
        mean_utilization_pct=sum(utilization) / len(utilization),
        peak_utilization_pct=max(utilization),
        held_mean_utilization_pct=(
            sum(held_utilization) / len(held_utilization) if held_utilization else None
        ),
        held_peak_utilization_pct=max(held_utilization) if held_utilization else None,
        held_samples=len(during),
        peak_memory_used_mib=max(s.memory_used_mib for s in chosen),
        memory_total_mib=max(s.memory_total_mib for s in chosen),
    )


def describe_telemetry(summary: TelemetrySummary | None, unavailable_reason: str | None) -> str:
    """One line for the report: the figures, or why there are none."""
    if summary is None:
        if unavailable_reason:
            return f"no GPU: telemetry off ({unavailable_reason})"
        return "GPU telemetry: no samples"
    held = (
        "-"
        if summary.held_mean_utilization_pct is None
        else f"{summary.held_mean_utilization_pct:.0f}% mean, "
        f"{summary.held_peak_utilization_pct or 0:.0f}% peak"
    )
    return (
        f"GPU telemetry ({summary.gpus} GPU(s), {summary.samples} samples): utilisation "
        f"{summary.mean_utilization_pct:.0f}% mean / {summary.peak_utilization_pct:.0f}% peak "
        f"over the run, {held} while GPU steps were held; memory peak "
        f"{summary.peak_memory_used_mib:.0f} of {summary.memory_total_mib:.0f} MiB"
    )
