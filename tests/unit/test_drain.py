"""The drain's decisions: what becomes of each flow run a stopping worker claimed."""

from __future__ import annotations

import pytest

from prefect_gpu_workers.commands import DRAIN_MARGIN_S, drain_seconds_within, worker_command
from prefect_gpu_workers.worker.drain import (
    SIGTERM_BEHAVIOR_ENV,
    DrainReport,
    RunOutcome,
    crash_message,
    left_behind_outcome,
    run_outcome,
    wants_reschedule,
)


@pytest.mark.parametrize("state", ["COMPLETED", "FAILED", "CANCELLED", "CRASHED", "PAUSED"])
@pytest.mark.parametrize("deadline_passed", [False, True])
def test_a_run_that_ended_is_left_alone(state: str, deadline_passed: bool) -> None:
    assert run_outcome(state, deadline_passed, reschedule=True) is RunOutcome.FINISHED


@pytest.mark.parametrize("state", ["SCHEDULED", "PENDING", "RUNNING", "CANCELLING", None])
def test_before_the_deadline_every_live_run_is_waited_for(state: str | None) -> None:
    assert run_outcome(state, False, reschedule=False) is RunOutcome.WAIT


@pytest.mark.parametrize(
    ("state", "reschedule", "outcome"),
    [
        ("RUNNING", False, RunOutcome.CRASH),
        ("RUNNING", True, RunOutcome.RESCHEDULE),
        ("running", True, RunOutcome.RESCHEDULE),  # state types compare by name
        # A run that never started its flow runs again, whatever it allows.
        ("PENDING", False, RunOutcome.RESCHEDULE),
        ("SCHEDULED", False, RunOutcome.RESCHEDULE),
        # Someone asked to cancel it: it ends Cancelled, not rescheduled.
        ("CANCELLING", True, RunOutcome.CANCEL),
        (None, False, RunOutcome.CRASH),
    ],
)
def test_at_the_deadline_a_live_run_is_rescheduled_cancelled_or_crashed(
    state: str | None, reschedule: bool, outcome: RunOutcome
) -> None:
    assert run_outcome(state, True, reschedule) is outcome


def test_the_runs_own_environment_decides_before_the_workers() -> None:
    worker_says_yes = {SIGTERM_BEHAVIOR_ENV: "reschedule"}
    assert wants_reschedule(None, worker_says_yes)
    assert wants_reschedule({}, worker_says_yes)
    assert not wants_reschedule({SIGTERM_BEHAVIOR_ENV: "crash"}, worker_says_yes)
    assert wants_reschedule({SIGTERM_BEHAVIOR_ENV: "Reschedule"}, {})
    assert not wants_reschedule({SIGTERM_BEHAVIOR_ENV: "relinquish"}, {})
    assert not wants_reschedule(None, {})


def test_the_crash_message_names_the_worker_the_drain_and_the_way_out() -> None:
    message = crash_message("gpu-pool-abc", 45)
    assert "gpu-pool-abc" in message
    assert "45 s drain" in message
    assert f"{SIGTERM_BEHAVIOR_ENV}=reschedule" in message


def test_the_report_counts_each_outcome() -> None:
    report = DrainReport(waited_s=12.34)
    for outcome, run in [
        (RunOutcome.FINISHED, "a"),
        (RunOutcome.RESCHEDULE, "b"),
        (RunOutcome.CRASH, "c"),
        (RunOutcome.CANCEL, "d"),
        (RunOutcome.WAIT, "e"),
    ]:
        report.add(outcome, run)
    assert (report.finished, report.rescheduled, report.crashed, report.cancelled) == (
        ["a"], ["b"], ["c"], ["d"],
    )  # fmt: skip
    assert report.describe() == (
        "drained in 12.3 s: 1 finished, 1 rescheduled, 1 cancelled, 1 crashed"
    )


def test_the_drain_ends_a_margin_before_the_grace_period() -> None:
    assert drain_seconds_within(60) == 60 - DRAIN_MARGIN_S
    assert drain_seconds_within(DRAIN_MARGIN_S) == 0
    assert drain_seconds_within(3) == 0  # never negative
    command = worker_command("p", 4, "gpu", 300, drain_s=45)
    assert command[-2:] == ["--drain-seconds", "45"]
    assert "--drain-seconds" not in worker_command("p", 4, "gpu", 300)


def test_the_report_says_which_states_could_not_be_set() -> None:
    report = DrainReport(waited_s=1.0, crashed=["a"], unset=["b", "c"])
    assert report.describe() == (
        "drained in 1.0 s: 0 finished, 0 rescheduled, 0 cancelled, 1 crashed, "
        "2 not set (Prefect unreachable)"
    )


@pytest.mark.parametrize(
    ("state_type", "claimed_by", "reschedule", "expected"),
    [
        ("RUNNING", "w1", False, RunOutcome.CRASH),
        ("RUNNING", None, False, RunOutcome.CRASH),  # no label: the journal is the word
        ("RUNNING", "w1", True, RunOutcome.RESCHEDULE),
        ("PENDING", "w1", False, RunOutcome.RESCHEDULE),
        ("CANCELLING", "w1", False, RunOutcome.CANCEL),
        ("COMPLETED", "w1", False, RunOutcome.FINISHED),
        # Before: each of these was force-set Crashed or Scheduled by the next w1.
        ("RUNNING", "w2", False, RunOutcome.MOVED),  # retried on another worker
        ("PENDING", "w2", True, RunOutcome.MOVED),
        ("SCHEDULED", "w1", False, RunOutcome.MOVED),  # back in the queue
    ],
)
def test_only_runs_still_this_worker_s_are_settled_after_it_died(
    state_type: str, claimed_by: str | None, reschedule: bool, expected: RunOutcome
) -> None:
    assert left_behind_outcome(state_type, claimed_by, "w1", reschedule) is expected


def test_runs_left_alone_are_said_in_the_report() -> None:
    report = DrainReport()
    report.add(RunOutcome.MOVED, "a")
    assert report.moved == ["a"]
    assert report.describe().endswith("1 claimed by another worker since (left alone)")
