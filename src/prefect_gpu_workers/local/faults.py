"""``prefect-gpu-workers bench --faults``: the slot broker's guarantees under faults.

One task-level batch on local workers with their slot brokers, and, while it
runs, a drill on the first worker:

1. a flow-run process holding a GPU slot is killed with SIGKILL (as the OOM
   killer would); the time until its broker has given the slot back to Prefect
   is ``slot_reclaim_after_kill_s``;
2. while another step holds a slot, the Prefect server is restarted on the same
   database and port, with in-memory lease storage (Prefect's default), so the
   leases held at that moment are lost.

Afterwards, from the recorded GPU-step intervals and the limits:
``over_admissions`` (GPU-step starts at which a worker held more slots than its
limit), ``slots_leaked_after_server_restart`` (slots still counted once every run
is over), ``runs_failed`` (the killed run is one of them: ``runs_killed``).

Then the long-step case: the workers' brokers take 60 s leases (Prefect's
shortest, ``PGW_BROKER_LEASE_SECONDS``), one more run's GPU step lasts 90 s,
and the server restarts (in-memory leases: its lease is forgotten) while the
step holds its slot. The step ends more than a lease's duration after its last
good renewal, which is when a broker that guessed from elapsed time took the
lease for expired and gave nothing back: ``slots_leaked_after_long_step_restart``
counts what its limit still holds once the run is over.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any
from uuid import UUID

from rich.console import Console

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.gpu import detect_gpus
from prefect_gpu_workers.local.batch import prepare_pool, run_batch
from prefect_gpu_workers.local.bench import BenchOptions
from prefect_gpu_workers.local.demo import make_workdir
from prefect_gpu_workers.local.plan import (
    WorkerPlan,
    flow_runs_to_fill,
    plan_capacity,
    plan_workers,
    worker_ids,
)
from prefect_gpu_workers.local.prefect_ops import active_slots, read_runs, submit_runs
from prefect_gpu_workers.local.processes import WORKER_QUERY_SECONDS_ENV
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.local.views import ProgressView, plain_printer
from prefect_gpu_workers.naming import BROKER_LEASE_ENV
from prefect_gpu_workers.report import PhaseMetrics, over_admissions
from prefect_gpu_workers.slots.wire import decode, encode

BROKER_LINE = re.compile(r"slot broker for \S+ on (\S+)")


@dataclass
class Drill:
    """What the fault drill did and measured (filled in by its thread)."""

    killed_pid: int | None = None
    slot_reclaim_after_kill_s: float | None = None
    server_restart_s: float | None = None
    notes: list[str] = field(default_factory=list)


# The workers' broker lease in the drill (Prefect's shortest), and how much
# longer than it the long step runs.
DRILL_LEASE_S = 60
LONG_STEP_EXTRA_S = 30


@dataclass(frozen=True)
class FaultResult:
    over_admissions: int
    slot_reclaim_after_kill_s: float | None
    slots_leaked_after_server_restart: int
    slots_leaked_after_long_step_restart: int | None
    runs_failed: int
    runs_killed: int
    server_restart_s: float | None
    notes: list[str]
    metrics: PhaseMetrics

    @property
    def ok(self) -> bool:
        return (
            self.over_admissions == 0
            and self.slots_leaked_after_server_restart == 0
            and self.slots_leaked_after_long_step_restart == 0
            and self.runs_failed <= self.runs_killed
            and self.slot_reclaim_after_kill_s is not None
            and self.server_restart_s is not None
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "simulated": True,
            "faults": True,
            "over_admissions": self.over_admissions,
            "slot_reclaim_after_kill_s": self.slot_reclaim_after_kill_s,
            "slots_leaked_after_server_restart": self.slots_leaked_after_server_restart,
            "slots_leaked_after_long_step_restart": self.slots_leaked_after_long_step_restart,
            "runs_failed": self.runs_failed,
            "runs_killed": self.runs_killed,
            "server_restart_s": self.server_restart_s,
            "notes": self.notes,
            "task_level": asdict(self.metrics),
        }


def _broker_stats(path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.sendall(encode({"op": "stats"}))
        return decode(sock.makefile("rb").readline())


def _wait(condition: Any, timeout_s: float, step_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return True
        except OSError:  # a starved broker answered late: ask again
            pass
        time.sleep(step_s)
    return False


def _drill(session: LocalSession, plan: WorkerPlan, drill: Drill, timeout_s: float) -> None:
    try:
        _drill_steps(session, plan, drill, timeout_s)
    except Exception as exc:  # the batch goes on; the report says what the drill missed
        drill.notes.append(f"fault drill stopped: {exc!r}")


def _drill_steps(session: LocalSession, plan: WorkerPlan, drill: Drill, timeout_s: float) -> None:
    log_path = session.workdir / "logs" / f"worker-{plan.worker_id}.log"

    def socket_path() -> str | None:
        match = BROKER_LINE.search(log_path.read_text()) if log_path.exists() else None
        return match.group(1) if match else None

    if not _wait(lambda: socket_path() is not None, timeout_s, 0.2):
        drill.notes.append("the worker's broker never said where it listens")
        return
    path = socket_path()
    assert path is not None

    def a_holder() -> dict[str, Any] | None:
        holders = [h for h in _broker_stats(path)["holders"] if h.get("pid")]
        return holders[0] if holders else None

    if not _wait(lambda: a_holder() is not None, timeout_s):
        drill.notes.append("no GPU step ever held a slot to kill")
        return
    holder = a_holder()
    assert holder is not None
    reclaimed_before = int(_broker_stats(path)["reclaimed_on_disconnect"])

    def reclaimed() -> bool:
        return int(_broker_stats(path)["reclaimed_on_disconnect"]) > reclaimed_before

    drill.killed_pid = int(holder["pid"])
    os.kill(drill.killed_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    if _wait(reclaimed, 60):
        drill.slot_reclaim_after_kill_s = round(time.monotonic() - killed_at, 4)
    else:
        drill.notes.append("the killed holder's slot was not given back within 60 s")

    if not _wait(lambda: a_holder() is not None, timeout_s):
        drill.notes.append("no GPU step held a slot for the server restart")
        return
    server = session.server
    if server is None:
        drill.notes.append("an external Prefect server cannot be restarted by the drill")
        return
    stopped_at = time.monotonic()
    server.stop()
    server.start(timeout_s=300)
    drill.server_restart_s = round(time.monotonic() - stopped_at, 2)


def _long_step_case(
    session: LocalSession,
    deployment_id: UUID,
    plans: Sequence[WorkerPlan],
    drill: Drill,
    timeout_s: float,
) -> int | None:
    """A GPU step that outlives its lease across a server restart; the slots its
    limits still hold once its run is over (``None``: the case could not run)."""
    server = session.server
    if server is None:
        drill.notes.append("long step: an external Prefect server cannot be restarted")
        return None
    gpu_s = DRILL_LEASE_S + LONG_STEP_EXTRA_S
    params = PipelineParams(items=1, download_s=0.1, gpu_s=gpu_s, save_s=0.1, simulate=True)
    names = [plan.limit_name for plan in plans]
    with session.client() as client:
        (run_id,) = submit_runs(client, deployment_id, 1, params.as_parameters())
        if not _wait(lambda: sum(active_slots(client, names).values()) > 0, timeout_s, 0.2):
            drill.notes.append("long step: its GPU step never held a slot")
            return None
    server.stop()
    server.start(timeout_s=300)
    with session.client() as client:

        def ended() -> bool:
            (run,) = read_runs(client, [run_id])
            return run.state is not None and run.state.is_final()

        if not _wait(ended, gpu_s + timeout_s, 1.0):
            drill.notes.append("long step: its run did not end")
            return None
        # The give-back follows the step's end at once; allow a few seconds.
        _wait(lambda: sum(active_slots(client, names).values()) == 0, 10, 0.2)
        return sum(active_slots(client, names).values())


def run_faults(options: BenchOptions, console: Console) -> FaultResult:
    """Run one task-level batch of ``options`` with the drill; progress goes to ``console``.

    Raises:
        ValueError: ``PREFECT_API_URL`` is set (the drill restarts its own server).
    """
    if os.environ.get("PREFECT_API_URL"):
        raise ValueError("--faults restarts its own Prefect server: unset PREFECT_API_URL")
    capacity = plan_capacity(detect_gpus(), options.gpus, options.slots_per_gpu).capacity
    slots = capacity.slots
    g = options.gpu_seconds
    params = PipelineParams(
        items=1, download_s=g, gpu_s=g, save_s=g, simulate=True,
        artifacts=options.step_artifacts,
    )  # fmt: skip
    plans = plan_workers(
        worker_ids(options.workers, options.worker_prefix),
        slots,
        flow_runs_to_fill(slots, g, g, g),
        options.limit_prefix,
    )
    batch_runs = options.runs or 5 * slots * options.workers
    workdir_path, _ = make_workdir(options.workdir, "pgw-faults-")
    console.print(f"work directory (logs, records): {workdir_path}")
    worker_env = {BROKER_LEASE_ENV: str(DRILL_LEASE_S)}
    if options.worker_query_seconds:
        worker_env[WORKER_QUERY_SECONDS_ENV] = str(options.worker_query_seconds)
    drill = Drill()
    # The restart must lose the leases, as a default Prefect server does.
    with LocalSession(
        workdir_path,
        server_start_timeout_s=300,
        lease_storage="memory",
        say=plain_printer(console),
    ) as session:
        deployment_id = prepare_pool(session, options.pool, plans, "gpu-pipeline-faults")
        session.start_workers(plans, options.pool, worker_env)
        try:
            session.wait_for_workers(options.pool)
            thread = threading.Thread(
                target=_drill, args=(session, plans[0], drill, options.timeout_s), daemon=True
            )
            thread.start()
            with ProgressView(console, "faults", plans) as progress:
                batch = run_batch(
                    session,
                    deployment_id,
                    plans,
                    params,
                    batch_runs,
                    workdir_path / "records",
                    progress,
                    options.timeout_s,
                )
            thread.join(60)
            console.print(
                f"long step: a {DRILL_LEASE_S + LONG_STEP_EXTRA_S} s GPU step on "
                f"{DRILL_LEASE_S} s leases, the server restarted while it holds its slot"
            )
            long_step_leaked = _long_step_case(
                session, deployment_id, plans, drill, options.timeout_s
            )
        finally:
            session.stop_workers()
    limits = {plan.worker_id: plan.slots for plan in plans}
    return FaultResult(
        over_admissions=over_admissions(batch.records, limits),
        slot_reclaim_after_kill_s=drill.slot_reclaim_after_kill_s,
        slots_leaked_after_server_restart=sum(batch.slots_held_after.values()),
        slots_leaked_after_long_step_restart=long_step_leaked,
        runs_failed=batch.metrics.runs_failed,
        runs_killed=1 if drill.killed_pid else 0,
        server_restart_s=drill.server_restart_s,
        notes=drill.notes,
        metrics=batch.metrics,
    )


def render_faults(result: FaultResult, console: Console) -> None:
    console.print(
        f"over_admissions {result.over_admissions}, "
        f"slot_reclaim_after_kill_s {result.slot_reclaim_after_kill_s}, "
        f"slots_leaked_after_server_restart {result.slots_leaked_after_server_restart}, "
        f"slots_leaked_after_long_step_restart {result.slots_leaked_after_long_step_restart}, "
        f"runs_failed {result.runs_failed} (killed on purpose: {result.runs_killed}), "
        f"server restart took {result.server_restart_s} s"
    )
    for note in result.notes:
        console.print(f"[yellow]{note}[/yellow]")
