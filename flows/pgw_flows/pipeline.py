"""The seed pipeline: download -> inference (GPU, per-worker limit) -> save.

Only the inference task holds a slot of ``{limit_prefix}:{WORKER_ID}``; download
and save are I/O and run free, so they overlap across all flow runs a worker
has in flight while the GPU stays within its limit.

Download and save durations are minimums: the stage does its work, then
sleeps out the rest. The GPU step on CUDA is timed by work done: it runs a
fixed number of encoder batches (``gpu_batches``, calibrated once so that they
take about ``gpu_s`` on an idle GPU; see :mod:`pgw_flows.model`) and never
sleeps, so a step that shares its GPU with too many others takes longer. On the
CPU it does at most ``model.CPU_WORK_CAP_S`` of real work and sleeps out the
rest of ``gpu_s``. With ``simulate`` the work is skipped (no torch import), so a
benchmark measures coordination, not this machine's CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.exceptions import MissingContextError
from prefect.runtime import flow_run

from pgw_flows.artifacts import artifacts_enabled, publish_gpu_step
from pgw_flows.params import PipelineParams
from prefect_gpu_workers.naming import LAUNCHED_AT_ENV, WORKER_ID_ENV, limit_prefix_from_env
from prefect_gpu_workers.records import StageRecord, append_record, record_dir_from
from prefect_gpu_workers.slots.client import GpuGrant, gpu_slot

FLOW_NAME = "gpu-pipeline"
# The signature below takes its defaults from here: the parameters are defined once.
_DEFAULTS = PipelineParams()


class InjectedGpuFailure(RuntimeError):
    """Raised inside the GPU step on request, to show that a failing step frees its slot."""


@dataclass(frozen=True)
class Batch:
    items: list[int]
    # Token ids per item; empty when simulating: nothing downstream looks at them then.
    tokens: list[list[int]] = field(default_factory=list)


@dataclass(frozen=True)
class Inference:
    labels: list[int]
    device: str
    # None when the step ran without a limit (``unlimited``).
    limit: str | None
    gpu_start: float
    gpu_end: float
    batches: int | None = None
    peak_memory_mib: float | None = None


def _worker_id() -> str:
    # Records only; the GPU step itself insists on a valid WORKER_ID (slots/client.py).
    return os.environ.get(WORKER_ID_ENV, "")


def _sleep_until(deadline: float) -> None:
    remaining = deadline - time.time()
    if remaining > 0:
        time.sleep(remaining)


# NO_CACHE: two runs with the same parameters must both do the GPU work; a
# cache hit would skip the slot and hide what the limit does.
@task(cache_policy=NO_CACHE)
def download(
    run_id: str, items: int, seconds: float, simulate: bool, record_dir: str | None
) -> Batch:
    """Fetch the inputs (synthetic token ids here: the machine has no data source)."""
    start = time.time()
    start_cpu_s = time.process_time()  # the run's start-up, in this process's CPU
    ids = list(range(items))
    tokens: list[list[int]] = []
    if not simulate:
        from pgw_flows.model import synthetic_tokens

        tokens = [synthetic_tokens(i) for i in ids]
    _sleep_until(start + seconds)
    launched = os.environ.get(LAUNCHED_AT_ENV)
    record = StageRecord(
        run_id, _worker_id(), "download", start, start, time.time(),
        launched=float(launched) if launched else None, start_cpu_s=start_cpu_s,
    )  # fmt: skip
    _record(record_dir, record)
    return Batch(ids, tokens)


@contextlib.contextmanager
def _no_slot() -> Iterator[None]:
    yield None


@task(cache_policy=NO_CACHE)
def inference(
    run_id: str,
    batch: Batch,
    occupy: int,
    limit_prefix: str,
    seconds: float,
    simulate: bool,
    record_dir: str | None,
    fail: bool = False,
    batches: int | None = None,
    memory_fraction: float = 0.0,
    unlimited: bool = False,
    gpu_memory: str | None = None,
    gpu_also: dict[str, int] | None = None,
    artifacts: bool = True,
) -> Inference:
    """The GPU step: everything that touches the GPU happens inside the slot.

    ``batches`` is the work (None: calibrate once per machine, cached in a
    file; on CUDA that first calibration runs inside the slot because it uses
    the GPU). ``memory_fraction`` of the device's memory is set aside for the
    step's working set. ``unlimited`` takes no slot at all: only for showing
    what the limit prevents (``demo --no-limit``). With ``artifacts`` the
    step publishes its table artifact once its slot is given back, also when
    it failed, but not when it was stopped (SIGTERM, Ctrl-C: no API call while
    the process is being stopped).
    """
    recorded: list[StageRecord] = []
    try:
        result = _inference(
            run_id, batch, occupy, limit_prefix, seconds, simulate, record_dir, fail, batches,
            memory_fraction, unlimited, gpu_memory, gpu_also, recorded,
        )  # fmt: skip
    except Exception:
        # A failed step's table says why; a stop (BaseException) publishes nothing.
        if artifacts and recorded:
            _publish(recorded[0])
        raise
    if artifacts and recorded:
        _publish(recorded[0])
    return result


def _publish(record: StageRecord) -> None:
    try:
        run_logger = get_run_logger()
    except MissingContextError:
        return  # called outside a run (the task's ``.fn``): no run to publish on
    publish_gpu_step(record, _device_uuid(record.device), run_logger)


def _inference(
    run_id: str,
    batch: Batch,
    occupy: int,
    limit_prefix: str,
    seconds: float,
    simulate: bool,
    record_dir: str | None,
    fail: bool,
    batches: int | None,
    memory_fraction: float,
    unlimited: bool,
    gpu_memory: str | None,
    gpu_also: dict[str, int] | None,
    recorded: list[StageRecord],
) -> Inference:
    """The GPU step's work; its record is appended to ``recorded`` inside the slot."""
    began = time.time()
    model: Any = None
    device: str | None = None
    if not simulate:
        from pgw_flows import model as encoder

        # CPU-side preparation (torch import, weights) before taking the slot.
        device = encoder.default_device()
        config = encoder.config_for(device)
        model = encoder.build_model(config)
        if batches is None and not device.startswith("cuda"):
            batches = _calibrated_batches(encoder.Engine(model, config, device), seconds)
    requested = time.time()
    slot = (
        _no_slot()
        if unlimited
        else gpu_slot(occupy, memory=gpu_memory, also=gpu_also, limit_prefix=limit_prefix)
    )
    with slot as limit:
        start = time.time()
        placed_on = (
            limit.device if isinstance(limit, GpuGrant) and limit.position is not None else None
        )
        if placed_on is not None and device is not None and device.startswith("cuda"):
            device = placed_on  # the GPU the broker placed the step on
        work: Any = None
        engine: Any = None
        error: str | None = None
        try:
            if fail:
                raise InjectedGpuFailure(f"injected failure while holding {limit}")
            if simulate or device is None:
                labels, device = [i % 10 for i in batch.items], "simulated"
            else:
                engine = encoder.Engine(model, config, device)
                # After the weights are on the device: a reset peak starts at
                # what is allocated now, so the weights still count.
                encoder.reset_peak_memory(device)
                if batches is None:
                    batches = _calibrated_batches(engine, seconds)
                work = engine.run(batches, batch.tokens, memory_fraction)
                labels, device = work.labels, work.device
            if not device.startswith("cuda"):
                # Only CUDA work is timed by work done; elsewhere gpu_s is a minimum.
                _sleep_until(start + seconds)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            peak = work.peak_memory_mib if work is not None else _peak_memory(device)
            if engine is not None:
                # Inside the slot: the next step to get it must find the memory free.
                with contextlib.suppress(Exception):
                    engine.close()
            # Recorded inside the slot, also when the step fails or is cancelled,
            # so the interval never claims more than the slot covered.
            end = time.time()
            record = StageRecord(
                run_id,
                _worker_id(),
                "gpu",
                requested,
                start,
                end,
                occupy,
                limit,
                device,
                peak_memory_mib=peak,
                batches=work.batches if work is not None else None,
                error=error,
                prepare_s=requested - began,
                memory_gib=limit.memory_gib if isinstance(limit, GpuGrant) else None,
                placed_on=placed_on,
            )
            if record.over_declared:
                get_run_logger().warning(
                    "the GPU step used %.0f MiB at its peak, more than the %d GiB it declared: "
                    "steps placed beside it may run out of memory",
                    record.peak_memory_mib,
                    record.memory_gib,
                )
            _record(record_dir, record)
            recorded.append(record)
    batches_run = work.batches if work is not None else None
    limit_used = None if limit is None else str(limit)  # a plain str: results are serialized
    return Inference(labels, device or "unknown", limit_used, start, end, batches_run, peak)


