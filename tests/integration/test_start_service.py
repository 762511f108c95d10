"""``prefect-gpu-workers start`` as a user runs it: real services, workers and server.

No GPU here, so capacity is stated (``--gpus``). The flow is Prefect's plain
per-worker pattern (``plain_gpu_flow``), unchanged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import (
    GlobalConcurrencyLimitCreate,
    GlobalConcurrencyLimitUpdate,
)
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from worker_harness import deploy_by_module

from prefect_gpu_workers.naming import memory_limit_name
from prefect_gpu_workers.procfs import ENVIRON_ROOM_ENV, env_value
from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.service import prefect_ops
from prefect_gpu_workers.service.processes import marked_pids
from prefect_gpu_workers.service.status import read_status

HERE = Path(__file__).resolve().parent
# Each test starts Python services, workers and flow runs: on a loaded shared
# 2-core machine one test (with the server's start) took over 10 minutes.
pytestmark = pytest.mark.timeout(1800)
# Generous: two cores shared by several engineers' test runs.
READY_TIMEOUT_S = 240.0
RUN_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 120.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect_gpu_workers", *args]


def wait_until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.5)


@dataclass
class Service:
    worker_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_output(self, text: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        def seen() -> bool:
            if text in self.output():
                return True
            assert self.proc.poll() is None, f"service exited early:\n{self.output()}"
            return False

        wait_until(seen, timeout_s, f"{text!r} from {self.worker_id}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(STOP_TIMEOUT_S)


@dataclass
class Harness:
    pool: str
    env: dict[str, str]
    workdir: Path
    services: list[Service]

    def start(self, *args: str, worker_id: str, env: dict[str, str] | None = None) -> Service:
        log = self.workdir / f"start-{worker_id}-{uuid.uuid4().hex[:6]}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                cli("start", "--pool", self.pool, "--worker-id", worker_id, *args),
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        service = Service(worker_id, proc, log)
        self.services.append(service)
        return service

    def run_to_end(self, *args: str, worker_id: str, env: dict[str, str] | None = None) -> Service:
        service = self.start(*args, worker_id=worker_id, env=env)
        service.proc.wait(READY_TIMEOUT_S)
        return service


def client() -> Any:
    return get_client(sync_client=True)


def online(client: SyncPrefectClient, pool: str, name: str) -> bool:
    return any(
        w.name == name and w.status.value == "ONLINE"
        for w in prefect_ops.pool_workers(client, pool)
    )


def ready(pool: str, name: str, slots: int) -> bool:
    """The worker's limit has its size and the worker is ONLINE."""
    with client() as c:
        limit = prefect_ops.read_limit(c, f"gpu:{name}")
        return limit is not None and limit.limit == slots and online(c, pool, name)


def wait_ready(pool: str, name: str, slots: int, service: Service) -> None:
    def check() -> bool:
        assert service.proc.poll() is None, f"service exited early:\n{service.output()}"
        return ready(pool, name, slots)

    wait_until(check, READY_TIMEOUT_S, f"{name} ready")


@pytest.fixture(scope="module")
def harness(
    prefect_server: LocalPrefectServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Harness]:
    workdir = tmp_path_factory.mktemp("start-service")
    env = {
        **os.environ,
        **prefect_server.env(),
        # Workers poll every 2 s and beat every 5 s: the tests wait less.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        # No virtual environment on PATH, as under systemd: the service adds its own.
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "PGW_STATE_DIR": str(workdir / "state"),
    }
    env.pop("WORKER_ID", None)
    harness = Harness(f"start-{uuid.uuid4().hex[:6]}", env, workdir, [])
    yield harness
    for service in harness.services:
        if service.proc.poll() is None:
            service.proc.kill()
            service.proc.wait()
    for service in harness.services:
        for name in (service.worker_id, f"{service.worker_id}-gpu0", f"{service.worker_id}-gpu1"):
            for pid in marked_pids(name):
                os.kill(pid, signal.SIGKILL)


