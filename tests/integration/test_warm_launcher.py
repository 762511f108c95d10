"""The warm launcher against a real Prefect server: runs forked from it behave as Prefect's own.

One worker (``--launcher fork``, the default) serves two deployments of
``launcher_probe``: one by module path with the engine command local mode
uses, one cloned by Prefect from a git repository into the run's working
directory (Prefect's workspace supervisor, its default command). Each run
reports how its process was started; the tests check what Prefect shows of it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from broker_harness import active_slots, unique_worker, wait_until
from launcher_probe import GREETING, launcher_probe
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.runner.storage import GitRepository
from prefect.states import Cancelling
from worker_harness import deploy_by_module

from prefect_gpu_workers.local.prefect_ops import ensure_gpu_limit, ensure_process_pool
from prefect_gpu_workers.naming import WORKER_ID_ENV
from prefect_gpu_workers.procfs import descendants, is_running
from prefect_gpu_workers.server import LocalPrefectServer, stop_process_group
from prefect_gpu_workers.worker.launcher import ping

HERE = Path(__file__).resolve().parent
LAUNCHER_PID = re.compile(r"warm launcher starting \(pid (\d+)")
LAUNCHER_SOCKET = re.compile(r"launcher ready on (\S+):")


@dataclass
class ProbeWorker:
    worker: str
    limit: str
    by_module: UUID
    from_git: UUID
    proc: subprocess.Popen[bytes]
    log_path: Path
    report_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def hello(self) -> dict[str, Any]:
        """The launcher's answer to a ping: what it preloaded and refused."""
        return ping(Path(LAUNCHER_SOCKET.findall(self.log())[-1]))

    def launcher_pids(self) -> list[int]:
        return [int(pid) for pid in LAUNCHER_PID.findall(self.log())]

    def submit(self, client: SyncPrefectClient, deployment: UUID, **parameters: Any) -> UUID:
        run = client.create_flow_run_from_deployment(
            deployment, parameters={"report_dir": str(self.report_dir), **parameters}
        )
        return run.id

    def report(self, run_id: UUID) -> dict[str, Any]:
        path = self.report_dir / f"{run_id}.json"
        wait_until(path.exists, f"run {run_id} reports", 120)
        data: dict[str, Any] = json.loads(path.read_text())
        return data


def _git_repository(tmp_path: Path) -> Path:
    repo = tmp_path / "probe-repo"
    repo.mkdir()
    shutil.copy(HERE / "launcher_probe.py", repo / "launcher_probe.py")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-C", str(repo)]
    for args in (["init", "-q"], ["add", "."], ["commit", "-qm", "probe"]):
        subprocess.run([*git, *args], check=True)
    return repo


def _deploy(pool: str, worker: str, repo: Path) -> tuple[UUID, UUID]:
    by_module = deploy_by_module(launcher_probe, f"probe-module-{worker}", pool)
    cloned: Any = launcher_probe.from_source(
        source=GitRepository(url=f"file://{repo}"), entrypoint="launcher_probe.py:launcher_probe"
    )
    deployment: Any = cloned.to_deployment(
        name=f"probe-git-{worker}",
        work_pool_name=pool,
        # A run whose job changes a Prefect setting: the fork must see it.
        job_variables={"env": {"PREFECT_LOGGING_LEVEL": "DEBUG"}},
    )
    from_git = deployment.apply(work_pool_name=pool)
    assert isinstance(by_module, UUID)
    assert isinstance(from_git, UUID)
    return by_module, from_git


@contextlib.contextmanager
def _start(prefect_server: LocalPrefectServer, tmp_path: Path) -> Iterator[ProbeWorker]:
    worker = unique_worker()
    pool, limit = f"launcher-{worker}", f"gpu:{worker}"
    with get_client(sync_client=True) as client:
        ensure_process_pool(client, pool)
        ensure_gpu_limit(client, limit, 2)
    by_module, from_git = _deploy(pool, worker, _git_repository(tmp_path))
    report_dir = tmp_path / "reports"
    report_dir.mkdir()
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        **prefect_server.env(),
        WORKER_ID_ENV: worker,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        # Local setups keep run logs out of the API (quiet_prefect_env); these tests read them.
        "PREFECT_LOGGING_TO_API_ENABLED": "true",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect_gpu_workers", "worker", "--pool", pool,
             "--flow-runs", "3", "--drain-seconds", "5"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    probe = ProbeWorker(worker, limit, by_module, from_git, proc, log_path, report_dir)
    try:
        wait_until(lambda: "warm launcher ready" in probe.log(), "the launcher is ready", 180)
        wait_until(lambda: "slot broker for" in probe.log(), "the worker is up", 180)
        yield probe
    finally:
        stop_process_group(proc, grace_s=30)


@pytest.fixture(scope="module")
def probe(
    prefect_server: LocalPrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProbeWorker]:
    with _start(prefect_server, tmp_path_factory.mktemp("launcher")) as worker:
        yield worker


