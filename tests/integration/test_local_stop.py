"""How a local session stops: on Ctrl-C, and cut short by a second one.

Processes that ignore SIGTERM stand in for a worker and a flow run that take
their time; the grace periods are an hour, so only the second Ctrl-C can end
the stop before pytest's timeout: the test cannot pass by timing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from prefect_gpu_workers.local.processes import StartedProcess, start_logged
from prefect_gpu_workers.local.session import LocalSession
from prefect_gpu_workers.stopping import StopSignals, wait_until

NO_SERVER = "http://127.0.0.1:9/api"
STUBBORN = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(3600)"
)


def start_stubborn(session: LocalSession, name: str, tmp_path: Path) -> StartedProcess:
    """A marked process in a session of its own that ignores SIGTERM, once it does."""
    log = tmp_path / f"{name}.log"
    started = start_logged(name, [sys.executable, "-c", STUBBORN], session.client_env(), log)
    assert wait_until(lambda: "ready" in log.read_text(), 120.0), started.log_tail()
    return started


def test_a_second_ctrl_c_kills_what_ignores_sigterm(tmp_path: Path) -> None:
    said: list[str] = []

    def say(line: str) -> None:
        said.append(line)
        if line.startswith("stopping"):
            os.kill(os.getpid(), signal.SIGINT)  # the person presses Ctrl-C again

    session = LocalSession(
        tmp_path,
        api_url=NO_SERVER,  # the stop never calls the API
        say=say,
        worker_stop_grace_s=3600,
        flow_run_stop_grace_s=3600,
    )
    started: dict[str, StartedProcess] = {}

    def interrupted() -> None:
        with session:
            started["worker"] = start_stubborn(session, "worker", tmp_path)
            session.workers["w"] = started["worker"]  # a worker that ignores SIGTERM
            started["flow run"] = start_stubborn(session, "flow-run", tmp_path)
            raise KeyboardInterrupt  # the first Ctrl-C

    # Whatever handled SIGINT before (earlier tests' in-process flow runs may
    # have installed one) is what the stop must leave behind.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        interrupted()
    assert said[0] == "stopping 1 worker(s), their flow runs (Ctrl-C again kills them at once) ..."
    assert said[-1].startswith("killed in ")
    assert said[-1].endswith("; nothing left running")
    assert started["worker"].proc.returncode == -signal.SIGKILL
    assert started["flow run"].proc.wait() == -signal.SIGKILL
    assert session.remaining_pids() == []
    # The previous handler is back once the stop is done.
    assert signal.getsignal(signal.SIGINT) is before


def test_a_command_s_stop_signals_hurry_its_session(tmp_path: Path) -> None:
    """The CLI's StopSignals: the session below it is hurried by its second signal."""
    signals = StopSignals()
    previous = signal.signal(signal.SIGINT, signals)
    try:
        session = LocalSession(tmp_path, api_url=NO_SERVER)
        assert session.hurry is signals.hurry
        with pytest.raises(KeyboardInterrupt):
            signals(signal.SIGINT, None)  # the first: unwinds into the stop
        os.kill(os.getpid(), signal.SIGINT)  # the second, through the installed handler
        assert wait_until(session.hurry.is_set, 5.0)
    finally:
        signal.signal(signal.SIGINT, previous)
