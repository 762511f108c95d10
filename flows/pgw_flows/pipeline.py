"""The seed pipeline: download -> inference (GPU, per-worker limit) -> save.

Only the inference task holds a slot of ``{limit_prefix}:{WORKER_ID}``; download
and save are I/O and run free, so they overlap across all flow runs a worker
has in flight while the GPU stays within its limit.

Stage durations are minimums: a stage does its work, then sleeps out the rest
of its duration. With ``simulate`` the work is skipped (no torch import), so a
benchmark measures coordination, not this machine's CPU.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.limits import gpu_slot
from prefect_gpu_workers.naming import WORKER_ID_ENV, limit_prefix_from_env
from prefect_gpu_workers.records import StageRecord, append_record, record_dir_from

FLOW_NAME = "gpu-pipeline"
# The signature below takes its defaults from here: the parameters are defined once.
_DEFAULTS = PipelineParams()


class InjectedGpuFailure(RuntimeError):
    """Raised inside the GPU step on request, to show that a failing step frees its slot."""


@dataclass(frozen=True)
class Batch:
    items: list[int]
    # Empty when simulating: nothing downstream looks at pixels then.
    images: list[list[float]] = field(default_factory=list)


@dataclass(frozen=True)
class Inference:
    labels: list[int]
    device: str
    limit: str
    gpu_start: float
    gpu_end: float


def _worker_id() -> str:
    # Records only; the GPU step itself insists on a valid WORKER_ID (limits.py).
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
    """Fetch the inputs (synthetic images here: the machine has no data source)."""
    start = time.time()
    ids = list(range(items))
    images: list[list[float]] = []
    if not simulate:
        from pgw_flows.model import synthetic_image

        images = [synthetic_image(i) for i in ids]
    _sleep_until(start + seconds)
    _record(record_dir, StageRecord(run_id, _worker_id(), "download", start, start, time.time()))
    return Batch(ids, images)


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
) -> Inference:
    """The GPU step: everything that touches the GPU happens inside the slot."""
    model = None
    if not simulate:
        from pgw_flows.model import build_model, classify

        # CPU-side preparation (torch import, weights) before taking the slot.
        model = build_model()
    requested = time.time()
    with gpu_slot(occupy, limit_prefix=limit_prefix) as limit:
        start = time.time()
        device: str | None = None
        try:
            if fail:
                raise InjectedGpuFailure(f"injected failure while holding {limit}")
            if simulate:
                labels, device = [i % 10 for i in batch.items], "simulated"
            else:
                predictions = classify(batch.images, model)
                labels, device = predictions.labels, predictions.device
            _sleep_until(start + seconds)
        finally:
            # Recorded inside the slot, also when the step fails or is cancelled,
            # so the interval never claims more than the slot covered.
            end = time.time()
            _record(
                record_dir,
                StageRecord(
                    run_id, _worker_id(), "gpu", requested, start, end, occupy, limit, device
                ),
            )
    return Inference(labels, device or "unknown", limit, start, end)


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
) -> dict[str, Any]:
    """Download ``items`` inputs, classify them holding ``occupy`` GPU slots, save.

    The parameters are :class:`pgw_flows.params.PipelineParams`' fields (build
    a run's parameters with ``PipelineParams(...).as_parameters()``):
    ``limit_prefix`` is the limit prefix (default: ``PGW_LIMIT_PREFIX``, else
    ``gpu``); ``record_dir`` (or ``PGW_RECORD_DIR``) receives one JSON line per stage;
    ``fail_in_gpu_step`` raises inside the slot (fault injection for tests).
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
    }