def worker_pids(name: str) -> list[int]:
    """The marked processes that are workers (not their warm launchers, marked too)."""
    return [pid for pid in marked_pids(name) if env_value(pid, ENVIRON_ROOM_ENV) is None]


def deploy_plain_flow(pool: str) -> UUID:
    from plain_gpu_flow import plain_gpu_flow

    return deploy_by_module(plain_gpu_flow, f"plain-{pool}", pool)


def peak_overlap(intervals: Sequence[tuple[float, float]]) -> int:
    """Most intervals open at once (an end before a start at the same instant)."""
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in events:
        current += step
        peak = max(peak, current)
    return peak


# ---------------------------------------------------------------- two services


@pytest.fixture(scope="module")
def two(harness: Harness) -> tuple[Service, Service]:
    suffix = uuid.uuid4().hex[:6]
    # Each worker takes at most 4 runs; none finishes before the test releases
    # them, so 8 runs give each worker 4: 2 in their slots, 2 waiting.
    args = ("--gpus", "1", "--slots-per-gpu", "2", "--flow-runs", "4", "--drain-timeout", "60")
    a = harness.start(*args, worker_id=f"box-a-{suffix}")
    b = harness.start(*args, worker_id=f"box-b-{suffix}")
    for service in (a, b):
        wait_ready(harness.pool, service.worker_id, 2, service)
    return a, b


def test_two_services_serve_plain_concurrency_within_each_limit(
    harness: Harness, two: tuple[Service, Service]
) -> None:
    a, b = two
    assert "1 GPU (stated)" in a.output() or "GPU 0 (stated): 2 slot(s)" in a.output()
    deployment_id = deploy_plain_flow(harness.pool)
    record_dir = harness.workdir / "records"
    record_dir.mkdir()
    release = harness.workdir / "release"
    params = {"record_dir": str(record_dir), "release_file": str(release)}
    started = time.monotonic()
    with client() as c:
        ids = [
            c.create_flow_run_from_deployment(deployment_id, parameters=params).id for _ in range(8)
        ]

    def both_full() -> bool:
        with client() as c:
            held = [prefect_ops.read_limit(c, f"gpu:{s.worker_id}") for s in (a, b)]
        return all(limit is not None and limit.active_slots == 2 for limit in held)

    wait_until(both_full, RUN_TIMEOUT_S, "every slot of both limits held at once")
    # Prefect counts a slot before the step's process is inside its block; the
    # steps say when they are (two per worker: its limit holds the rest back).
    wait_until(
        lambda: len(list(record_dir.glob("*.holding"))) == 4, RUN_TIMEOUT_S, "four steps inside"
    )
    all_full_after = time.monotonic() - started
    release.touch()

    def finished() -> list[Any]:
        with client() as c:
            runs = c.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        done = len(runs) == 8 and all(r.state is not None and r.state.is_final() for r in runs)
        return runs if done else []

    runs = wait_until(finished, RUN_TIMEOUT_S, "all 8 runs final")
    total = time.monotonic() - started
    assert [r.state.type.value for r in runs] == ["COMPLETED"] * 8
    records = [json.loads(p.read_text()) for p in record_dir.glob("*.json")]
    assert len(records) == 8
    peaks = {}
    for service in (a, b):
        mine = [(r["start"], r["end"]) for r in records if r["worker_id"] == service.worker_id]
        assert len(mine) == 4, f"{service.worker_id} ran {len(mine)} of 8 runs"
        peaks[service.worker_id] = peak_overlap(mine)
    # Per worker, the peak of GPU steps at once equals its limit and never exceeds it.
    assert set(peaks.values()) == {2}, peaks
    with client() as c:
        held = [prefect_ops.read_limit(c, f"gpu:{s.worker_id}") for s in (a, b)]
    assert [limit.active_slots if limit else None for limit in held] == [0, 0]
    # Each worker serves its metrics on a Unix socket beside its lock (nothing on TCP).
    for service in (a, b):
        sock = harness.workdir / "state" / f"{service.worker_id}.metrics.sock"
        transport = httpx.HTTPTransport(uds=str(sock))
        with httpx.Client(transport=transport, trust_env=False, timeout=10) as http:
            text = http.get("http://localhost/metrics").raise_for_status().text
        assert f'pgw_gpu_slots{{limit="gpu:{service.worker_id}"}} 2' in text, text
    print(f"\ntwo-service run: 8 runs, limit 2 per worker, peaks {peaks}, all slots held after "
          f"{all_full_after:.1f}s, all runs final after {total:.1f}s")  # fmt: skip


