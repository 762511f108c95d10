"""Worker entrypoint: wait for this worker's limit, then run the Prefect worker and its slot broker.

A worker that polled for flow runs before its limit existed would run GPU steps
that fail closed (or, with a plain ``concurrency()``, run unlimited). So the
entrypoint waits for ``{limit_prefix}:{WORKER_ID}`` to exist and be active, with a
timeout that fails visibly (non-zero exit, the reason on stderr).

Then one process, one event loop, hosts:

- the slot broker (``slots/broker.py``) on a Unix socket in a private directory, whose
  path reaches flow runs through ``PGW_SLOT_BROKER`` (flow-run processes inherit
  the worker's environment, as they inherit ``WORKER_ID``);
- Prefect's process worker, in-process, configured as ``prefect worker start
  --type process --name $WORKER_ID --limit <flow runs> [--with-healthcheck]``
  would configure it (the same class and options, so the same behaviour), whose intake
  follows the GPU: a poll takes new flow runs only while the GPU queue at the
  broker is shorter than the worker's slots (``slots.grants.intake_open``).

SIGTERM or Ctrl-C drains the worker (``drain.py`` decides, :func:`drain` acts):
no new flow runs from that moment; the runs in flight may finish until the
drain deadline; then the worker stops the rest, sets each to a state Prefect
acts on (Scheduled again, Cancelled or Crashed, never left Running), waits for
the broker to have given their slots back, and exits. A second signal ends the
wait at once. A worker that dies without a drain (SIGKILL, a container
restart) cannot do this; the next worker of its name does it on start, from
the runs it recorded (``journal.py``, :func:`settle_left_behind`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from prefect_gpu_workers.commands import DEFAULT_LAUNCHER, DRAIN_MARGIN_S, LAUNCHERS
from prefect_gpu_workers.gpu import cuda_devices, detect_gpus
from prefect_gpu_workers.naming import (
    BROKER_LEASE_ENV,
    FLOW_RUN_ID_ENV,
    SLOT_BROKER_ENV,
    WORKER_ID_ENV,
    gib_capacity,
    parse_memory_mib,
    worker_id_from_env,
)
from prefect_gpu_workers.procfs import descendants, pids_with_env
from prefect_gpu_workers.slots.client import (
    GpuLimitUnavailable,
    GpuSlotRequest,
    read_limit,
)
from prefect_gpu_workers.slots.grants import WorkerGpu
from prefect_gpu_workers.slots.metrics import DrainGauges
from prefect_gpu_workers.worker.drain import (
    DEFAULT_DRAIN_S,
    WORKER_NAME_LABEL,
    DrainReport,
    RunOutcome,
    left_behind_message,
    left_behind_outcome,
    run_outcome,
    stopped_message,
    wants_reschedule,
)
from prefect_gpu_workers.worker.journal import InFlightJournal, LeftBehind, RunsInFlight
from prefect_gpu_workers.worker.starting import (
    WarmLauncher,
    fork_seam_missing,
    fork_starter_classes,
    installed_preloads,
    launched_now,
    runs_engine_here,
)

IntakeMode = Literal["gpu-queue", "flow-runs"]
# A drain call to Prefect gives up after this: the grace period's end is a kill.
API_CALL_TIMEOUT_S = 5.0
# After the drain's deadline, stopping the runs (the Prefect worker, their
# processes, their states, the broker's give-backs) fits in this much of the
# grace period's margin, leaving the rest for closing and exiting.
STOP_BUDGET_S = DRAIN_MARGIN_S - 5.0
# The end of the margin: the process exits (the event loop and Python's own
# teardown) in this much.
EXIT_S = 2.0
# Prefect's worker cancelled: its teardown gets this long.
WORKER_STOP_S = 2.0
# The broker's Prefect lease, and Prefect's shortest.
DEFAULT_LEASE_S = 300.0
MIN_LEASE_S = 60.0
# Pauses between tries of a submission's first write after a transient error.
SUBMIT_RETRY_S = (1.0, 2.0, 4.0)
# Pauses between tries to settle what an earlier worker of this name left, before
# this one takes runs (then the journal files wait for the next start).
SETTLE_RETRY_S = (2.0, 4.0)


def wait_for_limit(
    request: GpuSlotRequest,
    timeout_s: float,
    poll_s: float = 2.0,
    report: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True),
) -> None:
    """Block until ``request`` can be served by its limit; raise the last reason on timeout."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        try:
            request.check(read_limit(request.name))
            report(f"limit {request.name} is ready")
            return
        except GpuLimitUnavailable as exc:
            if str(exc) != str(last):
                report(f"waiting for limit: {exc}")
            last = exc
        except Exception as exc:  # Prefect not reachable yet: keep waiting, say so once
            if str(exc) != str(last):
                report(f"waiting for the Prefect API: {exc}")
            last = exc
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"limit {request.name} not ready after {timeout_s:.0f}s; last: {last}"
            )
        time.sleep(poll_s)


