"""The warm launcher: a process that has imported Prefect once and forks each flow run.

A fresh flow-run process imports Prefect (seconds of CPU) before it does
anything. The launcher pays that once per worker: started by the worker
entrypoint (``python -m prefect_gpu_workers.worker.launcher``), it imports
Prefect, its engine and the modules it was asked to preload, then waits on a
Unix socket (``SOCK_SEQPACKET``, in the worker's private directory). Each
request is one flow run: the run's environment, working directory and
Prefect's workspace-supervisor configuration, with the worker's stdout and
stderr passed as descriptors. The launcher forks; the child becomes the run's
process, prepared as Prefect prepares its subprocess (:func:`become_flow_run`),
and the launcher answers with the child's pid and, when it ends, its exit code.

Why forking is safe here: the launcher never starts a thread, an event loop
or a CUDA context, and checks before every fork that it has one thread (the
kernel's count, so native threads count too); with more it refuses, and the
worker starts that run as a plain subprocess. A module is preloaded only after
a throwaway child has imported it and stayed single-threaded (``torch``, for
one, starts a thread on import: its runs import it after the fork).

What it learns: each run reports what it imported that the launcher had not
(:func:`learnable`: submodules of packages it has, the top of any other); the
launcher probes and preloads them beside its serving loop, so the second run
of a deployment starts with its imports done.

Stdlib only at module level: the worker imports this module for its wire format.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import json
import os
import random
import selectors
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect_gpu_workers.procfs import publish_environment, thread_count

# Messages are JSON, one per SOCK_SEQPACKET record.
MAX_MESSAGE = 1 << 20
# A run's process: (stdout, stderr) passed with the request.
PASSED_FDS = 2
# Exit status of a preload probe: imported and single-threaded / started threads / failed.
PROBE_OK, PROBE_THREADS, PROBE_FAILED = 0, 3, 4
# The engine's command when the workspace asks for none of its own (Prefect's default).
ENGINE_MODULE = "prefect.engine"
# What every launcher imports before it serves: the engine and the workspace supervisor.
ENGINE_MODULES = (
    "prefect",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.client.orchestration",
    "prefect.runner._workspace_supervisor",
    "prefect.runner._workspace_runtime_bootstrap",
    # What the engine imports for every run, measured: the flow-graph helpers
    # (graphviz) and anyio's asyncio backend.
    "prefect.utilities.visualization",
    "anyio._backends._asyncio",
)
# Entries /proc must show of a run even when its whole environment does not fit.
IDENTITY = ("PREFECT__", "PGW_", "WORKER_ID")
# Seconds between checks that the worker that started this launcher is alive.
PARENT_CHECK_S = 1.0
# A probe's imports take at most this long, or its modules are not preloaded.
PROBE_TIMEOUT_S = 30.0
PROBE_POLL_S = 0.05
# A learned batch whose probe failed is probed module by module up to this size.
MAX_SINGLE_PROBES = 64


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    message = json.loads(data.decode())
    if not isinstance(message, dict):
        raise ValueError("a launcher message is a JSON object")
    return message


def ping(socket_path: Path, timeout_s: float = 1.0) -> dict[str, Any]:
    """The launcher's answer to a ping: ready, its pid, what it preloaded and refused.

    Raises:
        OSError: nothing serves ``socket_path`` (yet), or no answer in ``timeout_s``.
        ValueError: an answer that is not a launcher message.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as connection:
        connection.settimeout(timeout_s)
        connection.connect(str(socket_path))
        connection.send(encode({"op": "ping"}))
        return decode(connection.recv(MAX_MESSAGE))


def learnable(module_names: Iterable[str], loaded: Callable[[str], bool]) -> list[str]:
    """What a run's imports teach a launcher: the names it could import by name, sorted.

    A submodule of a package the launcher has (``loaded``) is learned by its
    full name (Prefect's engine imports a few lazily); of any other package,
    only the package, whose own probe decides (``torch``'s thousand
    submodules are one name, refused once). Dunder names (``__main__``, the
    modules Prefect loads flow files as) cannot be imported by name.

    Example:
        >>> has = {"a"}.__contains__
        >>> learnable(["a.b", "a", "__main__", "c.d.e", "c.f", "_x.y"], has)
        ['_x', 'a', 'a.b', 'c']
    """
    names = set()
    for name in module_names:
        top = name.split(".")[0]
        if name.startswith("__") or not all(part.isidentifier() for part in name.split(".")):
            continue
        names.add(name if loaded(top) else top)
    return sorted(names)


