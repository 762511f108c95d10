"""The service's processes: workers started so that none outlives the service unseen.

- Each worker runs in a session of its own (a terminal's Ctrl-C reaches only
  the service, which then drains the workers in order) and dies with the
  service (``PR_SET_PDEATHSIG``), so a service killed with SIGKILL leaves no
  worker polling for flow runs.
- Flow-run processes run in sessions of their own and are not the service's
  children; the worker's marker variables, which they inherit, find them: the
  worker name and the owner token (pid and start time) of the service.
  Processes whose owner is dead are a crashed service's leftovers.
- One lock file per worker name (``flock``, released by the kernel when the
  holder dies, SIGKILL included): two services on one host never run the same
  worker name, and say so at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from prefect_gpu_workers.procfs import env_value, owner_alive, pids_with_env
from prefect_gpu_workers.service.plan import SERVICE_WORKER_ENV

_PR_SET_PDEATHSIG = 1
# The owner token (see owner_token) of the service that started a worker,
# inherited by its flow runs like the worker marker.
OWNER_ENV = "PGW_SERVICE_OWNER"
STATE_DIR_ENV = "PGW_STATE_DIR"


def state_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where lock files live: ``$PGW_STATE_DIR``, systemd's ``$RUNTIME_DIRECTORY``,
    ``$XDG_RUNTIME_DIR/prefect-gpu-workers``, else ``/tmp/prefect-gpu-workers-<uid>``."""
    source = os.environ if env is None else env
    for key in (STATE_DIR_ENV, "RUNTIME_DIRECTORY"):
        if source.get(key):
            return Path(source[key].split(":")[0])
    if source.get("XDG_RUNTIME_DIR"):
        return Path(source["XDG_RUNTIME_DIR"]) / "prefect-gpu-workers"
    return Path(f"/tmp/prefect-gpu-workers-{os.getuid()}")


class NameLocked(RuntimeError):
    """Another service on this host runs a worker of this name."""


@dataclass
class NameLock:
    """An exclusive ``flock`` on ``<state dir>/<worker name>.lock`` holding the owner's pid."""

    path: Path
    _file: IO[str] | None = None

    def acquire(self) -> None:
        """Raises:
        NameLocked: another live process holds it (its pid in the message)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "?"
            handle.close()
            raise NameLocked(
                f"another `prefect-gpu-workers start` on this host (pid {owner}) runs worker "
                f"{self.path.stem!r} (lock {self.path})"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            handle.close()


def _marked(worker_name: str) -> list[tuple[int, str]]:
    """(pid, owner token) of this user's processes marked with ``worker_name``."""
    return [
        (pid, env_value(pid, OWNER_ENV) or "")
        for pid in pids_with_env(SERVICE_WORKER_ENV, worker_name)
    ]


def marked_pids(worker_name: str, owner: str | None = None) -> list[int]:
    """Pids of processes whose environment has ``PGW_SERVICE_WORKER=<name>``
    (and, when ``owner`` is given, that service's owner token)."""
    return [pid for pid, token in _marked(worker_name) if owner is None or token == owner]


def orphaned_pids(worker_name: str) -> list[int]:
    """Marked processes whose service is dead: leftovers of a crash on this host.

    A live service's processes are never orphans, even if another service on
    this host (a different lock directory, another user) claims the same name.
    """
    return [pid for pid, token in _marked(worker_name) if not owner_alive(token)]


def _signal(pids: Sequence[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_pids(find: Callable[[], list[int]], grace_s: float) -> list[int]:
    """SIGTERM what ``find`` returns, SIGKILL what it still returns after ``grace_s``.

    SIGTERM first: a flow run that gets it leaves its slot block and releases
    its slot. Returns the pids signalled.
    """
    pids = find()
    if not pids:
        return []
    _signal(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and find():
        time.sleep(0.2)
    _signal(find(), signal.SIGKILL)
    return pids


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. The signal survives exec, so
    # the worker entrypoint (and the Prefect worker it becomes) gets SIGKILL
    # when the service dies, whatever killed it.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def start_worker_process(
    argv: Sequence[str], env: Mapping[str, str], log_path: Path | None
) -> subprocess.Popen[bytes]:
    """Start a worker in its own session, tied to this process's life, output to
    ``log_path`` (or inherited when ``None``, e.g. to the journal under systemd)."""
    if log_path is None:
        return subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv), env=dict(env), stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
