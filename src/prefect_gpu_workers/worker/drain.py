"""A stopping worker's drain, decided: what becomes of each flow run it claimed.

A worker told to stop (SIGTERM from the kubelet on scale-down, from ``start``,
or Ctrl-C) takes no new flow runs and lets the ones it runs finish, until its
drain deadline. Then it stops the rest, and each must end in a state Prefect
acts on, never Running:

- a run that never started its flow (Scheduled, Pending) is scheduled again,
  for another worker;
- a started run is scheduled again where it allows that: Prefect's own knob
  ``PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=reschedule`` in its environment
  (its deployment's job variables, else the worker's);
- otherwise it is Crashed, with the reason.

Its GPU slots go back at once: the broker reclaims a dead holder's lease.
A worker that died without a drain leaves its runs to the next worker of its
name, which settles them the same way (see :mod:`.journal`).
Stdlib only; ``worker.py`` carries it out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# Prefect's setting for what `prefect flow-run execute` does on SIGTERM; the
# drain honours its "reschedule" for every run it stops.
SIGTERM_BEHAVIOR_ENV = "PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"
# The worker's drain when nothing says otherwise (``--drain-seconds``).
DEFAULT_DRAIN_S = 60.0
# Prefect state types that end a run: the drain leaves such runs alone.
FINAL_STATE_TYPES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})
# Runs in these states have not started their flow: always safe to run again.
NOT_STARTED_STATE_TYPES = frozenset({"SCHEDULED", "PENDING"})
# Prefect's label on a flow run naming the worker that last claimed it (every
# worker sets it as it submits a run).
WORKER_NAME_LABEL = "prefect.worker.name"


class RunOutcome(StrEnum):
    """What the drain does with one claimed flow run."""

    FINISHED = "finished"  # ended on its own: nothing to do
    WAIT = "wait"  # still in flight, the deadline not reached
    RESCHEDULE = "reschedule"  # stopped, and Scheduled again for another worker
    CANCEL = "cancel"  # stopped while Cancelling: Cancelled, as asked
    CRASH = "crash"  # stopped, and Crashed with the reason
    MOVED = "moved"  # left behind, but claimed since by another worker or back in the queue


def wants_reschedule(job_env: Mapping[str, Any] | None, worker_env: Mapping[str, str]) -> bool:
    """Whether a started run may run again elsewhere: Prefect's SIGTERM knob says so.

    The run's own environment (its deployment's job variables) wins over the
    worker's, as it does in the flow-run process.

    Example:
        >>> wants_reschedule({SIGTERM_BEHAVIOR_ENV: "reschedule"}, {})
        True
        >>> wants_reschedule({SIGTERM_BEHAVIOR_ENV: "crash"}, {SIGTERM_BEHAVIOR_ENV: "reschedule"})
        False
    """
    value = (job_env or {}).get(SIGTERM_BEHAVIOR_ENV, worker_env.get(SIGTERM_BEHAVIOR_ENV, ""))
    return str(value).lower() == "reschedule"


def run_outcome(state_type: str | None, deadline_passed: bool, reschedule: bool) -> RunOutcome:
    """What to do with a claimed run in ``state_type`` (a Prefect state type's value).

    Example:
        >>> run_outcome("RUNNING", False, False).value
        'wait'
        >>> run_outcome("RUNNING", True, False).value
        'crash'
        >>> run_outcome("PENDING", True, False).value
        'reschedule'
    """
    kind = (state_type or "").upper()
    if kind in FINAL_STATE_TYPES or kind == "PAUSED":  # a paused run holds no process
        return RunOutcome.FINISHED
    if not deadline_passed:
        return RunOutcome.WAIT
    if kind == "CANCELLING":
        return RunOutcome.CANCEL
    if kind in NOT_STARTED_STATE_TYPES or reschedule:
        return RunOutcome.RESCHEDULE
    return RunOutcome.CRASH


def left_behind_outcome(
    state_type: str | None, claimed_by: str | None, worker_name: str, reschedule: bool
) -> RunOutcome:
    """What the next worker of ``worker_name`` does with a run an earlier one left in flight.

    Only a run that is still this name's is settled: one claimed since by
    another worker (Prefect's :data:`WORKER_NAME_LABEL` says whose it is), or
    Scheduled again and waiting in the queue, belongs to someone else now and
    is left alone. The rest are settled as a drain past its deadline would.

    Args:
        state_type: the run's Prefect state type now.
        claimed_by: the run's :data:`WORKER_NAME_LABEL`, if it has one.
        worker_name: the settling worker's name.
        reschedule: whether the run allows a reschedule (:func:`wants_reschedule`).

    Example:
        >>> left_behind_outcome("RUNNING", "w1", "w1", False).value
        'crash'
        >>> left_behind_outcome("RUNNING", "w2", "w1", False).value
        'moved'
    """
    if claimed_by is not None and claimed_by != worker_name:
        return RunOutcome.MOVED
    if (state_type or "").upper() == "SCHEDULED":
        return RunOutcome.MOVED
    return run_outcome(state_type, True, reschedule)


def crash_message(worker_id: str, drain_s: float) -> str:
    """The Crashed state's message for a run the drain stopped."""
    return (
        f"worker {worker_id} was stopped and this flow run did not finish within its "
        f"{drain_s:.0f} s drain; it does not allow a reschedule "
        f"({SIGTERM_BEHAVIOR_ENV}=reschedule)"
    )


def stopped_message(outcome: RunOutcome, worker_id: str, drain_s: float) -> str:
    """The state message for a run the drain stopped (``outcome``: what it becomes).

    Example:
        >>> stopped_message(RunOutcome.RESCHEDULE, "w1", 60.0)
        'drained from w1'
    """
    if outcome is RunOutcome.RESCHEDULE:
        return f"drained from {worker_id}"
    if outcome is RunOutcome.CANCEL:
        return f"cancelled while {worker_id} drained"
    return crash_message(worker_id, drain_s)


def left_behind_message(worker_id: str) -> str:
    """The message for a run an earlier worker of this name left unsettled when it ended."""
    return (
        f"worker {worker_id} ended without settling this flow run (killed, its container "
        "restarted, or Prefect unreachable while it drained); its process is gone"
    )


@dataclass
class DrainReport:
    """What a drain did, by outcome (flow run ids as strings)."""

    waited_s: float = 0.0
    # Of that, the time spent stopping runs after the wait ended (the margin's share).
    stopping_s: float = 0.0
    finished: list[str] = field(default_factory=list)
    rescheduled: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    crashed: list[str] = field(default_factory=list)
    # Left behind by an earlier worker, but another's now: left alone.
    moved: list[str] = field(default_factory=list)
    # Stopped, but Prefect could not be told (unreachable): the server's own
    # heartbeat checks are then what ends them.
    unset: list[str] = field(default_factory=list)

    def add(self, outcome: RunOutcome, run_id: str) -> None:
        """Count ``run_id`` under ``outcome`` (WAIT counts nowhere)."""
        bucket = {
            RunOutcome.FINISHED: self.finished,
            RunOutcome.RESCHEDULE: self.rescheduled,
            RunOutcome.CANCEL: self.cancelled,
            RunOutcome.CRASH: self.crashed,
            RunOutcome.MOVED: self.moved,
        }.get(outcome)
        if bucket is not None:
            bucket.append(run_id)

    def describe(self) -> str:
        """One line for the worker's log.

        Example:
            >>> DrainReport(3.0, finished=["a"], rescheduled=["b"]).describe()
            'drained in 3.0 s: 1 finished, 1 rescheduled, 0 cancelled, 0 crashed'
        """
        line = (
            f"drained in {self.waited_s:.1f} s: {len(self.finished)} finished, "
            f"{len(self.rescheduled)} rescheduled, {len(self.cancelled)} cancelled, "
            f"{len(self.crashed)} crashed"
        )
        if self.moved:
            line += f", {len(self.moved)} claimed by another worker since (left alone)"
        if self.unset:
            line += f", {len(self.unset)} not set (Prefect unreachable)"
        return line
