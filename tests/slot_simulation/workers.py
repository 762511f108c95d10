"""Workers drained, killed and restarted on virtual time: no run is left Running (I5).

The code under test is the worker's own: :func:`prefect_gpu_workers.worker.entrypoint.drain`,
:func:`~prefect_gpu_workers.worker.entrypoint.settle_left_behind`, the journal
(:class:`~prefect_gpu_workers.worker.journal.InFlightJournal`, :class:`RunsInFlight`,
real files in a folder of the seed's) and Prefect's real client. What stands
in: the server (:class:`~.prefect_model.PrefectModel`'s flow runs, behind the
same faults as the slot simulation), and the Prefect worker's loop that claims
runs and runs their processes (:class:`SimWorker`; each process ends with a
final state it reports itself, as the flow engine does).

One schedule: a worker claims runs; some finish, a user cancels one; SIGTERM
starts its drain (sometimes a second signal hurries it, sometimes SIGKILL ends
it part way: nothing more is written); Prefect may be away meanwhile; a run
may be claimed by another worker after this one is gone; a twin of the same
name (same ``PREFECT_HOME``) is alive throughout. Then a new worker of the name
starts and settles what was left, with the faults still on, and another one
once the server is quiet. Invariants:

- **no run left Running** (I5): every run the worker claimed has ended
  (Completed, Cancelled, Crashed with a reason) or is Scheduled again (with a
  reason), except those now another worker's;
- **recorded until settled**: at a SIGKILL every run still Running in Prefect
  is in the killed worker's journal file;
- **others' runs left alone**: a run claimed since by another worker, and the
  live twin's runs and file, are not touched;
- **drain within its margin**: a drain not killed returns within its deadline
  plus the stop budget (the kubelet's grace period is both, then SIGKILL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import SettingsContext, get_settings_context

from prefect_gpu_workers.worker.drain import (
    FINAL_STATE_TYPES,
    SIGTERM_BEHAVIOR_ENV,
    WORKER_NAME_LABEL,
)
from prefect_gpu_workers.worker.entrypoint import STOP_BUDGET_S, drain, settle_left_behind
from prefect_gpu_workers.worker.journal import InFlightJournal, RunsInFlight

from . import loop as virtual
from .prefect_model import (
    Fault,
    FaultRates,
    ModelFlowRun,
    ModelTransport,
    PrefectModel,
    RequestRecord,
    seeded_ids,
)
from .simulate import _NO_TLS, Violation, _sim_settings

WORKER = "sim-worker"
OTHER = "other-worker"
# Beyond the stop budget: reads bounded at 1 s at least, the process kills.
DRAIN_SLACK_S = 2.0


@dataclass(frozen=True)
class RunPlan:
    name: str
    claimed_at: float
    duration: float  # its process runs this long, then reports Completed
    reschedule: bool  # its job variables allow a reschedule on SIGTERM
    cancel_at: float | None  # a user asks to cancel it then (Cancelling)


@dataclass(frozen=True)
class WorkerSchedule:
    seed: int
    runs: tuple[RunPlan, ...]
    term_at: float
    drain_s: float
    hurry_after_s: float | None  # a second signal this long into the drain
    kill_after_s: float | None  # SIGKILL this long into the drain
    outage: tuple[float, float] | None  # Prefect away: from, for how long
    faults: FaultRates
    twin_runs: int  # runs of a live worker of the same name
    moved: int | None  # the run another worker claims once this one is gone

    def describe(self) -> str:
        lines = [
            f"seed {self.seed}: SIGTERM at {self.term_at:.1f}, drain {self.drain_s:.0f} s"
            + (f", hurried at +{self.hurry_after_s:.1f}" if self.hurry_after_s else "")
            + (f", SIGKILL at +{self.kill_after_s:.1f}" if self.kill_after_s is not None else "")
            + (f", Prefect away {self.outage[0]:.1f}+{self.outage[1]:.1f}" if self.outage else "")
            + f", twin holds {self.twin_runs}, faults {self.faults}"
        ]
        for i, run in enumerate(self.runs):
            lines.append(
                f"  t={run.claimed_at:7.2f} {run.name} runs {run.duration:.1f} s"
                + (" reschedule" if run.reschedule else "")
                + (f" cancelled at {run.cancel_at:.1f}" if run.cancel_at is not None else "")
                + (" (moved later)" if self.moved == i else "")
            )
        return "\n".join(lines)


def draw_worker_schedule(seed: int) -> WorkerSchedule:
    rng = random.Random(seed ^ 0xD2A1)
    runs = []
    for i in range(rng.randint(1, 7)):
        claimed = rng.uniform(0.0, 20.0)
        duration = rng.choice([rng.uniform(0.5, 10.0), rng.uniform(10.0, 120.0)])
        cancel = claimed + rng.uniform(0.0, duration) if rng.random() < 0.15 else None
        runs.append(RunPlan(f"run-{i}", claimed, duration, rng.random() < 0.4, cancel))
    term_at = rng.uniform(5.0, 40.0)
    drain_s = rng.choice([1.0, 5.0, 20.0, 60.0])
    hurry = rng.uniform(0.0, drain_s) if rng.random() < 0.2 else None
    kill = rng.uniform(0.0, drain_s + STOP_BUDGET_S) if rng.random() < 0.35 else None
    outage = None
    if rng.random() < 0.35:
        outage = (rng.uniform(0.0, term_at + drain_s), rng.choice([3.0, 15.0, 90.0]))
    level = rng.choice([0.0, 0.05, 0.15])
    faults = FaultRates(
        refused=level / 2, error_before=level / 2, error_after=level,
        lost_answer=level / 2, slow=level / 2,
    )  # fmt: skip
    moved = rng.randrange(len(runs)) if rng.random() < 0.3 else None
    twin = rng.choice([0, 0, 1, 2])
    return WorkerSchedule(seed, tuple(runs), term_at, drain_s, hurry, kill, outage, faults, twin,
                          moved)  # fmt: skip


@dataclass
class WorkerReport:
    schedule: WorkerSchedule
    violations: list[Violation] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    requests: int = 0
    faults: int = 0
    killed: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)  # final state types of the runs

    @property
    def ok(self) -> bool:
        return not self.violations

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.trace).encode()).hexdigest()[:16]


class _DeadJournal(InFlightJournal):
    """A SIGKILLed process writes nothing more."""

    def record(self, run_ids: Any) -> bool:
        return False


class SimWorker:
    """One worker process of :data:`WORKER`: the bookkeeping ``drain`` and
    ``settle_left_behind`` read (``name``, ``journal``, ``runs``), and the Prefect
    worker's loop that claims runs and runs their processes (:meth:`serve`)."""

    def __init__(self, sim: WorkerSimulation, owner: str) -> None:
        self.sim, self.owner, self.name = sim, owner, WORKER
        self.journal = InFlightJournal(sim.home, WORKER, owner=owner, alive=sim.live.__contains__)
        self.runs = RunsInFlight(self.journal)
        self.draining = False
        self.dead = False
        sim.live.add(owner)

    async def serve(self, plans: tuple[RunPlan, ...]) -> None:
        processes: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            for plan in sorted(plans, key=lambda p: p.claimed_at):
                await asyncio.sleep(max(0.0, start + plan.claimed_at - loop.time()))
                if self.draining:
                    break
                run = self.sim.run_of(plan)
                run.state_type, run.state_name = "RUNNING", "Running"
                run.labels[WORKER_NAME_LABEL] = WORKER
                self.sim.claimed.add(run.id)
                self.sim.note(f"{plan.name} claimed")
                self.runs.started([FlowRun.model_validate(run.as_json())])
                processes.append(asyncio.ensure_future(self.process(plan, run)))
            await asyncio.Event().wait()  # polls until stopped
        finally:
            for process in processes:
                process.cancel()
            await asyncio.gather(*processes, return_exceptions=True)

    async def process(self, plan: RunPlan, run: ModelFlowRun) -> None:
        try:
            await asyncio.sleep(plan.duration)
            # The flow engine reports its own end (not through the faults under test).
            if run.state_type == "CANCELLING":
                run.state_type, run.state_name = "CANCELLED", "Cancelled"
            elif run.state_type == "RUNNING":
                run.state_type, run.state_name = "COMPLETED", "Completed"
            self.sim.note(f"{plan.name} ends {run.state_type}")
        finally:
            if not self.dead:
                self.runs.ended(run.id)  # Prefect's worker frees its place

    def kill(self) -> None:
        self.dead = True
        self.runs.journal = _DeadJournal(self.sim.home, WORKER, owner=self.owner)
        self.sim.live.discard(self.owner)