def _final(client: SyncPrefectClient, run_id: UUID, timeout_s: float = 180) -> Any:
    def final() -> bool:
        state = client.read_flow_run(run_id).state
        return state is not None and state.is_final()

    wait_until(final, f"run {run_id} ends", timeout_s)
    return client.read_flow_run(run_id).state


def _greeted(client: SyncPrefectClient, run_id: UUID) -> bool:
    logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
    return any(log.message.startswith(GREETING) for log in logs)


def test_two_deployments_run_at_once_forked_from_the_launcher(probe: ProbeWorker) -> None:
    with get_client(sync_client=True) as client:
        module_run = probe.submit(client, probe.by_module, use_torch=True)
        git_run = probe.submit(client, probe.from_git)
        states = {run: _final(client, run) for run in (module_run, git_run)}
        assert {run: state.type.value for run, state in states.items()} == {
            module_run: "COMPLETED",
            git_run: "COMPLETED",
        }, probe.log()[-3000:]
        for run in (module_run, git_run):
            # Logs reach Prefect in batches: a moment after the run ended.
            wait_until(partial(_greeted, client, run), f"run {run}'s log lines reach Prefect", 30)
    reports = {run: probe.report(run) for run in (module_run, git_run)}
    launcher = probe.launcher_pids()[-1]
    for run, report in reports.items():
        assert report["ppid"] == launcher, "the run is not a fork of the warm launcher"
        assert report["pgid"] == report["pid"] == report["sid"], "not its own session"
        assert report["run_id"] == str(run)
        # What the slot broker and the drain read: /proc shows the run's identity.
        assert report["proc_run_id"] == str(run)
        assert report["worker_id"] == probe.worker
        assert report["slot_broker"]
        assert Path(report["slot_broker"]).is_socket()
    assert reports[module_run]["torch_sum"] == 6.0
    # Prefect cloned the repository into the run's own working directory.
    assert (Path(reports[git_run]["cwd"]) / "launcher_probe.py").exists() or "probe-repo" in (
        reports[git_run]["cwd"]
    )
    assert reports[git_run]["cwd"] != os.getcwd()
    # Settings rebuilt from each run's environment: only the git deployment's job sets DEBUG.
    assert reports[git_run]["logging_level"] == "DEBUG"
    assert reports[module_run]["logging_level"] != "DEBUG"
    assert reports[module_run]["random"] != reports[git_run]["random"]
    assert "started as a subprocess" not in probe.log()
    # What the runs imported, the launcher learns: the probe's own module next time.
    wait_until(lambda: "launcher_probe" in probe.hello()["preloaded"], "the launcher learns", 60)


def test_a_run_that_exits_with_3_is_crashed_with_its_exit_code(probe: ProbeWorker) -> None:
    with get_client(sync_client=True) as client:
        run = probe.submit(client, probe.by_module, exit_code=3)
        state = _final(client, run)
    assert probe.report(run)["ppid"] == probe.launcher_pids()[-1]
    assert state.type.value == "CRASHED", state
    assert "status code: 3" in (state.message or ""), state.message


def test_cancelling_a_run_stops_it_and_its_children_and_gives_its_slot_back(
    probe: ProbeWorker,
) -> None:
    with get_client(sync_client=True) as client:
        run = probe.submit(client, probe.by_module, sleep_s=120, child_sleep_s=120, hold_slot=True)
        report = probe.report(run)
        assert active_slots(probe.limit) == 1
        assert report["child_pid"] in descendants([report["pid"]])
        # What the UI's Cancel does.
        client.set_flow_run_state(run, Cancelling(), force=True)
        state = _final(client, run, timeout_s=90)
    assert state.type.value == "CANCELLED", state
    wait_until(lambda: not is_running(report["pid"]), "the run's process stops", 30)
    wait_until(lambda: not is_running(report["child_pid"]), "the run's child stops", 30)
    wait_until(lambda: active_slots(probe.limit) == 0, "the slot comes back", 60)


def test_a_dead_launcher_is_started_again_and_runs_meanwhile_start_as_subprocesses(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    with _start(prefect_server, tmp_path) as worker, get_client(sync_client=True) as client:
        first = worker.launcher_pids()[-1]
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not is_running(first), "the launcher dies", 30)
        fallback = worker.submit(client, worker.by_module)
        assert _final(client, fallback).type.value == "COMPLETED", worker.log()[-3000:]
        assert "launcher exited with -9: starting it again" in worker.log()
        assert "flow run started as a subprocess" in worker.log()
        assert worker.report(fallback)["ppid"] != first
        wait_until(lambda: len(worker.launcher_pids()) == 2, "a new launcher starts", 30)
        second = worker.launcher_pids()[-1]

        def forked_again() -> bool:
            run = worker.submit(client, worker.by_module)
            assert _final(client, run).type.value == "COMPLETED"
            return bool(worker.report(run)["ppid"] == second)

        wait_until(forked_again, "runs fork from the new launcher", 120)
