"""The ``start`` service: limits, workers, supervision, drain and cleanup for one machine.

Life of a service (each step said aloud):

1. worker id, GPUs (NVML) and the plan: one worker, or one per GPU;
2. a lock per worker name on this host, then any process a dead predecessor
   left with that name (its flow runs) is stopped;
3. the process work pool is created if missing; a name whose Prefect worker is
   *live* (see :mod:`.plan`) is refused, with the reason;
4. each limit (a worker's slot limit, and its memory limit where its GPUs'
   memory is known) is created fresh (a stale one of the same name, left by a
   crash, is recreated: its slots belong to dead holders, so they are dropped
   rather than doubled);
5. each worker runs the worker entrypoint (``prefect-gpu-workers worker``), is
   restarted after a crash with backoff (its leftover flow runs stopped and its
   limits recreated first), and the service exits 1 after a crash loop;
   every 15 s the limits are put back as planned if someone changed them;
6. on SIGTERM or Ctrl-C: SIGTERM to every worker (the entrypoint drains), wait
   up to the drain timeout (a second signal cuts it short), stop what is left,
   then delete the limits and the worker records. The same cleanup runs on any
   error after step 2.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from prefect.client.orchestration import SyncPrefectClient, get_client

from prefect_gpu_workers.commands import (
    DEFAULT_LAUNCHER,
    DRAIN_MARGIN_S,
    drain_seconds_within,
    module_program,
    worker_command,
)
from prefect_gpu_workers.gpu import GpuInventory, detect_gpus
from prefect_gpu_workers.naming import DEFAULT_LIMIT_PREFIX, WorkerIdentityError
from prefect_gpu_workers.procfs import owner_token
from prefect_gpu_workers.service import prefect_ops
from prefect_gpu_workers.service.identity import PER_GPU_SUFFIX_ROOM, resolve_worker_id
from prefect_gpu_workers.service.plan import (
    MemoryPerSlot,
    RestartPolicy,
    ServicePlan,
    ServiceWorker,
    SlotsPerGpu,
    devices_from,
    judge_liveness,
    plan_service,
    watch_seconds,
)
from prefect_gpu_workers.service.processes import (
    OWNER_ENV,
    NameLock,
    NameLocked,
    marked_pids,
    orphaned_pids,
    start_worker_process,
    state_dir,
    stop_pids,
)

# Exit codes: 0 stopped on request; 1 failed (crash loop, Prefect error);
# 2 refused (a name in use, bad capacity): restarting will not help.
EXIT_OK, EXIT_FAILED, EXIT_REFUSED = 0, 1, 2
# sun_path's size on Linux: a Unix socket's path, its final NUL included.
UNIX_PATH_MAX = 108
FLOW_RUN_GRACE_S = 10.0
WATCH_POLL_S = 2.0
WORKER_WAIT_FOR_LIMIT_S = 300.0


@dataclass(frozen=True)
class StartOptions:
    pool: str
    worker_id: str | None = None
    per_gpu: bool = False
    memory_per_slot: int | None = None  # bytes
    slots_per_gpu: int | None = None
    gpus: int | None = None
    gpu_memory_mib: int | None = None  # each stated GPU's memory (--gpu-memory)
    flow_runs: int | None = None
    drain_timeout_s: float = 600.0
    limit_prefix: str = DEFAULT_LIMIT_PREFIX
    reconcile_s: float = 15.0
    # Worker output: a file per worker here, or the service's own output when None.
    log_dir: Path | None = None
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    # How the workers start their flow runs (--launcher).
    launcher: str = DEFAULT_LAUNCHER


class Refused(RuntimeError):
    """The service must not start: restarting it unchanged would not help."""


def worker_argv(
    worker: ServiceWorker,
    pool: str,
    drain_s: float,
    launcher: str = DEFAULT_LAUNCHER,
    metrics_socket: Path | None = None,
) -> list[str]:
    """The worker entrypoint for ``worker``, through this interpreter (as local mode does).

    ``metrics_socket``: where the worker serves its Prometheus metrics (a Unix
    socket: a bare machine's workers open nothing on TCP; see :func:`metrics_socket_of`).
    """
    return worker_command(
        pool,
        flow_runs=worker.flow_runs,
        limit_prefix=worker.limit_prefix,
        wait_timeout_s=WORKER_WAIT_FOR_LIMIT_S,
        program=module_program(sys.executable),
        drain_s=drain_s,
        launcher=launcher,
        gpus=None if worker.memory is None else worker.memory.gpus,
        gpu_memory=None if worker.memory is None else worker.memory.gpu_memory,
        metrics_socket=None if metrics_socket is None else str(metrics_socket),
    )


def metrics_socket_of(directory: Path, worker: str) -> Path | None:
    """The Unix socket a service's worker serves its metrics on, beside its name
    lock; None where that path is too long for a Unix socket (108 bytes on Linux).

    Example:
        >>> metrics_socket_of(Path("/run/prefect-gpu-workers"), "box-gpu0")
        PosixPath('/run/prefect-gpu-workers/box-gpu0.metrics.sock')
        >>> metrics_socket_of(Path("/run/user/1000/prefect-gpu-workers"), "w" * 63) is None
        True
    """
    path = directory / f"{worker}.metrics.sock"
    return path if len(os.fsencode(path)) < UNIX_PATH_MAX else None


def build_plan(
    options: StartOptions,
    inventory: GpuInventory,
    env: Mapping[str, str],
    host_name: str,
) -> tuple[ServicePlan, tuple[str, ...]]:
    """The plan and the lines that explain it (pure: NVML's answer is an input).

    Raises:
        Refused: an invalid worker id or capacity.
    """
    try:
        room = PER_GPU_SUFFIX_ROOM if options.per_gpu else 0
        choice = resolve_worker_id(options.worker_id, env, host_name, room)
        devices = devices_from(inventory, options.gpus, options.gpu_memory_mib)
        sizing = (
            MemoryPerSlot(options.memory_per_slot)
            if options.memory_per_slot is not None
            else SlotsPerGpu(options.slots_per_gpu or 1)
        )
        plan = plan_service(
            choice.worker_id,
            devices,
            sizing,
            per_gpu=options.per_gpu,
            flow_runs=options.flow_runs,
            limit_prefix=options.limit_prefix,
        )
    except (ValueError, WorkerIdentityError) as exc:
        raise Refused(str(exc)) from None
    return plan, (choice.message, inventory.describe(), *plan.messages)


@dataclass
class _Running:
    worker: ServiceWorker
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    crashes: int = 0
    restart_at: float | None = None


class StartService:
    """One ``prefect-gpu-workers start``; :meth:`run` returns the exit code."""

    def __init__(
        self,
        options: StartOptions,
        say: Callable[[str], None],
        env: Mapping[str, str] | None = None,
        inventory: GpuInventory | None = None,
    ) -> None:
        self.options = options
        self.say = say
        self.env = dict(os.environ if env is None else env)
        self.inventory = inventory
        self.stop_requested = threading.Event()
        self.hurry = threading.Event()  # a second signal: no more waiting
        self.locks: list[NameLock] = []
        self.created_limits: list[str] = []
        self.running: dict[str, _Running] = {}
        self.owner = owner_token()

    # ------------------------------------------------------------ signals

    def request_stop(self, signum: int, frame: FrameType | None = None) -> None:
        if self.stop_requested.is_set():
            self.hurry.set()
            return
        self.stop_requested.set()

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {
            sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # ------------------------------------------------------------ main

    def run(self) -> int:
        with self._signals():
            try:
                plan = self._prepare()
            except Refused as exc:
                self.say(f"refused: {exc}")
                self._release_locks()
                return EXIT_REFUSED
            except Exception as exc:  # Prefect unreachable, a pool of another type...
                self.say(f"failed before starting: {type(exc).__name__}: {exc}")
                self._release_locks()
                return EXIT_FAILED
            try:
                return self._serve(plan)
            except Exception as exc:
                self.say(f"failed: {type(exc).__name__}: {exc}")
                return EXIT_FAILED
            finally:
                self._cleanup()

    def _prepare(self) -> ServicePlan:
        inventory = self.inventory if self.inventory is not None else detect_gpus()
        plan, lines = build_plan(self.options, inventory, self.env, socket.gethostname())
        for line in lines:
            self.say(line)
        names = [worker.name for worker in plan.workers]
        directory = state_dir(self.env)
        for name in names:
            lock = NameLock(directory / f"{name}.lock")
            try:
                lock.acquire()
            except NameLocked as exc:
                raise Refused(str(exc)) from None
            self.locks.append(lock)
        for name in names:
            # A dead service's flow runs would still hold the GPU.
            stopped = stop_pids(functools.partial(orphaned_pids, name), FLOW_RUN_GRACE_S)
            if stopped:
                self.say(f"stopped {len(stopped)} process(es) a stopped service left for {name}: "
                         f"pids {stopped}")  # fmt: skip
        with self._client() as client:
            if prefect_ops.ensure_process_pool(client, self.options.pool):
                self.say(f"created process work pool {self.options.pool}")
            self._refuse_live_names(client, set(names))
        return plan

    def _refuse_live_names(self, client: SyncPrefectClient, names: set[str]) -> None:
        before = prefect_ops.sightings(client, names)
        limit_s = watch_seconds(before)
        pending = set()
        for name in sorted(names):
            mine = [s for s in before if s.name == name]
            if any(s.online for s in mine):
                pending.add(name)
            else:
                self.say(f"name free: {judge_liveness(name, mine, None).reason}")
        if pending:
            self.say(f"worker record(s) {', '.join(sorted(pending))} ONLINE: watching for a "
                     "heartbeat (live: refused) or the server marking them OFFLINE (a crash "
                     f"left them: taken over), at most {limit_s:.0f}s")  # fmt: skip
        deadline = time.monotonic() + limit_s
        while pending:
            if self.stop_requested.wait(WATCH_POLL_S):
                raise Refused("stopped while checking the names")
            after = prefect_ops.sightings(client, pending)
            for name in sorted(pending):
                verdict = judge_liveness(
                    name,
                    [s for s in before if s.name == name],
                    [s for s in after if s.name == name],
                )
                if verdict.live:
                    raise Refused(
                        f"{verdict.reason}. Worker names must be unique: limit "
                        f"{self.options.limit_prefix}:{name} belongs to that worker. Choose "
                        "another --worker-id (or WORKER_ID), or stop the other worker first"
                    )
                if verdict.live is False:
                    self.say(f"name free: {verdict.reason}")
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                raise Refused(
                    f"worker record(s) {', '.join(sorted(pending))} stayed ONLINE for "
                    f"{limit_s:.0f}s without a new heartbeat; cannot tell live from dead, "
                    "so refusing (check the server's clock and the other machines)"
                )

    def _serve(self, plan: ServicePlan) -> int:
        if self.stop_requested.is_set():  # stopped while preparing
            return EXIT_OK
        with self._client() as client:
            for worker in plan.workers:
                for limit in worker.limits:
                    self.created_limits.append(limit.name)
                    self.say(prefect_ops.recreate_limit(client, limit))
        for worker in plan.workers:
            self.running[worker.name] = _Running(worker)
            self._start(self.running[worker.name])
        self.say(f"serving work pool {self.options.pool} with {len(plan.workers)} worker(s); "
                 "Ctrl-C or SIGTERM drains and removes the limits")  # fmt: skip
        next_reconcile = time.monotonic() + self.options.reconcile_s
        while not self.stop_requested.wait(0.5):
            for state in self.running.values():
                if self._supervise(state):
                    return EXIT_FAILED
            if time.monotonic() >= next_reconcile:
                next_reconcile = time.monotonic() + self.options.reconcile_s
                self._reconcile()
        self.say("stop requested: draining")
        return EXIT_OK

    # ------------------------------------------------------------ workers

    def _start(self, state: _Running) -> None:
        worker = state.worker
        log = None if self.options.log_dir is None else self.options.log_dir / f"{worker.name}.log"
        state.proc = start_worker_process(
            worker_argv(
                worker,
                self.options.pool,
                drain_seconds_within(self.options.drain_timeout_s),
                self.options.launcher,
                metrics_socket_of(state_dir(self.env), worker.name),
            ),
            {**self.env, **worker.env(), OWNER_ENV: self.owner, "PATH": self._path()},
            log,
        )
        state.started_at = time.monotonic()
        state.restart_at = None
        self.say(f"worker {worker.name} started (pid {state.proc.pid})")

    def _supervise(self, state: _Running) -> bool:
        """Restart a crashed worker when its backoff is over; True when giving up."""
        now = time.monotonic()
        if state.restart_at is not None:
            if now >= state.restart_at:
                self._start(state)
            return False
        if state.proc is None or state.proc.poll() is None:
            return False
        name, code = state.worker.name, state.proc.returncode
        state.crashes = self.options.restart.crashes_in_a_row(state.crashes, now - state.started_at)
        # Its flow runs may be running on; they and their leases die with it.
        self._stop_own(name, FLOW_RUN_GRACE_S)
        if self.options.restart.gives_up(state.crashes):
            self.say(f"worker {name} exited with code {code}, {state.crashes} crashes in a row: "
                     "giving up (exit 1)")  # fmt: skip
            return True
        delay = self.options.restart.delay(state.crashes)
        limits = state.worker.limits
        try:
            with self._client() as client:
                for limit in limits:
                    self.say(prefect_ops.recreate_limit(client, limit, after_crash=True))
        except Exception as exc:  # the restarted entrypoint waits for its limit anyway
            names = ", ".join(limit.name for limit in limits)
            self.say(f"could not recreate limit(s) {names} ({exc}); "
                     "the next check puts them back")  # fmt: skip
        self.say(f"worker {name} exited with code {code}; restarting in {delay:.0f}s "
                 f"(crash {state.crashes} in a row)")  # fmt: skip
        state.restart_at = now + delay
        return False

    def _reconcile(self) -> None:
        try:
            with self._client() as client:
                for state in self.running.values():
                    for limit in state.worker.limits:
                        changed = prefect_ops.enforce_limit(client, limit)
                        if changed:
                            self.say(changed)
        except Exception as exc:  # Prefect away for a while: the workers carry on
            self.say(f"could not check the limits ({type(exc).__name__}: {exc}); retrying")

    # ------------------------------------------------------------ cleanup

    def _drain(self) -> None:
        live = [s for s in self.running.values() if s.proc is not None and s.proc.poll() is None]
        if not live:
            return
        timeout = self.options.drain_timeout_s
        self.say(f"SIGTERM to {len(live)} worker(s); waiting up to {timeout:.0f}s for them "
                 "to drain (a second Ctrl-C stops their flow runs now)")  # fmt: skip
        # The worker alone: its flow runs live in sessions of their own, and it
        # stops them itself when its drain ends (their states set, slots back).
        self._signal_workers(live, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        hurried = False
        while any(s.proc is not None and s.proc.poll() is None for s in live):
            now = time.monotonic()
            if not hurried and (self.hurry.is_set() or now >= deadline - DRAIN_MARGIN_S):
                if self.hurry.is_set():
                    self.say("drain cut short: the workers stop their flow runs now")
                    self._signal_workers(live, signal.SIGTERM)  # a second one hurries it
                deadline = min(deadline, now + DRAIN_MARGIN_S)
                hurried = True
            if now >= deadline:
                self.say("workers still running after their drain: killing them")
                break
            if hurried:
                time.sleep(0.2)
            else:
                self.hurry.wait(0.2)
        for state in live:
            assert state.proc is not None
            if state.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(state.proc.pid, signal.SIGKILL)
                state.proc.wait()
            self.say(f"worker {state.worker.name} exited with code {state.proc.returncode}")

    @staticmethod
    def _signal_workers(live: list[_Running], signum: int) -> None:
        for state in live:
            if state.proc is not None and state.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(state.proc.pid, signum)

    def _cleanup(self) -> None:
        # A signal during cleanup must not cut it short.
        self.stop_requested.set()
        try:
            self._drain()
            for name in self.running:
                stopped = self._stop_own(name, 0 if self.hurry.is_set() else FLOW_RUN_GRACE_S)
                if stopped:
                    self.say(f"stopped {len(stopped)} flow-run process(es) of {name}")
            if self.created_limits:
                with self._client() as client:
                    for name in self.created_limits:
                        if prefect_ops.delete_limit(client, name):
                            self.say(f"deleted limit {name}")
                    for worker_name in self.running:
                        prefect_ops.delete_worker_record(client, self.options.pool, worker_name)
        except Exception as exc:
            names = ", ".join(self.created_limits)
            self.say(f"cleanup incomplete ({type(exc).__name__}: {exc}); the next start with "
                     f"the same worker id takes over {names}")  # fmt: skip
        finally:
            self._release_locks()

    def _path(self) -> str:
        # This interpreter's bin directory first: under systemd PATH is the
        # system's, and the workers and their flow runs start `prefect` tools.
        bin_dir = str(Path(sys.executable).parent)
        rest = [p for p in self.env.get("PATH", os.defpath).split(os.pathsep) if p != bin_dir]
        return os.pathsep.join([bin_dir, *rest])

    def _stop_own(self, name: str, grace_s: float) -> list[int]:
        """Stop the processes of worker ``name`` that this service started (flow runs too)."""
        return stop_pids(lambda: marked_pids(name, self.owner), grace_s)

    def _release_locks(self) -> None:
        for lock in self.locks:
            lock.release()
        self.locks.clear()

    def _client(self) -> contextlib.AbstractContextManager[SyncPrefectClient]:
        return get_client(sync_client=True)


def plan_names(plan: ServicePlan) -> Sequence[str]:
    return [worker.name for worker in plan.workers]
