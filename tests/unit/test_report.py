"""The pure measurements over recorded stage intervals, and the record format."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefect_gpu_workers.records import StageRecord, append_record, read_records, record_dir_from
from prefect_gpu_workers.report import (
    backlog_handoff_gaps,
    gcl_handoff_gaps,
    gpu_overlap_per_worker,
    overall_utilization,
    peak_overlap,
    percentile,
    slot_utilization,
    speedup,
    stage_overlap_per_worker,
    summarize,
)


def gpu(
    worker: str, requested: float, start: float, end: float, occupy: int = 1, run: str = "r"
) -> StageRecord:
    return StageRecord(run, worker, "gpu", requested, start, end, occupy, f"gpu:{worker}")


def io(worker: str, stage: str, start: float, end: float) -> StageRecord:
    assert stage in ("download", "save")
    return StageRecord("r", worker, stage, start, start, end)  # type: ignore[arg-type]


def test_peak_overlap_counts_weights_and_treats_intervals_as_half_open() -> None:
    assert peak_overlap([]) == 0
    assert peak_overlap([(0, 2, 1), (1, 3, 1), (1.5, 4, 2)]) == 4
    # A hand-over at one instant is not two holders.
    assert peak_overlap([(0, 1, 1), (1, 2, 1), (2, 3, 1)]) == 1
    # Zero-length intervals hold nothing.
    assert peak_overlap([(1, 1, 5), (0, 2, 1)]) == 1


def test_gpu_overlap_is_per_worker_and_weighted_by_occupy() -> None:
    records = [
        gpu("a", 0, 0, 4),
        gpu("a", 0, 1, 3),
        gpu("b", 0, 0, 4, occupy=2),
        gpu("b", 0, 4, 5),
        io("a", "download", 0, 10),
    ]
    assert gpu_overlap_per_worker(records) == {"a": 2, "b": 2}


def test_stage_overlap_counts_only_the_named_stages() -> None:
    records = [
        io("a", "download", 0, 5),
        io("a", "download", 1, 5),
        io("a", "save", 2, 5),
        gpu("a", 0, 0, 5),
    ]
    assert stage_overlap_per_worker(records, ("download", "save")) == {"a": 3}


def test_slot_utilization_uses_the_window_from_first_to_last_acquire() -> None:
    # Limit 2; acquires at 0, 0 and 6; window [0, 6] = 12 slot-seconds.
    steps = [gpu("a", 0, 0, 4), gpu("a", 0, 0, 2), gpu("a", 0, 6, 9)]
    result = slot_utilization(steps, limit=2)
    assert result.capacity_slot_s == pytest.approx(12)
    # 4 + 2 inside the window; the last step is after the last acquire.
    assert result.held_slot_s == pytest.approx(6)
    assert result.fraction == pytest.approx(0.5)
    assert slot_utilization([], limit=2).fraction is None
    with pytest.raises(ValueError, match="limit"):
        slot_utilization(steps, limit=0)


def test_overall_utilization_weights_workers_by_their_capacity() -> None:
    records = [
        gpu("a", 0, 0, 10),
        gpu("a", 0, 10, 11),  # a: window 10 s x 1 slot, 10 held
        gpu("b", 0, 0, 5),
        gpu("b", 0, 10, 11),  # b: window 10 s x 2 slots, 5 held
    ]
    assert overall_utilization(records, {"a": 1, "b": 2}) == pytest.approx(15 / 30)
    assert overall_utilization([], {"a": 1}) is None


def test_gcl_handoff_gap_counts_only_steps_already_waiting() -> None:
    records = [
        gpu("a", 0.0, 0.0, 3.0),
        # waiting since 1.0, gets the slot 0.5 s after the release at 3.0
        gpu("a", 1.0, 3.5, 6.0),
        # waiting since 5.0, gets it 0.25 s after the release at 6.0
        gpu("a", 5.0, 6.25, 7.0),
        # asked after the release at 7.0: no one was waiting then, not a handoff
        gpu("a", 9.0, 9.0, 10.0),
    ]
    assert gcl_handoff_gaps(records) == pytest.approx([0.25, 0.5])


def test_gcl_handoff_gap_ends_when_any_step_takes_the_slot() -> None:
    records = [
        gpu("a", 0.0, 0.0, 10.0),
        # waiting since 5 (sleeping on Retry-After) while the slot changes hands twice
        gpu("a", 5.0, 15.0, 20.0),
        # asked at 10.5 and got the slot freed at 10 at once
        gpu("a", 10.5, 10.5, 14.5),
    ]
    # The slot was idle 10 -> 10.5 and 14.5 -> 15; not 10 -> 15.
    assert gcl_handoff_gaps(records) == pytest.approx([0.5, 0.5])


def test_gcl_handoff_gap_matches_each_acquire_once_and_counts_occupy() -> None:
    records = [
        gpu("a", 0, 0, 2),
        gpu("a", 0, 0, 3),
        # needs both slots: its acquire at 4 ends two waits, from 2 and from 3
        gpu("a", 1, 4, 5, occupy=2),
        gpu("b", 0, 0, 2),
    ]
    assert gcl_handoff_gaps(records) == pytest.approx([1.0, 2.0])


def test_backlog_handoff_gap_stops_when_nothing_is_left_to_start() -> None:
    records = [
        gpu("a", 0, 0, 3),
        gpu("a", 8, 8, 9),
        gpu("a", 10, 11, 12),  # the pool's last acquire: nothing is left to start after 11
        gpu("b", 0, 1, 10),  # b never acquires again after its release at 10
    ]
    # a: release 3 -> acquire 8, release 9 -> acquire 11; the release at 12 is after 11.
    assert backlog_handoff_gaps(records) == pytest.approx([2.0, 5.0])
    assert backlog_handoff_gaps([]) == []


def test_percentile_interpolates_and_rejects_nonsense() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)
    with pytest.raises(ValueError, match="percentile"):
        percentile([1.0], 101)


def test_summarize_and_speedup() -> None:
    records = [
        io("a", "download", 0, 1),
        gpu("a", 1, 1, 3),
        gpu("a", 1, 2, 4),
        gpu("a", 1.5, 3.5, 5),
        io("a", "save", 3, 4),
    ]
    metrics = summarize(
        records, {"a": 2}, submitted=4, finished=3, failed=1, submitted_at=0.0, ended_at=6.0
    )
    assert metrics.runs_per_s == pytest.approx(0.5)
    assert metrics.max_gpu_overlap_per_worker == {"a": 2}
    assert metrics.limit_per_worker == {"a": 2}
    assert metrics.within_limits
    assert metrics.gpu_steps == 3
    assert metrics.gcl_handoff_gap_p50_s == pytest.approx(0.5)
    assert metrics.gpu_wait_p50_s == pytest.approx(1.0)
    over = summarize(
        records, {"a": 1}, submitted=4, finished=3, failed=0, submitted_at=0.0, ended_at=12.0
    )
    assert not over.within_limits
    assert speedup(metrics, over) == pytest.approx(2.0)
    stalled = summarize([], {}, submitted=1, finished=0, failed=1, submitted_at=5.0, ended_at=5.0)
    assert stalled.runs_per_s == 0.0
    assert speedup(metrics, stalled) is None


def test_records_round_trip_one_file_per_run(tmp_path: Path) -> None:
    first = gpu("a", 1.0, 2.0, 3.0, run="run-1")
    second = io("a", "download", 0.0, 1.0)
    append_record(tmp_path, first)
    append_record(tmp_path, second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl", "run-1.jsonl"]
    assert read_records(tmp_path) == [second, first]


def test_record_rejects_times_out_of_order_and_unknown_stages() -> None:
    with pytest.raises(ValueError, match="out of order"):
        StageRecord("r", "a", "gpu", 2.0, 1.0, 3.0)
    with pytest.raises(ValueError, match="unknown stage"):
        StageRecord("r", "a", "train", 0.0, 0.0, 1.0)  # type: ignore[arg-type]


def test_record_dir_parameter_wins_over_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PGW_RECORD_DIR", str(tmp_path / "env"))
    assert record_dir_from(str(tmp_path / "param")) == tmp_path / "param"
    assert record_dir_from(None) == tmp_path / "env"
    monkeypatch.delenv("PGW_RECORD_DIR")
    assert record_dir_from(None) is None
