"""Measurements the slot-broker bench adds: utilisation per worker, over-admissions."""

from __future__ import annotations

from prefect_gpu_workers.records import StageRecord
from prefect_gpu_workers.report import over_admissions, utilization_per_worker


def _gpu(worker: str, start: float, end: float, occupy: int = 1) -> StageRecord:
    return StageRecord("r", worker, "gpu", start, start, end, occupy, f"gpu:{worker}")


def test_utilization_per_worker_names_idle_workers_too() -> None:
    records = [_gpu("a", 0, 4), _gpu("a", 0, 4), _gpu("a", 4, 8), _gpu("a", 4, 8)]
    assert utilization_per_worker(records, {"a": 2, "b": 2}) == {"a": 1.0, "b": None}


def test_over_admissions_counts_starts_above_the_limit() -> None:
    within = [_gpu("a", 0, 2), _gpu("a", 1, 3), _gpu("a", 2, 4)]  # handed over at t=2
    assert over_admissions(within, {"a": 2}) == 0
    beyond = [*within, _gpu("a", 2.5, 3.5), _gpu("b", 0, 1, occupy=2)]
    assert over_admissions(beyond, {"a": 2, "b": 2}) == 1