def test_a_name_in_use_on_this_host_is_refused(
    harness: Harness, two: tuple[Service, Service]
) -> None:
    a, _ = two
    clash = harness.run_to_end("--gpus", "1", worker_id=a.worker_id)
    assert clash.proc.returncode == 2
    assert (
        f"another `prefect-gpu-workers start` on this host (pid {a.proc.pid}) runs worker"
        in clash.output()
    )
    assert ready(harness.pool, a.worker_id, 2), "the refused service touched the live one's limit"


def test_a_name_live_on_another_host_is_refused(
    harness: Harness, two: tuple[Service, Service], tmp_path: Path
) -> None:
    a, _ = two
    # Another lock directory stands for another machine: only Prefect can tell.
    clash = harness.run_to_end(
        "--gpus", "1", worker_id=a.worker_id, env={"PGW_STATE_DIR": str(tmp_path)}
    )
    assert clash.proc.returncode == 2
    output = clash.output()
    assert f"refused: worker {a.worker_id!r} is live in work pool {harness.pool!r}" in output
    assert "Worker names must be unique" in output
    assert ready(harness.pool, a.worker_id, 2), "the refused service touched the live one's limit"


def test_stopping_both_drains_and_leaves_no_limit(
    harness: Harness, two: tuple[Service, Service]
) -> None:
    for service in two:
        assert service.stop() == 0, service.output()
        assert f"deleted limit gpu:{service.worker_id}" in service.output()
    with client() as c:
        left = {limit.name for limit in prefect_ops.all_limits(c)}
        workers = {w.name for w in prefect_ops.pool_workers(c, harness.pool)}
    assert not {f"gpu:{s.worker_id}" for s in two} & left
    assert not {s.worker_id for s in two} & workers
    assert [marked_pids(s.worker_id) for s in two] == [[], []]


# ---------------------------------------------------------------- crash and takeover


def test_sigkilled_per_gpu_service_is_taken_over_without_doubled_slots(harness: Harness) -> None:
    worker_id = f"box-c-{uuid.uuid4().hex[:6]}"
    names = [f"{worker_id}-gpu0", f"{worker_id}-gpu1"]
    args = ("--per-gpu", "--gpus", "2", "--slots-per-gpu", "2", "--drain-timeout", "30")
    first = harness.start(*args, worker_id=worker_id)
    for name in names:
        wait_ready(harness.pool, name, 2, first)
    # One worker per GPU, each pinned to its device.
    for index, name in enumerate(names):
        (pid,) = worker_pids(name)
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        assert (environ["WORKER_ID"], environ["CUDA_VISIBLE_DEVICES"]) == (name, str(index))
    with client() as c:
        old = {name: prefect_ops.read_limit(c, f"gpu:{name}") for name in names}
        old_ids = {name: limit.id for name, limit in old.items() if limit is not None}
        # As if two flow runs held slots when the machine's service died.
        c.update_global_concurrency_limit(
            f"gpu:{names[0]}", GlobalConcurrencyLimitUpdate(active_slots=2)
        )

    first.proc.kill()
    first.proc.wait()
    # The workers die with their service (no worker keeps polling unseen).
    wait_until(lambda: not any(marked_pids(n) for n in names), STOP_TIMEOUT_S, "workers gone")

    second = harness.start(*args, worker_id=worker_id)
    for name in names:
        second.wait_for_output(f"took over limit gpu:{name} left by a stopped service")
    # Whether the dead workers' records were still ONLINE (then watched for a
    # heartbeat that never came) or already OFFLINE depends on how long the
    # restart took; both end in the takeover above.
    for name in names:
        wait_ready(harness.pool, name, 2, second)
    with client() as c:
        limits = {name: prefect_ops.read_limit(c, f"gpu:{name}") for name in names}
    for name, limit in limits.items():
        assert limit is not None
        # Recreated: same size, none of the dead holders' slots, a new id.
        assert (limit.limit, limit.active_slots) == (2, 0)
        assert limit.id != old_ids[name]
    assert "2/2 slot(s) held by dead holders" in second.output()

    # A crashed worker is restarted with backoff, its limit recreated first.
    (crashed,) = worker_pids(names[1])
    os.kill(crashed, signal.SIGKILL)
    second.wait_for_output(f"recreated limit gpu:{names[1]} after its worker crashed")
    second.wait_for_output(f"worker {names[1]} exited with code -9; restarting in 2s")
    wait_until(
        lambda: worker_pids(names[1]) not in ([], [crashed]), READY_TIMEOUT_S, "a new worker"
    )
    wait_ready(harness.pool, names[1], 2, second)

    assert second.stop() == 0, second.output()
    with client() as c:
        assert all(prefect_ops.read_limit(c, f"gpu:{name}") is None for name in names)