@dataclass
class Preloads:
    """What this launcher imported before forking, what it could not, what it learned."""

    loaded: list[str] = field(default_factory=list)
    # module -> why it is not preloaded (import error, starts threads, too slow)
    refused: dict[str, str] = field(default_factory=dict)
    # learned from runs, waiting to be probed
    pending: list[str] = field(default_factory=list)

    def known(self, module: str) -> bool:
        top = module.split(".")[0]
        return (
            module in self.loaded
            or module in self.refused
            or top in self.refused
            or module in self.pending
        )


def _probe_import(modules: list[str]) -> int:
    """In a throwaway child: import ``modules``; whether the process stayed single-threaded."""
    try:
        for module in modules:
            importlib.import_module(module)
    except BaseException:
        return PROBE_FAILED
    return PROBE_OK if thread_count() == 1 else PROBE_THREADS


def start_probe(modules: list[str]) -> int:
    """Fork a child that imports ``modules`` and exits with a ``PROBE_*`` code; its pid."""
    pid = os.fork()
    if pid == 0:
        code = PROBE_FAILED
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 1)
                os.dup2(devnull.fileno(), 2)
            code = _probe_import(modules)
        finally:
            os._exit(code)
    return pid


def probe_verdict(code: int | None) -> str | None:
    """None: the probe imported its modules and stayed single-threaded; else why not."""
    if code == PROBE_OK:
        return None
    if code == PROBE_THREADS:
        return "starts a thread on import (a fork after that is unsafe)"
    if code == PROBE_FAILED:
        return "fails to import"
    if code is None:
        return f"took over {PROBE_TIMEOUT_S:.0f} s to import"
    return f"import probe ended with {code}"


