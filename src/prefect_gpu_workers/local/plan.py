"""Local mode's decisions, as pure functions: capacity, worker plans, flow runs per worker.

Nothing here starts a process or talks to Prefect, so that the CLI can import
it for its defaults without importing Prefect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.commands import DEFAULT_LAUNCHER
from prefect_gpu_workers.database import DatabaseKind
from prefect_gpu_workers.gpu import Capacity, GpuInventory, resolve_capacity
from prefect_gpu_workers.naming import (
    DEFAULT_LIMIT_PREFIX,
    gib_held,
    limit_name,
    memory_limit_name,
    parse_memory_mib,
    validate_worker_id,
)

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

DEFAULT_POOL = "pgw-local"
DEFAULT_WORKER_PREFIX = "local"
# With no GPU found and none stated, local mode still runs: it says so and
# pretends one GPU shared by two GPU steps, which is enough to show the limit.
FALLBACK_GPUS = 1
DEFAULT_SLOTS_PER_GPU = 2
# The demo's runs: stages long enough that downloads and saves visibly
# overlap while the GPU steps queue for their slots.
DEMO_PIPELINE = PipelineParams(download_s=2.0, gpu_s=3.0, save_s=2.0)
# How long the Prefect API may stay silent before the demo or bench gives up,
# stops everything it started and exits non-zero.
DEFAULT_API_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LocalOptions:
    """What demo, bench and bench --memory-mix share: their workers and names, where
    they keep logs and records, how long they wait, and which server they start."""

    workers: int = 1
    worker_prefix: str = DEFAULT_WORKER_PREFIX
    pool: str = DEFAULT_POOL
    limit_prefix: str = DEFAULT_LIMIT_PREFIX
    worker_query_seconds: float | None = None
    workdir: Path | None = None
    keep_workdir: bool = False
    timeout_s: float = 1800.0
    # Pictures to write at the end (.png or .html).
    timelines: tuple[Path, ...] = ()
    database: DatabaseKind = "postgres"
    api_timeout_s: float = DEFAULT_API_TIMEOUT_S
    launcher: str = DEFAULT_LAUNCHER
    # Publish Prefect artifacts: the report and timeline, and each GPU step's table.
    artifacts: bool = True

    @property
    def step_artifacts(self) -> bool | None:
        """The flow's ``artifacts`` parameter: None leaves it to the worker's
        ``PGW_ARTIFACTS`` (default on); ``--no-artifacts`` turns it off outright."""
        return None if self.artifacts else False


@dataclass(frozen=True)
class WorkerPlan:
    """One local worker: its id, its limit and how many flow runs it takes at once."""

    worker_id: str
    limit_prefix: str
    slots: int
    flow_runs: int
    # False: the worker runs without its slot broker (GPU steps poll Prefect).
    slot_broker: bool = True
    # How its flow runs start: forked from its warm launcher, or as subprocesses.
    launcher: str = DEFAULT_LAUNCHER
    # Its GPUs and each one's memory (whole GiB): with memory, the worker has a
    # memory limit and its broker places GPU steps that declare memory.
    gpus: int = 1
    gpu_memory_gib: int | None = None

    @property
    def limit_name(self) -> str:
        return limit_name(self.worker_id, self.limit_prefix)

    @property
    def memory_limit_name(self) -> str | None:
        """``<prefix>-memory:<worker>`` when the worker places by memory."""
        if self.gpu_memory_gib is None:
            return None
        return memory_limit_name(self.worker_id, self.limit_prefix)

    @property
    def memory_limit_gib(self) -> int:
        return self.gpus * (self.gpu_memory_gib or 0)


@dataclass(frozen=True)
class MemoryMix:
    """The GPU memory a batch's steps declare, and in what proportions.

    Example:
        >>> mix = MemoryMix.parse("8GiB:3,40GiB:1")
        >>> [mix.for_run(i) for i in range(5)]
        ['8GiB', '8GiB', '8GiB', '40GiB', '8GiB']
        >>> mix.mean_gib, mix.largest_gib
        (16.0, 40)
    """

    sizes: tuple[tuple[str, int], ...]  # (size as written, share)

    @classmethod
    def parse(cls, text: str) -> MemoryMix:
        """``SIZE:SHARE,...`` (``8GiB:3,40GiB:1``; a share left out is 1).

        Raises:
            ValueError: a size that does not parse, or a share below 1.
        """
        sizes: list[tuple[str, int]] = []
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            size, _, share = part.partition(":")
            parse_memory_mib(size)
            count = int(share) if share else 1
            if count < 1:
                raise ValueError(f"{part!r}: a share must be at least 1")
            sizes.append((size.strip(), count))
        if not sizes:
            raise ValueError(f"memory mix {text!r} names no size (e.g. 8GiB:3,40GiB:1)")
        return cls(tuple(sizes))

    @property
    def pattern(self) -> tuple[str, ...]:
        """One round of the mix: each size as many times as its share, in order."""
        return tuple(size for size, share in self.sizes for _ in range(share))

    def for_run(self, index: int) -> str:
        """The size the ``index``-th run declares: the pattern, over and over."""
        return self.pattern[index % len(self.pattern)]

    def gib(self, size: str) -> int:
        """What a step of ``size`` holds of a memory limit (whole GiB, rounded up)."""
        return gib_held(parse_memory_mib(size))

    @property
    def largest_gib(self) -> int:
        return max(self.gib(size) for size, _ in self.sizes)

    @property
    def smallest_gib(self) -> int:
        return min(self.gib(size) for size, _ in self.sizes)

    @property
    def mean_gib(self) -> float:
        pattern = self.pattern
        return sum(self.gib(size) for size in pattern) / len(pattern)


def placing_plans(
    plans: tuple[WorkerPlan, ...], mix: MemoryMix, gpus: int, gpu_gib: int
) -> tuple[WorkerPlan, ...]:
    """``plans`` placing by memory on ``gpus`` GPUs of ``gpu_gib`` each, with slots
    enough for their GPUs full of the mix's smallest step: memory, not slots,
    bounds them.

    Example:
        >>> (plan,) = placing_plans(plan_workers(["w-1"], 4, 8), MemoryMix.parse("8GiB"), 2, 80)
        >>> (plan.slots, plan.memory_limit_gib)
        (20, 160)
    """
    slots = gpus * max(1, gpu_gib // mix.smallest_gib)
    return tuple(
        replace(plan, gpus=gpus, gpu_memory_gib=gpu_gib, slots=max(plan.slots, slots))
        for plan in plans
    )


@dataclass(frozen=True)
class CapacityPlan:
    capacity: Capacity
    # What to tell the user about where the slot count came from.
    messages: tuple[str, ...]


def plan_capacity(
    inventory: GpuInventory,
    stated_gpus: int | None = None,
    slots_per_gpu: int | None = None,
) -> CapacityPlan:
    """Slots per local worker: stated, else detected, else the no-GPU fallback (said aloud)."""
    per_gpu = DEFAULT_SLOTS_PER_GPU if slots_per_gpu is None else slots_per_gpu
    if stated_gpus is None and inventory.count == 0:
        capacity = resolve_capacity(inventory, stated_gpus=FALLBACK_GPUS, slots_per_gpu=per_gpu)
        message = (
            f"{inventory.describe()}. Local mode goes on as if each worker had "
            f"{FALLBACK_GPUS} GPU x {per_gpu} slot(s) = {capacity.slots} slot(s); the model runs "
            "on the CPU. Pass --gpus N and --slots-per-gpu M to state the capacity."
        )
        return CapacityPlan(capacity, (message,))
    capacity = resolve_capacity(inventory, stated_gpus=stated_gpus, slots_per_gpu=per_gpu)
    summary = (
        f"capacity {capacity.source}: {capacity.gpus} GPU(s) x {capacity.slots_per_gpu} "
        f"slot(s) = {capacity.slots} slot(s) per worker"
    )
    return CapacityPlan(capacity, (summary, *capacity.notes))


def worker_ids(count: int, prefix: str = DEFAULT_WORKER_PREFIX) -> list[str]:
    """``prefix-1`` .. ``prefix-N``, each a valid worker id.

    Raises:
        ValueError: ``count`` below 1.
        WorkerIdentityError: ``prefix`` makes an invalid worker id.
    """
    if count < 1:
        raise ValueError(f"need at least one worker, got {count}")
    return [validate_worker_id(f"{prefix}-{index}") for index in range(1, count + 1)]


def flow_runs_to_fill(slots: int, download_s: float, gpu_s: float, save_s: float) -> int:
    """Flow runs a worker needs in flight so that its GPU slots never wait for work.

    A run spends ``gpu_s`` of ``download_s + gpu_s + save_s`` on the GPU, so
    each slot needs ``run / gpu`` runs in flight, plus one spare per slot that
    is already waiting when a slot frees (flow-run start-up takes seconds too).
    """
    if slots < 1:
        raise ValueError(f"slots must be at least 1, got {slots}")
    if gpu_s <= 0:
        return 3 * slots
    run_s = download_s + gpu_s + save_s
    return slots * math.ceil(run_s / gpu_s) + slots


def flow_runs_per_worker(
    slots: int, runs: int, workers: int, download_s: float, gpu_s: float, save_s: float
) -> int:
    """A worker's ``--flow-runs`` for a batch of ``runs``: enough to fill its slots, no more
    than its share of the batch (so that the first worker to poll does not take
    every run), and never fewer than its slots."""
    fill = flow_runs_to_fill(slots, download_s, gpu_s, save_s)
    share = math.ceil(runs / workers)
    return max(slots, min(fill, share))


def plan_workers(
    ids: Sequence[str],
    slots: int,
    flow_runs: int,
    limit_prefix: str = DEFAULT_LIMIT_PREFIX,
) -> tuple[WorkerPlan, ...]:
    """One plan per worker id, all with the same slots and flow runs.

    Raises:
        ValueError: ``flow_runs`` below 1.
    """
    if flow_runs < 1:
        raise ValueError(f"flow runs per worker must be at least 1, got {flow_runs}")
    return tuple(WorkerPlan(wid, limit_prefix, slots, flow_runs) for wid in ids)


@dataclass(frozen=True)
class BatchCounts:
    """Flow runs of a batch by outcome."""

    total: int
    waiting: int  # scheduled or pending: not yet started by a worker
    running: int
    completed: int
    failed: int  # failed, crashed or cancelled

    @property
    def done(self) -> bool:
        return self.completed + self.failed == self.total


def count_runs(runs: Sequence[FlowRun]) -> BatchCounts:
    """Group flow runs by outcome (a run with no state yet counts as waiting)."""
    waiting = running = completed = failed = 0
    for run in runs:
        state = run.state
        if state is None or state.is_scheduled() or state.is_pending():
            waiting += 1
        elif state.is_completed():
            completed += 1
        elif state.is_final():
            failed += 1
        else:
            running += 1  # running, cancelling, paused
    return BatchCounts(len(runs), waiting, running, completed, failed)