# ---------------------------------------------------------------- GPU memory (issue 24)


def test_stated_gpu_memory_makes_memory_limits_beside_slot_limits(harness: Harness) -> None:
    suffix = uuid.uuid4().hex[:6]
    one_id, per_id = f"box-m-{suffix}", f"box-p-{suffix}"
    per_names = [f"{per_id}-gpu0", f"{per_id}-gpu1"]
    stale = memory_limit_name(per_names[0])
    with client() as c:
        # A memory limit a stopped service left, with GiB its dead runs held.
        c.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name=stale, limit=7, active=True)
        )
        c.update_global_concurrency_limit(stale, GlobalConcurrencyLimitUpdate(active_slots=3))
        left_behind = prefect_ops.read_limit(c, stale)
    assert left_behind is not None
    args = ("--gpus", "2", "--gpu-memory", "40GiB", "--slots-per-gpu", "1", "--drain-timeout", "30")
    one = harness.start(*args, worker_id=one_id)
    per = harness.start(*args, "--per-gpu", worker_id=per_id)
    wait_ready(harness.pool, one_id, 2, one)
    for name in per_names:
        wait_ready(harness.pool, name, 1, per)

    expected = {one_id: 80, per_names[0]: 40, per_names[1]: 40}
    with client() as c:
        memory = {name: prefect_ops.read_limit(c, memory_limit_name(name)) for name in expected}
        rows = {
            row.worker_id: (row.slots and row.slots.size, row.memory and row.memory.size)
            for row in read_status(c, harness.pool).limits
        }
    assert {
        name: (limit.limit, limit.active_slots, limit.active) if limit else None
        for name, limit in memory.items()
    } == {name: (size, 0, True) for name, size in expected.items()}
    # Taken over as a slot limit is: recreated, the dead holders' GiB dropped.
    taken_over = memory[per_names[0]]
    assert taken_over is not None
    assert taken_over.id != left_behind.id
    assert f"took over limit {stale} left by a stopped service (3/7 GiB held by dead holders)" in (
        per.output()
    )
    assert f"gpu-memory:{one_id} = 80 GiB" in one.output()
    # status: each worker's memory limit on its row.
    assert {name: rows.get(name) for name in expected} == {
        one_id: (2, 80),
        per_names[0]: (1, 40),
        per_names[1]: (1, 40),
    }
    # Each worker places memory on what its limit was sized from.
    for name, gpus in ((one_id, "2"), (per_names[0], "1"), (per_names[1], "1")):
        (pid,) = worker_pids(name)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--gpus") :][:4] == ["--gpus", gpus, "--gpu-memory", "40GiB"]

    for service in (one, per):
        assert service.stop() == 0, service.output()
    for name in expected:
        assert f"deleted limit {memory_limit_name(name)}" in (one.output() + per.output())
    with client() as c:
        left = {limit.name for limit in prefect_ops.all_limits(c)}
    assert not left & ({f"gpu:{n}" for n in expected} | {memory_limit_name(n) for n in expected})