def wait_probe(pid: int, timeout_s: float = PROBE_TIMEOUT_S) -> int | None:
    """The probe's exit code; None (and the probe killed) past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
        time.sleep(0.01)


def adopt(modules: list[str], preloads: Preloads, say: Callable[[str], None] | None) -> None:
    """Import ``modules`` that a probe passed; record each as loaded or refused."""
    why = None
    try:
        for module in modules:
            importlib.import_module(module)
    except Exception as exc:  # the probe passed: an import with side effects
        why = f"fails to import ({type(exc).__name__}: {exc})"
    if why is None and thread_count() != 1:  # never expected after a clean probe
        why = "left a thread running"
    if why is None:
        preloads.loaded.extend(modules)
    else:
        refuse(modules, why, preloads, say)


def refuse(
    modules: list[str], why: str, preloads: Preloads, say: Callable[[str], None] | None
) -> None:
    for module in modules:
        preloads.refused[module] = why
        if say is not None:
            say(f"launcher: not preloading {module}: {why}")


def preload(modules: Iterable[str], preloads: Preloads, say: Callable[[str], None]) -> None:
    """At start (``--preload``): probe and import each module, saying why for those refused."""
    for module in modules:
        if module in sys.modules:
            preloads.loaded.append(module)
            continue
        why = probe_verdict(wait_probe(start_probe([module])))
        if why is None:
            adopt([module], preloads, say)
        else:
            refuse([module], why, preloads, say)


@dataclass
class Probe:
    """A probe of learned modules, running beside the serving loop."""

    pid: int
    modules: list[str]
    deadline: float


@dataclass
class Launcher:
    """The serving loop: one thread, a selector, SIGCHLD through a wake-up pipe."""

    listener: socket.socket
    preloads: Preloads
    parent: int
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    # pid -> the connection its exit code goes back on
    runs: dict[int, socket.socket] = field(default_factory=dict)
    stopping: bool = False
    learn_write: int = -1
    own_fds: list[int] = field(default_factory=list)
    probe: Probe | None = None
    # Learned modules whose batch failed: probed one by one.
    singles: list[str] = field(default_factory=list)

    def serve(self) -> None:
        wake_read, wake_write = os.pipe()
        learn_read, learn_write = os.pipe()
        for fd in (wake_read, wake_write, learn_read):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_write)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._stop)
        # Ctrl-C reaches the worker's whole process group; the worker decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.learn_write = learn_write
        # The launcher's own descriptors, closed in each fork.
        self.own_fds = [wake_read, wake_write, learn_read]
        self.selector.register(self.listener, selectors.EVENT_READ, "accept")
        self.selector.register(wake_read, selectors.EVENT_READ, "wake")
        self.selector.register(learn_read, selectors.EVENT_READ, "learn")
        learned = b""
        while not self.stopping:
            # A probe running: look again soon, to reap it or to stop it in time.
            timeout = PARENT_CHECK_S if self.probe is None else PROBE_POLL_S
            for key, _ in self.selector.select(timeout):
                if key.data == "accept":
                    with contextlib.suppress(BlockingIOError):
                        conn, _ = self.listener.accept()
                        self.selector.register(conn, selectors.EVENT_READ, "request")
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_read, 4096)
                elif key.data == "learn":
                    with contextlib.suppress(BlockingIOError):
                        learned += os.read(learn_read, 65536)
                    *lines, rest = learned.split(b"\n")
                    learned = rest
                    self._learn(line.decode() for line in lines)
                else:
                    self._request(key.fileobj)  # type: ignore[arg-type]
            self._reap()
            if os.getppid() != self.parent:
                break  # the worker is gone: so is the reason to fork
            self._tend_probe()

    def _stop(self, *_: Any) -> None:
        self.stopping = True

    def _learn(self, modules: Iterable[str]) -> None:
        for module in learnable((line.strip() for line in modules), sys.modules.__contains__):
            if not self.preloads.known(module):
                self.preloads.pending.append(module)

    def _tend_probe(self) -> None:
        """Start a probe of what runs taught, or stop one that takes too long."""
        if self.probe is not None:
            if time.monotonic() > self.probe.deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.probe.pid, signal.SIGKILL)  # reaped as any child
            return
        if self.singles:
            batch = [self.singles.pop(0)]
        elif self.preloads.pending:
            batch, self.preloads.pending = self.preloads.pending, []
        else:
            return
        pid = start_probe(batch)
        self.probe = Probe(pid, batch, time.monotonic() + PROBE_TIMEOUT_S)

    def _probed(self, code: int) -> None:
        probe, self.probe = self.probe, None
        assert probe is not None
        timed_out = code == -signal.SIGKILL and time.monotonic() > probe.deadline
        why = probe_verdict(None if timed_out else code)
        if why is None:
            adopt(probe.modules, self.preloads, None)
        elif len(probe.modules) > 1 and len(probe.modules) <= MAX_SINGLE_PROBES:
            self.singles.extend(probe.modules)
        else:
            refuse(probe.modules, why, self.preloads, None)

    def _request(self, conn: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(conn, MAX_MESSAGE, PASSED_FDS)
        except OSError:
            data, fds = b"", []
        if not data:
            self._drop(conn)
            for fd in fds:
                os.close(fd)
            return
        try:
            request = decode(data)
            if request.get("op") == "ping":
                conn.send(encode(self._hello()))
                return
            if len(fds) != PASSED_FDS:
                raise ValueError(f"a run needs {PASSED_FDS} descriptors, got {len(fds)}")
            threads = thread_count()
            if threads != 1:
                raise RuntimeError(f"launcher has {threads} threads: a fork would be unsafe")
            pid = os.fork()
        except Exception as exc:
            with contextlib.suppress(OSError):
                conn.send(encode({"error": f"{type(exc).__name__}: {exc}"}))
            for fd in fds:
                os.close(fd)
            return
        if pid == 0:
            self._child(conn, request, fds)
        for fd in fds:
            os.close(fd)
        self.selector.unregister(conn)  # from here the connection only carries the exit
        self.runs[pid] = conn
        with contextlib.suppress(OSError):
            conn.send(encode({"pid": pid}))

    def _child(self, conn: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
        """The fork's side: never returns."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            self.selector.close()
            self.listener.close()
            for other in self.runs.values():
                other.close()
            conn.close()
            for fd in self.own_fds:
                os.close(fd)
            code = become_flow_run(request, stdout=fds[0], stderr=fds[1], learn=self.learn_write)
        except BaseException:
            with contextlib.suppress(Exception):
                traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _reap(self) -> None:
        while self.runs or self.probe is not None:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.probe is not None and pid == self.probe.pid:
                self._probed(os.waitstatus_to_exitcode(status))
                continue
            conn = self.runs.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError):
                    conn.send(encode({"exit": os.waitstatus_to_exitcode(status)}))
                conn.close()

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn)
        conn.close()

    def _hello(self) -> dict[str, Any]:
        return {
            "ready": True,
            "pid": os.getpid(),
            "preloaded": self.preloads.loaded,
            "refused": self.preloads.refused,
        }


