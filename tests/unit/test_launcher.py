"""The warm launcher's own decisions, without Prefect: what it learns, when it refuses to fork."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from prefect_gpu_workers.procfs import (
    ENVIRON_ROOM_ENV,
    env_value,
    environ_room,
    publish_environment,
)
from prefect_gpu_workers.worker import launcher
from prefect_gpu_workers.worker.launcher import Launcher, Preloads, decode, encode


def test_a_run_teaches_submodules_of_what_is_loaded_and_only_the_top_of_the_rest() -> None:
    loaded = {"prefect", "anyio"}.__contains__
    taught = launcher.learnable(
        ["prefect.utilities.visualization", "torch", "torch.nn", "torch._C", "graphviz.dot",
         "__prefect_loader_12__", "__main__", "pkg.not-a-name"],
        loaded,
    )  # fmt: skip
    assert taught == ["graphviz", "prefect.utilities.visualization", "torch"]


def test_a_refused_package_is_never_learned_again_nor_its_submodules() -> None:
    preloads = Preloads(refused={"torch": "starts a thread on import"})
    assert preloads.known("torch")
    assert preloads.known("torch.nn")
    assert not preloads.known("graphviz")


def test_the_settings_are_rebuilt_only_when_the_runs_prefect_entries_differ() -> None:
    base = {"PREFECT_API_URL": "http://a", "HOME": "/root"}
    run = {**base, "PREFECT__FLOW_RUN_ID": "r", "WORKER_ID": "w", "PGW_LAUNCHED_AT": "1"}
    assert launcher.settings_signature(run) == launcher.settings_signature(base)
    changed = {**run, "PREFECT_LOGGING_LEVEL": "DEBUG"}
    assert launcher.settings_signature(changed) != launcher.settings_signature(base)


def test_a_launcher_with_a_second_thread_refuses_to_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check before every fork: the run then starts as a subprocess (the worker's side)."""
    monkeypatch.setattr(launcher, "thread_count", lambda: 2)
    forked: list[int] = []

    def fork() -> int:
        forked.append(1)
        return 0

    monkeypatch.setattr(os, "fork", fork)
    worker_side, launcher_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    serving = Launcher(listener, Preloads(), parent=os.getppid())
    with worker_side, launcher_side, listener, open(os.devnull, "wb") as out:
        request: dict[str, object] = {"op": "fork", "env": {}, "workspace_config": None}
        socket.send_fds(worker_side, [encode(request)], [out.fileno(), out.fileno()])
        serving._request(launcher_side)
        reply = decode(worker_side.recv(launcher.MAX_MESSAGE))
    assert forked == []
    assert reply == {"error": "RuntimeError: launcher has 2 threads: a fork would be unsafe"}


def test_a_fork_publishes_its_environment_where_proc_shows_it() -> None:
    """What the slot broker and the drain read (/proc/<pid>/environ), not os.environ."""
    if os.environ.get(ENVIRON_ROOM_ENV) is None:
        # This process was not started with room: a child that is does the test.
        import subprocess

        env = {**os.environ, **environ_room()}
        code = "import test_launcher as t; t.test_a_fork_publishes_its_environment_where_proc_shows_it()"  # noqa: E501
        here = os.path.dirname(__file__)
        done = subprocess.run(
            [sys.executable, "-c", code], env={**env, "PYTHONPATH": here}, capture_output=True
        )
        assert done.returncode == 0, done.stderr.decode()
        return
    said_read, said_write = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        wanted = {"PREFECT__FLOW_RUN_ID": "run-1", "WORKER_ID": "w-1", "PATH": "/bin"}
        os.environ.clear()
        os.environ.update(wanted)
        written = publish_environment(wanted, first=["PREFECT__FLOW_RUN_ID"])
        os.write(said_write, str(written).encode())
        os.read(go_read, 1)  # wait for the parent to look
        os._exit(0)
    try:
        assert os.read(said_read, 16) == b"3"
        assert env_value(pid, "PREFECT__FLOW_RUN_ID") == "run-1"
        assert env_value(pid, "WORKER_ID") == "w-1"
        assert env_value(pid, ENVIRON_ROOM_ENV) is None
    finally:
        os.write(go_write, b"x")
        os.waitpid(pid, 0)