def submission_transient(exc: BaseException) -> bool:
    """An error that may pass if the submission is tried again later.

    The broker's transient API errors (no answer, 5xx, 429), and what a
    network glitch does to the events websocket Prefect's process worker opens
    before it starts a run: a refused or reset connection, a timeout, a
    handshake a gateway garbled or answered with a 5xx. Never a process that
    cannot start (a missing command is an ``OSError`` too, but no
    ``ConnectionError``).
    """
    from websockets.exceptions import InvalidMessage, InvalidStatus

    from prefect_gpu_workers.slots.prefect_io import transient

    if transient(exc) or isinstance(exc, ConnectionError | TimeoutError | InvalidMessage):
        return True
    return isinstance(exc, InvalidStatus) and exc.response.status_code >= 500


def _process_worker_class() -> type[Any]:
    """A Prefect ``ProcessWorker`` that drains, and whose intake follows its broker's GPU queue."""
    from prefect.workers.process import ProcessWorker

    from prefect_gpu_workers.slots.broker import SlotBroker

    class GpuProcessWorker(ProcessWorker):
        def __init__(
            self,
            *args: Any,
            broker: SlotBroker | None,
            gpu_limit: str,
            intake: IntakeMode,
            journal: InFlightJournal,
            launcher: WarmLauncher | None = None,
            **kwargs: Any,
        ) -> None:
            super().__init__(*args, **kwargs)
            # Runs fork from it where Prefect has the seam (None: subprocesses).
            self.launcher = launcher
            self.journal = journal
            # Flow runs this worker has taken and not yet seen end, in its journal.
            self.runs = RunsInFlight(journal)
            self._broker = broker
            self._gpu_limit = gpu_limit
            self._intake: IntakeMode = intake
            self.draining = False
            # Set when a poll left runs to others because the GPU queue was full:
            # the broker's next grant round then polls at once (see _intake_changed).
            self._intake_closed = False
            # Set when a poll found more runs than this worker's free flow-run
            # places: the next run to end polls at once (see _release_limit_slot).
            self._runs_left_waiting = False
            self._poll_now: asyncio.Task[Any] | None = None
            if broker is not None and intake == "gpu-queue":
                broker.on_dispatch = self._intake_changed

        def _intake_changed(self) -> None:
            if not self._intake_closed or self.draining or self._broker is None:
                return
            if not self._broker.intake_open(self._gpu_limit):
                return
            if self._poll_now is not None and not self._poll_now.done():
                return  # keep it closed: the next grant round tries again
            self._intake_closed = False
            self._poll_soon()

        def _poll_soon(self) -> None:
            """Poll now, beside the regular polls, unless such a poll is under way."""
            if self._poll_now is not None and not self._poll_now.done():
                return
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # not on the worker's loop: the regular poll comes
                return
            self._poll_now = loop.create_task(self._poll_once())

        async def _poll_once(self) -> None:
            try:
                await self.get_and_submit_flow_runs()
            except Exception:  # the regular poll retries; this one only saves a wait
                self._logger.debug("early poll after a GPU grant failed", exc_info=True)

        async def get_and_submit_flow_runs(self) -> list[Any]:
            if self.draining:  # stopping: take nothing more
                return []
            runs: list[Any] = await super().get_and_submit_flow_runs()
            return runs

        async def _submit_scheduled_flow_runs(self, flow_run_response: list[Any]) -> list[Any]:
            if self.draining:
                return []
            if (
                self._broker is not None
                and self._intake == "gpu-queue"
                and flow_run_response
                and not self._broker.intake_open(self._gpu_limit)
            ):
                # The GPU queue holds a full round: leave these runs to other workers
                # (or to this one's next grant round).
                self._logger.debug(
                    "GPU queue at %s is full: no new flow runs this poll", self._gpu_limit
                )
                self._intake_closed = True
                return []
            runs: list[Any] = await super()._submit_scheduled_flow_runs(flow_run_response)
            if runs:
                self.runs.started(runs)
            # More runs were offered than places were free: when a place frees,
            # poll then rather than at the next interval (Prefect's 10 s by
            # default, in which a GPU slot would wait for work).
            limiter = self._limiter
            self._runs_left_waiting = (
                limiter is not None
                and limiter.available_tokens == 0
                and len(flow_run_response) > len(runs)
            )
            return runs

        async def _give_worker_labels_to_flow_run(self, flow_run_id: Any) -> None:
            # The first write of a submission: a busy server (SQLite locked, a
            # restart) fails it often, and Prefect's client retries no 500.
            label = super()._give_worker_labels_to_flow_run
            for pause_s in (*SUBMIT_RETRY_S, None):
                try:
                    await label(flow_run_id)
                    return
                except Exception as exc:
                    if pause_s is None or self.draining or not submission_transient(exc):
                        raise
                    self._logger.info(
                        "labelling flow run %s failed (%s); trying again in %.0f s",
                        flow_run_id,
                        exc,
                        pause_s,
                    )
                    await asyncio.sleep(pause_s)

        async def _propose_crashed_state(
            self, flow_run: Any, message: str, client: Any = None
        ) -> None:
            # Prefect calls this while it handles the error that stopped a
            # submission. A run whose submission met a transient API error never
            # started: it goes back in the queue rather than being Crashed.
            error = sys.exc_info()[1]
            if error is None or not submission_transient(error):
                await super()._propose_crashed_state(flow_run, message, client)
                return
            from prefect.states import Scheduled

            why = f"{self.name} could not submit it (Prefect API: {error}); scheduled again"
            api: Any = client or self.client
            try:
                setting = api.set_flow_run_state(
                    flow_run.id, Scheduled(name="Rescheduled", message=why), force=True
                )
                await asyncio.wait_for(setting, API_CALL_TIMEOUT_S)
                self._logger.warning("flow run %s: %s", flow_run.id, why)
            except Exception as exc:  # the server's own checks end it, as Prefect's would
                self._logger.error(
                    "flow run %s: could not schedule it again after %s: %s", flow_run.id, error, exc
                )

        async def run(self, flow_run: Any, configuration: Any, task_status: Any = None) -> Any:
            if fork_seam_missing() is not None:  # Prefect before 3.9: its own run
                return await super().run(flow_run, configuration, task_status)
            return await _run_flow_run(self.launcher, flow_run, configuration, task_status)

        def _release_limit_slot(self, flow_run_id: Any) -> None:
            # Prefect frees a run's place here when its process has ended (or it
            # was never started): from then on it is not in flight. Prefect's
            # own release comes whatever the journal does: skipping it would
            # take one of this worker's flow-run places for good.
            try:
                self.runs.ended(flow_run_id)
            finally:
                super()._release_limit_slot(flow_run_id)
            if self._runs_left_waiting and not self.draining:
                self._runs_left_waiting = False
                self._poll_soon()

    return GpuProcessWorker