def _calibrated_batches(engine: Any, gpu_s: float) -> int:
    from pgw_flows import model as encoder

    target = encoder.work_target_s(gpu_s, engine.device.type)
    probe = min(1.0, max(0.1, target / 10))
    seconds = encoder.cached_seconds_per_batch(engine, probe, encoder.cache_dir())
    return encoder.batches_for(target, seconds)


def _device_uuid(device: str | None) -> str | None:
    if device is None or not device.startswith("cuda"):
        return None  # no torch import for a step that never used CUDA
    from pgw_flows.model import device_uuid

    return device_uuid(device)


def _peak_memory(device: str | None) -> float | None:
    if device is None or not device.startswith("cuda"):
        return None
    from pgw_flows.model import peak_memory_mib

    # The step failed; its peak is still worth recording, unless CUDA is what broke.
    with contextlib.suppress(Exception):
        return peak_memory_mib(device)
    return None


@task(cache_policy=NO_CACHE)
def save(run_id: str, result: Inference, seconds: float, record_dir: str | None) -> None:
    """Write the predictions next to the records (if recording), else only log them."""
    start = time.time()
    directory = record_dir_from(record_dir)
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        payload = {"run_id": run_id, "labels": result.labels, "device": result.device}
        (directory / f"{run_id}.result.json").write_text(json.dumps(payload), encoding="utf-8")
    _sleep_until(start + seconds)
    _record(record_dir, StageRecord(run_id, _worker_id(), "save", start, start, time.time()))


