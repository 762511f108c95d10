"""Local mode's processes: start them logged, and find and stop them by a marker.

Every process local mode starts carries a marker in its environment, inherited
by the flow-run processes the workers start in sessions of their own, so that
:meth:`~prefect_gpu_workers.local.session.LocalSession.close` can find and stop
all of them by pid, on success, on error and on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from prefect_gpu_workers.commands import module_program
from prefect_gpu_workers.commands import worker_command as entrypoint_command
from prefect_gpu_workers.local.plan import WorkerPlan
from prefect_gpu_workers.procfs import descendants, pids_with_env
from prefect_gpu_workers.stopping import wait_until

# Set on every process local mode starts; flow-run processes inherit it.
SESSION_MARKER_ENV = "PGW_LOCAL_SESSION"
WORKER_QUERY_SECONDS_ENV = "PREFECT_WORKER_QUERY_SECONDS"
# Local mode creates each limit before it starts the worker, so the
# entrypoint's wait ends at its first look; the timeout only bounds a server
# that stopped answering.
LIMIT_WAIT_TIMEOUT_S = 60


def marked_pids(marker: str, env_name: str = SESSION_MARKER_ENV) -> list[int]:
    """Pids of live processes whose environment has ``env_name=marker``, and of
    their descendants (who inherit it).

    Flow-run processes run in sessions of their own, so process groups alone
    do not reach them; the inherited marker does.
    """
    found = pids_with_env(env_name, marker)
    return sorted({*found, *descendants(found)})


def _signal_pids(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_marked(
    marker: str,
    grace_s: float = 10.0,
    hurry: threading.Event | None = None,
    spare_groups: Collection[int] = (),
) -> list[int]:
    """SIGTERM every marked process, SIGKILL those alive after ``grace_s``; returns the pids hit.

    SIGTERM first because a flow run that gets it leaves its GPU slot block
    and releases the slot; SIGKILL would leave the slot held until its lease
    expires (or the broker reclaims it).

    Args:
        marker: the session's marker.
        grace_s: how long SIGTERM gets before SIGKILL.
        hurry: once set (a second Ctrl-C), SIGKILL at once.
        spare_groups: process groups left alone (the workers and the server,
            which are stopped their own way).
    """

    def targets() -> list[int]:
        return [pid for pid in marked_pids(marker) if _process_group(pid) not in spare_groups]

    pids = targets()
    if not pids:
        return []
    _signal_pids(pids, signal.SIGTERM)
    # Each look reads every process's environment: 5 a second, as before.
    wait_until(lambda: not targets(), grace_s, hurry, poll_s=0.2)
    _signal_pids(targets(), signal.SIGKILL)
    return pids


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@dataclass
class StartedProcess:
    """A process local mode started, with the file its output goes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    # The work pool a worker serves; None for other processes.
    pool: str | None = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_logged(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    pool: str | None = None,
) -> StartedProcess:
    """Start ``argv`` in a new session (so it can be stopped as a group), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return StartedProcess(name, proc, log_path, pool)


def worker_command(plan: WorkerPlan, pool: str) -> list[str]:
    """The entrypoint pods run, through this interpreter; ``WORKER_ID`` comes from the env.

    Local mode stops its workers once every run has ended, or when it is giving
    up: then nothing is worth waiting for, and the drain at once marks what
    still runs (Crashed) and gives its slots back.
    """
    return entrypoint_command(
        pool,
        flow_runs=plan.flow_runs,
        limit_prefix=plan.limit_prefix,
        wait_timeout_s=LIMIT_WAIT_TIMEOUT_S,
        program=module_program(sys.executable),
        slot_broker=plan.slot_broker,
        drain_s=0,
        launcher=plan.launcher,
        gpus=plan.gpus if plan.gpu_memory_gib is not None else None,
        gpu_memory=f"{plan.gpu_memory_gib}GiB" if plan.gpu_memory_gib is not None else None,
    )