async def _run_flow_run(
    launcher: WarmLauncher | None, flow_run: Any, configuration: Any, task_status: Any
) -> Any:
    """Prefect 3.9's ``ProcessWorker.run``, whose default starter forks from ``launcher``.

    The same steps in the same order as Prefect's (its executor context, its
    starters for a configured command, its result); only the starter of a run
    with Prefect's default command differs, and every run's environment says
    when the worker started it (``PGW_LAUNCHED_AT``, for the start-time figures).
    """
    import tempfile
    import warnings

    import anyio
    from prefect.flows import load_flow_from_flow_run
    from prefect.runner._flow_run_executor import FlowRunExecutorContext
    from prefect.runner._starter_engine import EngineCommandStarter
    from prefect.runner._workspace_starter import WorkspaceResolvingEngineCommandStarter
    from prefect.workers.process import ProcessWorkerResult

    if task_status is None:
        task_status = anyio.TASK_STATUS_IGNORED
    environment = launched_now(configuration.env)
    working_dir_ctx = (
        tempfile.TemporaryDirectory(suffix="prefect")
        if not configuration.working_dir
        else contextlib.nullcontext(configuration.working_dir)
    )
    execution: Any = None
    with working_dir_ctx as working_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        async with FlowRunExecutorContext() as ctx:
            workspace_root = Path(working_dir).resolve()  # noqa: ASYNC240 - as Prefect's run does
            forking, forking_engine = fork_starter_classes()
            if configuration._command_configured:
                command_options: dict[str, Any] = dict(
                    command=configuration.command,
                    cwd=workspace_root,
                    env=environment,
                    stream_output=configuration.stream_output,
                    control_channel=ctx.control_channel,
                )
                forkable = runs_engine_here(configuration.command)
                if launcher is not None and not forkable:
                    launcher.say(
                        f"command:{configuration.command}",
                        f"flow runs whose command is {configuration.command!r} start as "
                        "subprocesses: only this interpreter's -m prefect.engine forks",
                    )
                starter = (
                    forking_engine(launcher=launcher, **command_options)
                    if launcher is not None and forkable
                    else EngineCommandStarter(**command_options)
                )
                executor = ctx.create_executor(
                    flow_run,
                    starter,
                    resolve_flow=load_flow_from_flow_run,
                    propose_submitting=False,
                )
            else:
                options: dict[str, Any] = dict(
                    workspace_root=workspace_root,
                    command=None,
                    stream_output=configuration.stream_output,
                    control_channel=ctx.control_channel,
                    source_cwd=workspace_root,
                    environment=environment,
                )
                workspace_starter = (
                    forking(launcher=launcher, **options)
                    if launcher is not None
                    else WorkspaceResolvingEngineCommandStarter(**options)
                )
                ctx.call_after_exit(workspace_starter.close)
                executor = ctx.create_executor(
                    flow_run,
                    workspace_starter,
                    propose_submitting=False,
                    hook_runner=workspace_starter.hook_runner,
                )

            async def execute(*, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
                nonlocal execution
                execution = await executor.submit(task_status=task_status)

            async with anyio.create_task_group() as task_group:
                handle = await task_group.start(execute)
                if handle.pid is None:
                    raise RuntimeError("Flow run process has no PID")
                task_status.started(handle.pid)
    if execution is None or execution.status_code is None:
        raise RuntimeError("Failed to start flow run process.")
    return ProcessWorkerResult(
        status_code=execution.status_code, identifier=str(execution.handle.pid)
    )


async def _read_states(client: Any, run_ids: list[Any]) -> dict[Any, Any]:
    """Each run's current FlowRun from Prefect (runs Prefect no longer has are left out)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    if not run_ids:
        return {}
    runs = await client.read_flow_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids)), limit=len(run_ids)
    )
    return {run.id: run for run in runs}


def _kill_flow_run_processes(run_ids: list[Any], worker_name: str) -> list[int]:
    """SIGKILL what is left of these runs' processes (and their process groups).

    Only the processes of ``worker_name``'s runs (their ``WORKER_ID``): a run
    claimed again by another worker on this host runs under that worker's name.
    """
    killed: list[int] = []
    for run_id in run_ids:
        found = pids_with_env(FLOW_RUN_ID_ENV, str(run_id), **{WORKER_ID_ENV: worker_name})
        # Their descendants too: a look at /proc may miss one for a while (procfs).
        for pid in sorted({*found, *descendants(found)}):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid and pid != os.getpgid(0):
                    os.killpg(pid, signal.SIGKILL)
                else:
                    os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


async def _settle_entry(client: Any, worker: Any, entry: LeftBehind, result: DrainReport) -> None:
    """Settle the runs of one left-behind journal file (:func:`drain.left_behind_outcome`)."""
    from uuid import UUID

    read = _read_states(client, [UUID(run_id) for run_id in entry.run_ids])
    runs = await asyncio.wait_for(read, API_CALL_TIMEOUT_S)
    for run_id, run in runs.items():
        state_type = run.state_type.value if run.state_type else None
        labels = getattr(run, "labels", None) or {}
        claimed_by = labels.get(WORKER_NAME_LABEL)
        reschedule = wants_reschedule(run.job_variables.get("env"), os.environ)
        outcome = left_behind_outcome(state_type, claimed_by, worker.name, reschedule)
        state = _stopped_state(outcome, left_behind_message(worker.name))
        if state is not None:
            _kill_flow_run_processes([run_id], worker.name)
            setting = client.set_flow_run_state(run_id, state, force=True)
            await asyncio.wait_for(setting, API_CALL_TIMEOUT_S)
        result.add(outcome, str(run_id))


def _stopped_state(outcome: RunOutcome, message: str) -> Any | None:
    """The Prefect state a stopped run is set to, with ``message``; ``None``: none
    (it finished, or is another worker's now)."""
    from prefect.states import Cancelled, Crashed, Scheduled

    if outcome is RunOutcome.RESCHEDULE:
        return Scheduled(name="Rescheduled", message=message)
    if outcome is RunOutcome.CANCEL:
        return Cancelled(message=message)
    if outcome is RunOutcome.CRASH:
        return Crashed(message=message)
    return None


async def settle_left_behind(
    worker: Any,
    report: Callable[[str], None],
    retry_s: tuple[float, ...] = SETTLE_RETRY_S,
    connect: Callable[[], Any] | None = None,
) -> DrainReport:
    """End the runs earlier workers of this name left in flight when they died.

    Each left-behind journal file (:meth:`InFlightJournal.left_behind`) is
    settled as a drain past its deadline settles its runs (Scheduled again,
    Cancelled or Crashed, never left Running), runs claimed since by another
    worker excepted. In a pod a run's process died with the container; in
    local mode it may still run, cut off from the dead worker that carried its
    output (it would stall at its next log line), so what is left of it is
    stopped first. A file is dropped once its runs are settled; with Prefect
    away it is tried again after each of ``retry_s``, then kept for the next
    start (this worker's own journal is another file: it never overwrites it).
    ``connect`` opens the Prefect client (default: ``get_client``; the simulation's
    talks to its model).
    """
    from prefect.client.orchestration import get_client

    connect = connect or get_client
    result = DrainReport()
    pending = worker.journal.left_behind()
    for pause_s in (*retry_s, None):
        if not pending:
            break
        failed: list[LeftBehind] = []
        error = ""
        try:
            async with connect() as client:
                for entry in pending:
                    try:
                        await _settle_entry(client, worker, entry, result)
                    except Exception as exc:  # this file waits for the next try
                        error = f"{type(exc).__name__}: {exc}"
                        failed.append(entry)
                    else:
                        worker.journal.forget(entry)
        except Exception as exc:  # no client at all
            error, failed = f"{type(exc).__name__}: {exc}", pending
        pending = failed
        if pending:
            later = f"trying again in {pause_s:.0f} s" if pause_s else "kept for the next start"
            report(
                f"could not settle the flow runs an earlier {worker.name} left "
                f"({len(pending)} journal file(s); {error}): {later}"
            )
            if pause_s:
                await asyncio.sleep(pause_s)
    if result.rescheduled or result.cancelled or result.crashed or result.moved:
        report(
            f"settled the flow runs an earlier {worker.name} left in flight: "
            f"{len(result.rescheduled)} rescheduled, {len(result.cancelled)} cancelled, "
            f"{len(result.crashed)} crashed, {len(result.moved)} claimed by another worker "
            "since (left alone)"
        )
    return result


async def drain(
    worker: Any,
    worker_task: asyncio.Task[Any],
    drain_s: float,
    hurry: asyncio.Event,
    report: Callable[[str], None],
    connect: Callable[[], Any] | None = None,
) -> DrainReport:
    """Drain ``worker`` (a draining ``GpuProcessWorker`` whose ``start`` runs in ``worker_task``).

    Waits up to ``drain_s`` (or until ``hurry`` is set) for the runs in flight to
    end, then stops the Prefect worker and what is left of its runs' processes,
    and sets each stopped run's state as :func:`drain.run_outcome` says.

    An unreachable Prefect API does not stop the drain: the wait follows the
    runs' processes, and a state that cannot be set is counted as unset.
    ``connect`` opens the Prefect client (as in :func:`settle_left_behind`).
    """
    from prefect.client.orchestration import get_client

    connect = connect or get_client

    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + drain_s
    result = DrainReport()
    at_start = set(worker.runs.runs)
    async with connect() as client:
        said_at = -1.0
        api_error: str | None = None
        while True:
            try:
                read = _read_states(client, list(worker.runs.runs))
                # Not past the deadline by much: the margin after it is the stop's.
                bound_s = min(API_CALL_TIMEOUT_S, max(deadline - loop.time(), 1.0))
                runs = await asyncio.wait_for(read, bound_s)
                api_error = None
                waiting = [
                    run_id
                    for run_id, run in runs.items()
                    if run_outcome(run.state_type.value if run.state_type else None, False, False)
                    is RunOutcome.WAIT
                ]
            except Exception as exc:  # Prefect away: the processes still say what runs
                if api_error is None:  # once per outage
                    report(f"draining without the Prefect API ({type(exc).__name__}: {exc})")
                api_error = str(exc) or type(exc).__name__
                waiting = list(worker.runs.runs)
            left = deadline - loop.time()
            if not waiting or left <= 0 or hurry.is_set() or worker_task.done():
                break
            if loop.time() - said_at >= 10:
                report(f"draining: {len(waiting)} flow run(s) in flight, {left:.0f} s left")
                said_at = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), timeout=min(1.0, left))
        # What was still in flight is stopped with the Prefect worker. It stays
        # in the journal until its state is set: a SIGKILL from here on leaves
        # it to the next worker of this name, never Running with no record.
        stopping = dict(worker.runs.runs)
        worker.runs.keep(stopping)
        for run_id in at_start - set(stopping):
            result.add(RunOutcome.FINISHED, str(run_id))
        # From here the grace period's margin runs: every step is bounded.
        stop_started = loop.time()
        stop_by = stop_started + STOP_BUDGET_S
        worker_task.cancel()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(worker_task, return_exceptions=True), WORKER_STOP_S
            )
        _kill_flow_run_processes(list(stopping), worker.name)
        after: dict[Any, Any] = {}
        try:
            read = _read_states(client, list(stopping))
            after = await asyncio.wait_for(read, max(min(API_CALL_TIMEOUT_S, _left(stop_by)), 1.0))
            api_error = None
        except Exception as exc:  # decide from what the worker last saw of each run
            api_error = api_error or f"reading the runs failed: {type(exc).__name__}: {exc}"

        async def settle(run_id: Any, outcome: RunOutcome, state: Any) -> None:
            try:
                if api_error is not None:  # one failure already: do not spend the margin
                    raise RuntimeError(f"Prefect API unreachable ({api_error})")
                setting = client.set_flow_run_state(run_id, state, force=True)
                await asyncio.wait_for(setting, max(_left(stop_by), 1.0))
            except Exception as exc:
                report(f"could not set flow run {run_id} {outcome.value}: {exc!r}")
                result.unset.append(str(run_id))  # it stays in the journal
                return
            result.add(outcome, str(run_id))
            worker.runs.settled(run_id)

        settling = []
        for run_id, flow_run in stopping.items():
            run: Any = after.get(run_id) or flow_run
            state_type = run.state_type.value if run.state_type else None
            outcome = run_outcome(
                state_type, True, wants_reschedule(run.job_variables.get("env"), os.environ)
            )
            state = _stopped_state(outcome, stopped_message(outcome, worker.name, drain_s))
            if state is None:
                result.add(outcome, str(run_id))
                worker.runs.settled(run_id)
            else:
                settling.append(settle(run_id, outcome, state))
        await asyncio.gather(*settling)  # at once: one slow answer must not hold the rest
        result.stopping_s = loop.time() - stop_started
        result.waited_s = loop.time() - started
    return result