class WorkerSimulation:
    def __init__(self, schedule: WorkerSchedule, home: Path) -> None:
        self.schedule = schedule
        self.home = home
        self.rng = random.Random(schedule.seed ^ 0x5EED)
        self.report = WorkerReport(schedule)
        self.live: set[str] = set()
        self.claimed: set[UUID] = set()
        self.model: PrefectModel | None = None
        self.transport: ModelTransport | None = None
        self._runs: dict[str, UUID] = {}

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    def note(self, what: str) -> None:
        self.report.trace.append(f"{self.now():.6f} {what}")

    def violate(self, invariant: str, detail: str) -> None:
        if all(v.invariant != invariant for v in self.report.violations):
            self.report.violations.append(Violation(self.now(), invariant, detail))

    def run_of(self, plan: RunPlan) -> ModelFlowRun:
        assert self.model is not None
        return self.model.flow_runs[self._runs[plan.name]]

    def connect(self) -> Any:
        assert self.transport is not None
        return get_client(httpx_settings={"transport": self.transport, "verify": _NO_TLS})

    # -- the story ------------------------------------------------------------------
    async def run(self) -> WorkerReport:
        schedule, loop = self.schedule, asyncio.get_running_loop()
        model = self.model = PrefectModel(loop.time, seeded_ids(self.rng))

        def observe(record: RequestRecord) -> None:
            fault = "" if record.fault is Fault.NONE else f" [{record.fault.value}]"
            self.note(f"{record.method} {record.path.removeprefix('/api/')}{fault} -> "
                      f"{record.status}")  # fmt: skip

        transport = self.transport = ModelTransport(
            model, self.rng, schedule.faults, observe=observe
        )
        for plan in schedule.runs:
            run = ModelFlowRun(model.new_id(), "SCHEDULED", "Scheduled")
            if plan.reschedule:
                run.env[SIGTERM_BEHAVIOR_ENV] = "reschedule"
            self._runs[plan.name] = run.id
            model.flow_runs[run.id] = run
        twin_runs = self._start_twin(model)
        start = loop.time()
        events = [
            asyncio.ensure_future(self._outage(start)),
            asyncio.ensure_future(self._cancels(start)),
        ]
        first = SimWorker(self, "first")
        serving = asyncio.ensure_future(first.serve(schedule.runs))
        await asyncio.sleep(schedule.term_at)
        self.note("SIGTERM")
        first.draining = True
        hurry = asyncio.Event()
        if schedule.hurry_after_s is not None:
            loop.call_later(schedule.hurry_after_s, hurry.set)
        draining = asyncio.ensure_future(
            drain(first, serving, schedule.drain_s, hurry, self.note, connect=self.connect)
        )
        began = loop.time()
        done, _ = await asyncio.wait({draining}, timeout=schedule.kill_after_s)
        if not done:
            self._kill(first, draining, serving, model)
            await asyncio.gather(draining, serving, return_exceptions=True)
        else:
            took = loop.time() - began
            bound = schedule.drain_s + STOP_BUDGET_S + DRAIN_SLACK_S
            if took > bound:
                self.violate(
                    "drain within its margin", f"the drain took {took:.1f} s of {bound:.0f}"
                )
            self.note(draining.result().describe())
            first.kill()  # the process exits: its file is left as it wrote it
        moved = self._move(model)
        # A new worker of the name, with the faults still on ...
        second = SimWorker(self, "second")
        await settle_left_behind(second, self.note, retry_s=(1.0, 2.0), connect=self.connect)
        second.kill()
        # ... and one on a quiet server settles what is still kept.
        for task in events:
            task.cancel()
        await asyncio.gather(*events, return_exceptions=True)
        model.up, transport.faults_on = True, False
        third = SimWorker(self, "third")
        await settle_left_behind(third, self.note, retry_s=(), connect=self.connect)
        self._check_settled(model, moved, twin_runs)
        self.report.requests = len(transport.log)
        self.report.faults = sum(1 for r in transport.log if r.fault is not Fault.NONE)
        return self.report

    def _start_twin(self, model: PrefectModel) -> dict[UUID, int]:
        """A live worker of the same name on the same home, holding its own runs."""
        runs: dict[UUID, int] = {}
        for _ in range(self.schedule.twin_runs):
            run = ModelFlowRun(
                model.new_id(), "RUNNING", "Running", labels={WORKER_NAME_LABEL: WORKER}
            )
            model.flow_runs[run.id] = run
            runs[run.id] = 0
        if runs:
            twin = InFlightJournal(self.home, WORKER, owner="twin", alive=self.live.__contains__)
            twin.record(runs)
            self.live.add("twin")
        return runs

    async def _outage(self, start: float) -> None:
        if self.schedule.outage is None:
            return
        model, (at, length) = self.model, self.schedule.outage
        assert model is not None
        await asyncio.sleep(max(0.0, start + at - self.now()))
        model.up = False
        self.note("Prefect away")
        try:
            await asyncio.sleep(length)
        finally:
            model.up = True
            self.note("Prefect back")

    async def _cancels(self, start: float) -> None:
        for plan in sorted(
            (p for p in self.schedule.runs if p.cancel_at is not None),
            key=lambda p: p.cancel_at or 0,
        ):
            await asyncio.sleep(max(0.0, start + (plan.cancel_at or 0.0) - self.now()))
            run = self.run_of(plan)
            if run.state_type == "RUNNING":
                run.state_type, run.state_name = "CANCELLING", "Cancelling"
                self.note(f"{plan.name} cancelling")

    def _kill(
        self, worker: SimWorker, draining: asyncio.Task[Any], serving: asyncio.Task[Any],
        model: PrefectModel,
    ) -> None:  # fmt: skip
        """SIGKILL: nothing more is written; the runs' processes die with the container."""
        self.report.killed = True
        self.note("SIGKILL")
        written = set(worker.journal.read())
        worker.kill()
        draining.cancel()
        serving.cancel()
        unrecorded = [
            str(run_id)
            for run_id in self.claimed
            if model.flow_runs[run_id].state_type in ("RUNNING", "PENDING", "CANCELLING")
            and str(run_id) not in written
        ]
        if unrecorded:
            self.violate(
                "recorded until settled",
                f"killed with {len(unrecorded)} run(s) Running and not in its journal",
            )

    def _move(self, model: PrefectModel) -> dict[UUID, int]:
        """Another worker claims a run once this one is gone (Prefect rescheduled it, or
        its own checks did): from now on it is that worker's."""
        index = self.schedule.moved
        if index is None:
            return {}
        run = self.run_of(self.schedule.runs[index])
        if run.state_type in FINAL_STATE_TYPES:
            return {}
        run.state_type, run.state_name = "RUNNING", "Running"
        run.labels[WORKER_NAME_LABEL] = OTHER
        self.note(f"{self.schedule.runs[index].name} claimed by {OTHER}")
        return {run.id: run.set_by_api}

    def _check_settled(
        self, model: PrefectModel, moved: dict[UUID, int], twin_runs: dict[UUID, int]
    ) -> None:
        outcomes: dict[str, int] = {}
        for run_id in self.claimed:
            run = model.flow_runs[run_id]
            kind = f"{run.state_type} (another worker's)" if run_id in moved else run.state_type
            outcomes[kind] = outcomes.get(kind, 0) + 1
            if run_id in moved:
                if run.set_by_api != moved[run_id]:  # a user may still cancel it
                    self.violate(
                        "others' runs left alone",
                        f"run {run_id}, claimed by {OTHER}, was set {run.state_type}",
                    )
                continue
            if run.state_type not in FINAL_STATE_TYPES and run.state_type != "SCHEDULED":
                self.violate("no run left Running", f"run {run_id} is {run.state_type}")
            elif run.set_by_api and not run.message:
                self.violate(
                    "no run left Running", f"run {run_id} set {run.state_type} without a reason"
                )
        for run_id in twin_runs:
            run = model.flow_runs[run_id]
            if run.set_by_api or run.state_type != "RUNNING":
                self.violate(
                    "others' runs left alone",
                    f"the live twin's run {run_id} was set {run.state_type}",
                )
        twin_file = self.home / "pgw-in-flight" / WORKER / "twin.json"
        if twin_runs and not twin_file.exists():
            self.violate("others' runs left alone", "the live twin's journal file is gone")
        self.report.outcomes = outcomes


@contextlib.contextmanager
def quiet_worker_logs() -> Iterator[None]:
    """The journal logs each twin it leaves alone; the sweeps print their own summary."""
    journal_log = logging.getLogger("prefect_gpu_workers.worker.journal")
    level = journal_log.level
    journal_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        journal_log.setLevel(level)


@contextlib.contextmanager
def _sim_home(seed: int) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix=f"pgw-sim-{seed}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def simulate_workers(schedule: WorkerSchedule) -> WorkerReport:
    """Run ``schedule`` on a fresh virtual-time loop (seeded as :func:`simulate.simulate`)."""
    state = random.getstate()
    random.seed(schedule.seed)
    try:
        with (
            _sim_home(schedule.seed) as home,
            SettingsContext(profile=get_settings_context().profile, settings=_sim_settings()),
        ):
            return virtual.run(WorkerSimulation(schedule, home).run())
    finally:
        random.setstate(state)