def _record(record_dir: str | None, record: StageRecord) -> None:
    directory = record_dir_from(record_dir)
    if directory is not None:
        append_record(directory, record)


@flow(name=FLOW_NAME)
def gpu_pipeline(
    items: int = _DEFAULTS.items,
    occupy: int = _DEFAULTS.occupy,
    limit_prefix: str | None = _DEFAULTS.limit_prefix,
    download_s: float = _DEFAULTS.download_s,
    gpu_s: float = _DEFAULTS.gpu_s,
    save_s: float = _DEFAULTS.save_s,
    simulate: bool = _DEFAULTS.simulate,
    record_dir: str | None = _DEFAULTS.record_dir,
    fail_in_gpu_step: bool = _DEFAULTS.fail_in_gpu_step,
    gpu_batches: int | None = _DEFAULTS.gpu_batches,
    gpu_memory_fraction: float = _DEFAULTS.gpu_memory_fraction,
    unlimited: bool = _DEFAULTS.unlimited,
    gpu_memory: str | None = _DEFAULTS.gpu_memory,
    gpu_also: dict[str, int] | None = _DEFAULTS.gpu_also,
    artifacts: bool | None = _DEFAULTS.artifacts,
) -> dict[str, Any]:
    """Download ``items`` inputs, classify them holding ``occupy`` GPU slots, save.

    The parameters are :class:`pgw_flows.params.PipelineParams`' fields (build
    a run's parameters with ``PipelineParams(...).as_parameters()``):
    ``limit_prefix`` is the limit prefix (default: ``PGW_LIMIT_PREFIX``, else
    ``gpu``); ``record_dir`` (or ``PGW_RECORD_DIR``) receives one JSON line per stage;
    ``fail_in_gpu_step`` raises inside the slot (fault injection for tests).
    ``gpu_batches`` is the GPU step's work in encoder batches (None: calibrated
    for ``gpu_s`` once per machine); ``gpu_memory_fraction`` of the GPU's memory
    is set aside by each step (0: only what the model needs); ``unlimited``
    runs the GPU step without a slot (``demo --no-limit`` only); ``gpu_memory``
    places the GPU step by the memory it declares ("20GiB") and ``gpu_also``
    holds other limits with its slot. ``artifacts`` publishes the GPU step's
    table artifact (None: ``PGW_ARTIFACTS`` on the worker decides, else on).
    """
    run_id = str(flow_run.id or uuid.uuid4())
    batch = download(run_id, items, download_s, simulate, record_dir)
    result = inference(
        run_id,
        batch,
        occupy,
        limit_prefix or limit_prefix_from_env(),
        gpu_s,
        simulate,
        record_dir,
        fail_in_gpu_step,
        gpu_batches,
        gpu_memory_fraction,
        unlimited,
        gpu_memory,
        gpu_also,
        artifacts_enabled(artifacts, os.environ),
    )
    save(run_id, result, save_s, record_dir)
    return {
        "run_id": run_id,
        "worker_id": _worker_id(),
        "limit": result.limit,
        "device": result.device,
        "labels": result.labels,
        "gpu_start": result.gpu_start,
        "gpu_end": result.gpu_end,
        "gpu_batches": result.batches,
        "peak_memory_mib": result.peak_memory_mib,
    }