def _left(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


async def run_until_stopped(
    worker: Any,
    with_healthcheck: bool,
    drain_s: float,
    broker: Any | None = None,
    drain_gauges: DrainGauges | None = None,
) -> DrainReport | None:
    """Run ``worker.start`` until it ends or a signal drains it; the drain's report, if any.

    SIGTERM and SIGINT start the drain; a second one ends its wait at once.
    With a ``broker``, waits (up to 10 s) for it to have given the stopped
    runs' slots back before returning. ``drain_gauges`` (the metrics') say when
    the drain began.
    """
    loop = asyncio.get_running_loop()
    stop, hurry = asyncio.Event(), asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            print(f"{signal.Signals(signum).name} again: stopping the flow runs now", flush=True)
            hurry.set()
        else:
            print(
                f"{signal.Signals(signum).name}: draining, no new flow runs; "
                f"{drain_s:.0f} s for those in flight",
                flush=True,
            )
            worker.draining = True
            if drain_gauges is not None:
                drain_gauges.begin(time.time())
            stop.set()

    def on_late_signal(signum: int) -> None:
        print(f"{signal.Signals(signum).name}: already stopping", flush=True)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await settle_left_behind(worker, print_line)
    worker_task = asyncio.ensure_future(
        worker.start(with_healthcheck=with_healthcheck, printer=print)
    )
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({worker_task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if not stop.is_set():
            worker_task.result()  # the worker ended on its own: its error, if any
            return None
        report = await drain(worker, worker_task, drain_s, hurry, print_line)
        if broker is not None:
            # The rest of the margin, less a little for exiting: the broker's
            # give-backs, then its close.
            left_s = DRAIN_MARGIN_S - EXIT_S - report.stopping_s
            started_closing = loop.time()
            await broker.settled(timeout_s=max(left_s / 2, 1.0))
            await broker.close(timeout_s=max(left_s - (loop.time() - started_closing), 1.0))
        print_line(report.describe())
        return report
    finally:
        stopped.cancel()
        # A signal from here on (the broker closing) must not kill the process
        # with its default action: it is said and the close goes on.
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_late_signal, signum)


def print_line(line: str) -> None:
    print(line, flush=True)


def _new_worker(
    pool: str,
    worker_id: str,
    flow_runs: int,
    broker: Any | None,
    gpu_limit: str,
    intake: IntakeMode,
    launcher: WarmLauncher | None,
) -> Any:
    """The Prefect process worker, configured as ``prefect worker start --type process
    --name WORKER_ID --limit FLOW_RUNS`` would configure it."""
    from prefect.settings import (
        PREFECT_HOME,
        PREFECT_WORKER_HEARTBEAT_SECONDS,
        PREFECT_WORKER_PREFETCH_SECONDS,
    )

    return _process_worker_class()(
        name=worker_id,
        work_pool_name=pool,
        limit=flow_runs,
        prefetch_seconds=PREFECT_WORKER_PREFETCH_SECONDS.value(),
        heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()),
        broker=broker,
        gpu_limit=gpu_limit,
        intake=intake,
        journal=InFlightJournal(Path(PREFECT_HOME.value()), worker_id),
        launcher=launcher,
    )


def broker_gpus(stated_gpus: int | None, stated_memory: str | None) -> tuple[WorkerGpu, ...]:
    """The GPUs this worker's broker places memory requests on, in CUDA's order.

    Stated memory (``--gpu-memory``) wins, over ``--gpus`` GPUs (else those
    CUDA sees, else one); else the memory NVML reports for each device this
    process sees (``CUDA_VISIBLE_DEVICES`` respected, MIG instances as GPUs);
    else ``--gpus`` (default 1) GPUs sharing the memory limit evenly.
    """
    devices = cuda_devices(detect_gpus(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    if stated_memory is not None:
        gib = gib_capacity(parse_memory_mib(stated_memory))
        count = stated_gpus or len(devices) or 1
        uuids = [d.uuid for d in devices[:count]] + [""] * count
        return tuple(WorkerGpu(i, uuids[i], gib) for i in range(count))
    if devices and all(d.memory_mib is not None for d in devices):
        return tuple(
            WorkerGpu(i, d.uuid, gib_capacity(d.memory_mib or 0)) for i, d in enumerate(devices)
        )
    return tuple(WorkerGpu(i) for i in range(stated_gpus or len(devices) or 1))


def describe_gpus(gpus: tuple[WorkerGpu, ...]) -> str:
    """One line: each GPU's device and memory (or its share of the memory limit)."""
    return ", ".join(
        f"{gpu.device} {gpu.memory_gib} GiB" if gpu.memory_gib is not None
        else f"{gpu.device} (a share of the memory limit)"
        for gpu in gpus
    )  # fmt: skip


async def serve_worker(
    pool: str,
    worker_id: str,
    request: GpuSlotRequest,
    flow_runs: int,
    with_healthcheck: bool = False,
    intake: IntakeMode = "gpu-queue",
    socket_path: Path | None = None,
    metrics_socket: Path | None = None,
    drain_s: float = DEFAULT_DRAIN_S,
    launcher: WarmLauncher | None = None,
    gpus: tuple[WorkerGpu, ...] = (WorkerGpu(0),),
    metrics_port: int | None = None,
) -> DrainReport | None:
    """Run the slot broker and the Prefect process worker in this event loop until drained."""
    from prefect_gpu_workers.slots.broker import SlotBroker

    lease_s = float(os.environ.get(BROKER_LEASE_ENV) or DEFAULT_LEASE_S)
    if lease_s < MIN_LEASE_S:
        raise ValueError(f"{BROKER_LEASE_ENV}={lease_s:g}: Prefect's shortest lease is 60 s")
    async with SlotBroker(worker_id, socket_path, lease_duration=lease_s, gpus=gpus) as broker:
        await broker.watch(request.name)
        os.environ[SLOT_BROKER_ENV] = str(broker.socket_path)
        print(f"slot broker for {request.name} on {broker.socket_path}", flush=True)
        print(f"memory requests are placed on {describe_gpus(gpus)}", flush=True)
        from prefect_gpu_workers.telemetry import feed_gpu_readings

        drain_gauges = DrainGauges(grace_s=drain_s)

        def metrics_text() -> str:
            return broker.metrics_text() + "\n".join(drain_gauges.lines()) + "\n"

        metrics_servers: list[asyncio.AbstractServer] = []
        if metrics_socket is not None:
            from prefect_gpu_workers.slots.metrics import serve_metrics

            metrics_servers.append(await serve_metrics(metrics_socket, metrics_text))
            print(f"slot broker metrics on {metrics_socket}", flush=True)
        if metrics_port is not None:
            from prefect_gpu_workers.slots.metrics import serve_metrics_http

            metrics_servers.append(await serve_metrics_http(metrics_port, metrics_text))
            print(f"worker metrics on http://0.0.0.0:{metrics_port}/metrics", flush=True)
        # NVML once a second: the accounting's busy and memory figures, per-GPU
        # gauges. Only read where the metrics are served: nobody else reads them.
        sampling = None
        if metrics_servers:
            sampling = asyncio.ensure_future(
                feed_gpu_readings(
                    lambda readings: broker.accounting.sample(readings, broker.clock()),
                    [gpu.uuid for gpu in gpus],
                    say=print_line,
                )
            )
        worker = _new_worker(pool, worker_id, flow_runs, broker, request.name, intake, launcher)
        # Only the processes of this worker's runs wait at its broker.
        broker.runs_in_flight = lambda: {str(run_id) for run_id in worker.runs.runs}
        try:
            return await run_until_stopped(worker, with_healthcheck, drain_s, broker, drain_gauges)
        finally:
            if sampling is not None:
                sampling.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampling
            for server in metrics_servers:
                server.close()


async def serve_plain_worker(
    pool: str,
    worker_id: str,
    request: GpuSlotRequest,
    flow_runs: int,
    with_healthcheck: bool = False,
    drain_s: float = DEFAULT_DRAIN_S,
    launcher: WarmLauncher | None = None,
) -> DrainReport | None:
    """Prefect's process worker alone: GPU steps poll Prefect (the comparison baseline)."""
    os.environ.pop(SLOT_BROKER_ENV, None)
    print("no slot broker: GPU steps poll Prefect", flush=True)
    worker = _new_worker(pool, worker_id, flow_runs, None, request.name, "flow-runs", launcher)
    return await run_until_stopped(worker, with_healthcheck, drain_s)


def run_worker(
    pool: str,
    flow_runs: int,
    limit_prefix: str,
    wait_timeout_s: float,
    with_healthcheck: bool = False,
    intake: IntakeMode = "gpu-queue",
    metrics_socket: Path | None = None,
    slot_broker: bool = True,
    drain_s: float = DEFAULT_DRAIN_S,
    launcher: str = DEFAULT_LAUNCHER,
    preload: list[str] | None = None,
    gpus: int | None = None,
    gpu_memory: str | None = None,
    metrics_port: int | None = None,
) -> None:
    """Wait for the limit, then serve the broker and the Prefect worker until drained.

    The warm launcher (``--launcher fork``) starts first, so that it imports
    Prefect while the entrypoint waits for the limit.

    Raises:
        WorkerIdentityError: ``WORKER_ID`` missing or invalid.
        TimeoutError: the limit was not ready within ``wait_timeout_s``.
    """
    worker_id = worker_id_from_env()
    request = GpuSlotRequest.for_worker(1, limit_prefix, worker_id)
    with contextlib.ExitStack() as stack:
        warm = stack.enter_context(_warm_launcher(launcher, preload))
        wait_for_limit(request, wait_timeout_s)
        if warm is not None:
            # Importing Prefect takes the launcher about as long as a run's
            # subprocess would: runs taken before it is ready would pay that.
            not_ready = warm.wait_ready()
            print_line(
                "warm launcher ready" if not_ready is None else f"{not_ready}: runs fall back"
            )
        if not slot_broker:
            if metrics_port is not None:
                print_line("no slot broker: --metrics-port serves nothing")
            asyncio.run(
                serve_plain_worker(
                    pool, worker_id, request, flow_runs, with_healthcheck, drain_s, launcher=warm
                )
            )
            return
        asyncio.run(
            serve_worker(
                pool,
                worker_id,
                request,
                flow_runs,
                with_healthcheck,
                intake,
                metrics_socket=metrics_socket,
                drain_s=drain_s,
                launcher=warm,
                gpus=broker_gpus(gpus, gpu_memory),
                metrics_port=metrics_port,
            )
        )


@contextlib.contextmanager
def _warm_launcher(kind: str, preload: list[str] | None) -> Iterator[WarmLauncher | None]:
    """The worker's launcher for ``--launcher fork``; None: runs start as subprocesses (said)."""
    if kind not in LAUNCHERS:
        raise ValueError(f"--launcher must be one of {', '.join(LAUNCHERS)}, not {kind!r}")
    missing = fork_seam_missing() if kind == "fork" else "--launcher subprocess"
    if missing is not None:
        print_line(f"flow runs start as subprocesses: {missing}")
        yield None
        return
    modules = installed_preloads() if preload is None else preload
    with tempfile.TemporaryDirectory(prefix="pgw-launcher-") as directory:
        launcher = WarmLauncher(Path(directory), modules, print_line)
        launcher.start()
        print_line(
            f"warm launcher starting (pid {launcher.pid}; preloading Prefect"
            + "".join(f", {module}" for module in modules)
            + ")"
        )
        try:
            yield launcher
        finally:
            launcher.close()
