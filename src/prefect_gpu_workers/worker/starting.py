"""How the worker starts a flow run's process: forked from its warm launcher, or a plain subprocess.

Prefect's process worker (3.9 and later) starts each run through a
``ProcessStarter`` (``prefect/runner/_flow_run_executor.py``): the workspace
starter (Prefect's default: its supervisor runs the pull steps, then the
engine) or, for a configured command, the engine-command starter. The worker
uses that seam: :func:`fork_starter_classes` gives the same two starters whose
process is a fork of the worker's :class:`WarmLauncher` (``launcher.py``),
with the environment Prefect's subprocess would get (:func:`engine_environment`).
Everything after the start (the process handle, cancellation, crash
reporting, hooks) stays Prefect's.

A run falls back to Prefect's own subprocess, and the worker says why once
per reason, when the launcher cannot serve it: not ready yet, exited (it is
started again), a refused fork, no answer in time. A run whose work pool
configures a command other than this interpreter's ``-m prefect.engine``
starts as a subprocess, as does every run on a Prefect without the seam
(said once at start).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from prefect_gpu_workers.naming import LAUNCHED_AT_ENV
from prefect_gpu_workers.procfs import environ_room, is_running
from prefect_gpu_workers.worker.launcher import ENGINE_MODULE, MAX_MESSAGE, decode, encode, ping

# Imported by every launcher unless told otherwise, when installed.
DEFAULT_PRELOADS = ("pgw_flows.pipeline",)
# The launcher answers a fork within this, or the run starts as a subprocess.
FORK_REPLY_S = 5.0
# A run whose launcher died before saying its exit code: Crashed, with this code.
LOST_EXIT_CODE = 1
# The worker takes runs once its launcher is ready, or after this (they fall back).
READY_TIMEOUT_S = 60.0
READY_POLL_S = 0.05
# How often a run whose launcher died is checked for having ended.
LOST_POLL_S = 0.5


class LauncherUnavailable(RuntimeError):
    """The launcher cannot start this run; the run starts as a subprocess."""


class LauncherState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    CLOSED = "closed"


@functools.cache
def fork_seam_missing() -> str | None:
    """Why this Prefect cannot start runs by fork (None: it can)."""
    try:
        from prefect.runner import _workspace_supervisor as supervisor
        from prefect.runner._flow_run_executor import ProcessStarter  # noqa: F401
        from prefect.runner._workspace_starter import (  # noqa: F401
            WorkspaceResolvingEngineCommandStarter,
        )
    except ImportError as exc:
        return f"Prefect {_prefect_version()} has no process-starter seam ({exc.name})"
    if not hasattr(supervisor, "_launch_engine") or not hasattr(supervisor, "_main_async"):
        return f"Prefect {_prefect_version()}'s workspace supervisor has another shape"
    return None


def _prefect_version() -> str:
    import prefect

    return str(prefect.__version__)


def installed_preloads(modules: tuple[str, ...] = DEFAULT_PRELOADS) -> list[str]:
    """The default preloads this environment has."""
    from importlib.util import find_spec

    found = []
    for module in modules:
        with contextlib.suppress(ImportError, ValueError):
            if find_spec(module) is not None:
                found.append(module)
    return found


class OnceSayer:
    """Says each reason once (a fallback repeated for every run would drown the log)."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self._say = say
        self._said: set[str] = set()

    def __call__(self, key: str, line: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self._say(line)


class ForkedRun:
    """A forked flow run as Prefect's ``ProcessHandle`` sees a process: pid, returncode, wait."""

    def __init__(self, pid: int, connection: socket.socket, say: OnceSayer) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._connection = connection
        self._say = say

    async def wait(self) -> int:
        """Until the run's process ends; its exit code, as the launcher saw it."""
        if self.returncode is not None:
            return self.returncode
        loop = asyncio.get_running_loop()
        try:
            data = await loop.sock_recv(self._connection, MAX_MESSAGE)
        finally:
            self._connection.close()
        if data:
            self.returncode = int(decode(data)["exit"])
            return self.returncode
        # The launcher died: the run goes on without the parent that would say
        # its code. Where the worker is the run's new parent (PID 1 in a pod),
        # the worker reaps it and has the code after all.
        while True:
            try:
                done, status = os.waitpid(self.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG
            except ChildProcessError:  # someone else's child: watch it end
                if not is_running(self.pid):
                    break
            else:
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
                    return self.returncode
            await asyncio.sleep(LOST_POLL_S)
        self._say(
            f"lost:{self.pid}",
            f"flow-run process {self.pid} ended after its launcher died: exit code unknown, "
            f"reported as {LOST_EXIT_CODE}",
        )
        self.returncode = LOST_EXIT_CODE
        return self.returncode


class WarmLauncher:
    """The worker's handle on its launcher process: start it, fork runs from it, restart it."""

    def __init__(
        self,
        directory: Path,
        preload: list[str],
        say: Callable[[str], None],
        python: str = sys.executable,
    ) -> None:
        self.socket_path = directory / "launcher.sock"
        self.preload = preload
        self.say = OnceSayer(say)
        self._python = python
        self._process: subprocess.Popen[bytes] | None = None
        self.state = LauncherState.CLOSED
        self.restarts = 0

    def start(self) -> None:
        """Start the launcher; it is ready once it has imported Prefect (seconds), not at once."""
        command = [self._python, "-m", "prefect_gpu_workers.worker.launcher"]
        command += ["--socket", str(self.socket_path)]
        for module in self.preload:
            command += ["--preload", module]
        # Prefect's settings as the runs get them (so a run whose job changes
        # none starts with the launcher's), and room in its environment block:
        # each fork writes its run's environment there.
        from prefect.settings import get_current_settings

        settings = get_current_settings().to_environment_variables(exclude_unset=True)
        environment = {**os.environ, **settings, **environ_room()}
        self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment)
        self.state = LauncherState.STARTING

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> str | None:
        """Block until the launcher answers a ping; None, or why it is not ready."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process is None or self._process.poll() is not None:
                code = None if self._process is None else self._process.returncode
                return f"the launcher exited with {code}"
            try:
                hello = ping(self.socket_path)
            except (OSError, ValueError):
                hello = {}
            if hello.get("ready"):
                self.state = LauncherState.READY
                return None
            if time.monotonic() >= deadline:
                return f"the launcher was not ready after {timeout_s:.0f} s"
            time.sleep(READY_POLL_S)

    def _check_alive(self) -> None:
        if self._process is None or self.state is LauncherState.CLOSED:
            raise LauncherUnavailable("the launcher is closed")
        code = self._process.poll()
        if code is None:
            return
        self.restarts += 1
        self.start()
        self.say(
            f"exited:{self.restarts}",
            f"launcher exited with {code}: starting it again; "
            f"warm launcher starting (pid {self.pid})",
        )
        raise LauncherUnavailable(f"the launcher exited with {code} and is starting again")

    async def fork(
        self,
        environment: Mapping[str, str],
        cwd: Path | str | None,
        workspace_config: Path | None,
        stream_output: bool,
    ) -> ForkedRun:
        """Fork one flow run; its handle once the launcher says its pid.

        Raises:
            LauncherUnavailable: not ready, exited, refused the fork, or no answer in time.
        """
        self._check_alive()
        loop = asyncio.get_running_loop()
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        connection.setblocking(False)
        try:
            try:
                await loop.sock_connect(connection, str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise LauncherUnavailable("the launcher is not ready yet") from exc
            request = {
                "op": "fork",
                "env": dict(environment),
                "cwd": str(cwd) if cwd is not None else None,
                # None: the engine itself (a configured `python -m prefect.engine`).
                "workspace_config": str(workspace_config) if workspace_config else None,
            }
            with _output_descriptors(stream_output) as descriptors:
                socket.send_fds(connection, [encode(request)], descriptors)
            data = await asyncio.wait_for(loop.sock_recv(connection, MAX_MESSAGE), FORK_REPLY_S)
            reply = decode(data) if data else {"error": "the launcher closed the connection"}
            if "error" in reply:
                raise LauncherUnavailable(f"the launcher refused: {reply['error']}")
        except LauncherUnavailable:
            connection.close()
            raise
        except (OSError, TimeoutError, ValueError) as exc:
            connection.close()
            raise LauncherUnavailable(f"the launcher did not answer ({exc!r})") from exc
        if self.state is not LauncherState.READY:
            self.state = LauncherState.READY
            self.say(f"ready:{self.restarts}", "flow runs start forked from the warm launcher")
        return ForkedRun(int(reply["pid"]), connection, self.say)

    def fallback(self, reason: LauncherUnavailable) -> None:
        self.say(f"fallback:{reason}", f"flow run started as a subprocess: {reason}")

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop the launcher (the runs it forked go on: they are the worker's to stop)."""
        self.state = LauncherState.CLOSED
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid


@contextlib.contextmanager
def _output_descriptors(stream_output: bool) -> Any:
    """The run's stdout and stderr: the worker's own (streamed), or /dev/null."""
    if stream_output:
        yield [1, 2]
        return
    with open(os.devnull, "wb") as devnull:
        yield [devnull.fileno(), devnull.fileno()]


def engine_environment(
    base: Mapping[str, str | None],
    flow_run_id: str,
    control: Mapping[str, str],
    job_overrides_settings: bool,
) -> dict[str, str]:
    """The environment Prefect's ``EngineCommandStarter`` gives the process it spawns.

    The worker's own environment, then Prefect's settings and the job's
    environment (the job's win for the workspace starter, the settings for a
    configured command: ``env_overrides_settings``), then the run's identity
    and control channel.
    """
    from prefect.settings import get_current_settings
    from prefect.utilities.processutils import sanitize_subprocess_env

    settings = get_current_settings().to_environment_variables(exclude_unset=True)
    env: dict[str, str | None] = dict(os.environ)
    for layer in (settings, base) if job_overrides_settings else (base, settings):
        env.update(layer)
    env.update(
        {
            "PREFECT__FLOW_RUN_ID": flow_run_id,
            "PREFECT__ENABLE_CANCELLATION_AND_CRASHED_HOOKS": "false",
            **control,
            "PREFECT__DEPLOYMENT_NAME": base.get("PREFECT__DEPLOYMENT_NAME"),
        }
    )
    return {key: value for key, value in sanitize_subprocess_env(env).items() if value is not None}


def runs_engine_here(command: str | None, python: str = sys.executable) -> bool:
    """Whether a configured ``command`` is ``<this interpreter> -m prefect.engine`` (forkable).

    Example:
        >>> runs_engine_here(f"{sys.executable} -m prefect.engine")
        True
        >>> runs_engine_here("/opt/other/python -m prefect.engine"), runs_engine_here("bash x")
        (False, False)
    """
    import shlex

    if not command:
        return False
    argv = shlex.split(command)
    return (
        len(argv) == 3
        and argv[1:] == ["-m", ENGINE_MODULE]
        and os.path.realpath(argv[0]) == os.path.realpath(python)
    )


async def fork_or_fall_back(
    launcher: WarmLauncher,
    flow_run: Any,
    task_status: Any,
    *,
    job_environment: Mapping[str, str | None],
    job_overrides_settings: bool,
    control_channel: Any,
    cwd: Path | str | None,
    workspace_config: Path | None,
    stream_output: bool,
    fall_back: Callable[[], Awaitable[None]],
) -> None:
    """A starter's ``start``: the run forked from ``launcher``, or ``fall_back()`` (Prefect's own).

    Keeps Prefect's ``ProcessStarter`` contract: the handle is given to
    ``task_status`` before the run ends, and this returns when it has ended.
    """
    from prefect.runner._process_manager import ProcessHandle, create_isolated_termination_scope

    control: dict[str, str] = {}
    if control_channel is not None:
        with contextlib.suppress(RuntimeError):  # a disabled channel: kill-only cancellation
            port, token = control_channel.register(flow_run.id)
            control = {"PREFECT__CONTROL_PORT": str(port), "PREFECT__CONTROL_TOKEN": token}
    environment = engine_environment(
        job_environment, str(flow_run.id), control, job_overrides_settings
    )
    try:
        run = await launcher.fork(environment, cwd, workspace_config, stream_output)
    except LauncherUnavailable as reason:
        if control:  # Prefect's starter registers the run again
            control_channel.unregister(flow_run.id)
        launcher.fallback(reason)
        await fall_back()
        return
    # Its own session: Prefect's process-group scope stops the run and its children.
    scope = create_isolated_termination_scope(run.pid)
    process: Any = run  # a process as far as ProcessHandle looks: pid, returncode
    task_status.started(ProcessHandle(process, termination_scope=scope))
    await run.wait()


@functools.cache
def fork_starter_classes() -> tuple[type[Any], type[Any]]:
    """Prefect's two starters, each with its process forked from a :class:`WarmLauncher`.

    The workspace starter (Prefect's default: pull steps, the workspace's
    environment, then the engine) and the engine-command starter, for a
    configured command that is this interpreter's ``-m prefect.engine``.
    """
    import anyio
    from prefect.runner._starter_engine import EngineCommandStarter
    from prefect.runner._workspace_runtime import (
        WorkspaceSupervisorConfig,
        write_private_model,
    )
    from prefect.runner._workspace_starter import WorkspaceResolvingEngineCommandStarter

    class ForkingWorkspaceStarter(WorkspaceResolvingEngineCommandStarter):
        def __init__(self, *, launcher: WarmLauncher, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._launcher = launcher

        async def start(self, flow_run: Any, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            config = WorkspaceSupervisorConfig(
                flow_run_id=flow_run.id,
                workspace_root=self._workspace_root,
                manifest_path=self._manifest_path,
                command=self._command,
            )
            write_private_model(self._config_path, config)
            await fork_or_fall_back(
                self._launcher,
                flow_run,
                task_status,
                job_environment=self._environment,
                job_overrides_settings=True,
                control_channel=self._control_channel,
                cwd=self._source_cwd,
                workspace_config=self._config_path,
                stream_output=self._stream_output,
                fall_back=lambda: super(ForkingWorkspaceStarter, self).start(
                    flow_run, task_status=task_status
                ),
            )

    class ForkingEngineStarter(EngineCommandStarter):
        def __init__(self, *, launcher: WarmLauncher, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._launcher = launcher

        async def start(self, flow_run: Any, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
            await fork_or_fall_back(
                self._launcher,
                flow_run,
                task_status,
                job_environment=self._env,
                job_overrides_settings=self._env_overrides_settings,
                control_channel=self._control_channel,
                cwd=self._cwd,
                workspace_config=None,
                stream_output=self._stream_output,
                fall_back=lambda: super(ForkingEngineStarter, self).start(
                    flow_run, task_status=task_status
                ),
            )

    return ForkingWorkspaceStarter, ForkingEngineStarter


def launched_now(environment: Mapping[str, str | None]) -> dict[str, str | None]:
    """``environment`` with the moment the worker starts the run (start-time figures' origin)."""
    return {**environment, LAUNCHED_AT_ENV: f"{time.time():.6f}"}