def become_flow_run(request: dict[str, Any], stdout: int, stderr: int, learn: int) -> int:
    """Turn this fresh fork into the flow run's process; its exit code.

    What Prefect's subprocess gets, this process gets: its own session and
    process group, the run's environment (and Prefect's settings and logging
    rebuilt from it), its working directory, the worker's stdout and stderr,
    default signal handlers and fresh random seeds. Then Prefect's workspace
    supervisor prepares the workspace (pull steps, ``from_source``) as in its
    own process, and the engine runs as ``python -m prefect.engine`` would:
    in this process when that is the command, else by exec (a workspace with
    a ``uv`` project of its own), as Prefect's supervisor does.
    """
    os.setsid()
    with open(os.devnull, "rb") as devnull:
        os.dup2(devnull.fileno(), 0)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    os.close(stdout)
    os.close(stderr)
    for signum in (signal.SIGCHLD, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    set_environment(request["env"])
    if request.get("cwd"):
        os.chdir(request["cwd"])
    _reseed()
    _rebuild_prefect_settings()
    before = set(sys.modules)
    try:
        if request.get("workspace_config"):
            return _run_workspace(request["workspace_config"])
        return run_engine_in_process(Path.cwd())
    finally:
        _exit_as_python_would()
        _report_imports(before, learn)


def set_environment(environment: dict[str, str]) -> None:
    """The run's environment, in ``os.environ`` and where ``/proc`` shows it (procfs)."""
    os.environ.clear()
    os.environ.update(environment)
    # The run's identity first: the slot broker and the drain find runs by it.
    publish_environment(environment, first=[key for key in environment if key.startswith(IDENTITY)])


def _reseed() -> None:
    """Each run its own random streams, as a fresh interpreter would have."""
    random.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


def settings_signature(environment: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """The entries Prefect's settings are read from (``PREFECT_*``, not the run's ``PREFECT__*``).

    Example:
        >>> settings_signature({"PREFECT_API_URL": "u", "PREFECT__FLOW_RUN_ID": "r", "HOME": "h"})
        (('PREFECT_API_URL', 'u'),)
    """
    return tuple(
        sorted(
            (key, value)
            for key, value in environment.items()
            if key.startswith("PREFECT_") and not key.startswith("PREFECT__")
        )
    )


# What Prefect's settings and logging in this process were last built from.
_settings_built_from: tuple[tuple[str, str], ...] = ()


def _rebuild_prefect_settings() -> None:
    """Prefect read its settings from the launcher's environment: read them from the run's.

    Skipped when the run's ``PREFECT_*`` entries are those the settings were
    built from (the launcher starts with the worker's): the same entries give
    the same settings, and rebuilding them with the logging configuration
    costs a tenth of a CPU-second per run.
    """
    global _settings_built_from
    import prefect.context
    from prefect.logging.configuration import setup_logging

    signature = settings_signature(dict(os.environ))
    if signature == _settings_built_from:
        return
    _settings_built_from = signature

    refresh = getattr(prefect.context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()
    else:  # older Prefect: the same, by hand
        prefect.context.GLOBAL_SETTINGS_CONTEXT = prefect.context.root_settings_context()
    setup_logging(incremental=False)


def _run_workspace(config_path: str) -> int:
    """Prefect's workspace supervisor, with the engine's launch kept in this process."""
    import anyio
    from prefect.runner import _workspace_supervisor as supervisor

    launch: dict[str, Any] = {}

    async def keep_launch(command: list[str], *, cwd: Path, environment: dict[str, str]) -> int:
        launch.update(command=command, cwd=cwd, environment=environment)
        return 0

    supervisor._launch_engine = keep_launch  # this process only: it is the run's
    code = anyio.run(supervisor._main_async, [config_path])
    if code or not launch:
        return int(code)
    command: list[str] = launch["command"]
    os.chdir(launch["cwd"])
    if command[1:] != ["-m", ENGINE_MODULE]:
        os.execvpe(command[0], command, launch["environment"])
    # The workspace's environment (its PYTHONPATH, what its job set) is the engine's.
    set_environment(launch["environment"])
    _rebuild_prefect_settings()
    return run_engine_in_process(Path(launch["cwd"]))


def run_engine_in_process(cwd: Path) -> int:
    """``python -m prefect.engine`` in this process, in its environment: same path and exit code."""
    import runpy

    # sys.path as a fresh `python -m` would have it: the working directory,
    # then PYTHONPATH, then the interpreter's own entries.
    extra = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry]
    base = [entry for entry in sys.path[1:] if entry not in extra]
    sys.path[:] = [str(cwd), *extra, *base]
    sys.argv = [ENGINE_MODULE]
    # The engine ran as a library in the launcher; as a program it starts afresh.
    sys.modules.pop(ENGINE_MODULE, None)
    try:
        runpy.run_module(ENGINE_MODULE, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        return 130
    except BaseException:
        sys.excepthook(*sys.exc_info())
        return 1
    return 0


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _exit_as_python_would() -> None:
    """What the interpreter does at exit that ``os._exit`` skips, in its order.

    Join the non-daemon threads and run ``threading``'s exit hooks (Prefect's
    services drain there: the run's last log lines and events reach the API),
    then the ``atexit`` functions. A failure is printed, as Python would.
    """
    for step in (threading._shutdown, atexit._run_exitfuncs):  # type: ignore[attr-defined]
        try:
            step()
        except BaseException:
            traceback.print_exc()


def _report_imports(before: set[str], learn: int) -> None:
    """Tell the launcher what this run imported that it had not (what it may learn)."""
    names = learnable(set(sys.modules) - before, before.__contains__)
    with contextlib.suppress(OSError):
        # Never blocks the run's exit: what does not fit in the pipe is not learned.
        os.set_blocking(learn, False)
        for name in names:  # one line per write: each is atomic on a pipe
            os.write(learn, f"{name}\n".encode())


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", type=Path, required=True, help="Unix socket to serve on")
    parser.add_argument("--preload", action="append", default=[], help="module to import first")
    args = parser.parse_args(argv)
    global _settings_built_from
    started = time.monotonic()
    cpu = time.process_time()
    parent = os.getppid()
    _settings_built_from = settings_signature(dict(os.environ))
    preloads = Preloads()
    for module in ENGINE_MODULES:
        importlib.import_module(module)
        preloads.loaded.append(module)
    preload(args.preload, preloads, say)
    threads = thread_count()
    if threads != 1:
        say(f"launcher: {threads} threads after preloading: cannot fork safely; exiting")
        return 2
    args.socket.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(args.socket))
    os.chmod(args.socket, 0o600)
    listener.listen(64)
    listener.setblocking(False)
    say(
        f"launcher ready on {args.socket}: {len(preloads.loaded)} modules preloaded "
        f"in {time.monotonic() - started:.1f} s ({time.process_time() - cpu:.1f} CPU-s)"
    )
    try:
        Launcher(listener, preloads, parent).serve()
    finally:
        listener.close()
        args.socket.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
