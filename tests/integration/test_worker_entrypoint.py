"""``prefect-gpu-workers worker`` end to end: one process hosts the slot broker and the
Prefect process worker; the worker's flow runs take their GPU slots at the broker."""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

from broker_harness import active_slots, unique_worker, wait_until
from prefect.client.orchestration import get_client

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.local.prefect_ops import (
    deploy_for_local_workers,
    ensure_gpu_limit,
    ensure_process_pool,
    read_runs,
    submit_runs,
)
from prefect_gpu_workers.naming import WORKER_ID_ENV
from prefect_gpu_workers.records import read_records
from prefect_gpu_workers.report import gpu_overlap_per_worker
from prefect_gpu_workers.server import LocalPrefectServer, stop_process_group
from prefect_gpu_workers.slots.wire import decode, encode

BROKER_LINE = re.compile(r"slot broker for (\S+) on (\S+)")


def _broker_stats(path: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.sendall(encode({"op": "stats"}))
        return decode(sock.makefile("rb").readline())


def _scrape(path: Path) -> list[str]:
    """GET /metrics over the Unix socket; the body's lines."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    return body.decode().splitlines()


def test_worker_runs_flow_runs_whose_gpu_steps_wait_at_its_broker(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    worker = unique_worker()
    pool = f"broker-{worker}"
    name = f"gpu:{worker}"
    with get_client(sync_client=True) as client:
        ensure_process_pool(client, pool)
        ensure_gpu_limit(client, name, 2)
    deployment_id = deploy_for_local_workers(pool, f"pipeline-{worker}")
    log_path = tmp_path / "worker.log"
    metrics_path = tmp_path / "metrics.sock"
    env = {
        **os.environ,
        **prefect_server.env(),
        WORKER_ID_ENV: worker,
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect_gpu_workers.cli", "worker",
             "--pool", pool, "--flow-runs", "6", "--metrics-socket", str(metrics_path)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_until(lambda: BROKER_LINE.search(log_path.read_text()) is not None, "broker up", 180)
        match = BROKER_LINE.search(log_path.read_text())
        assert match is not None
        assert match.group(1) == name
        socket_path = match.group(2)
        assert os.stat(socket_path).st_mode & 0o777 == 0o600
        assert os.stat(Path(socket_path).parent).st_mode & 0o777 == 0o700

        record_dir = tmp_path / "records"
        params = PipelineParams(
            items=1, download_s=1.0, gpu_s=1.5, save_s=1.0, simulate=True,
            record_dir=str(record_dir),
        )  # fmt: skip
        with get_client(sync_client=True) as client:
            ids = submit_runs(client, deployment_id, 6, params.as_parameters())

            def all_final() -> bool:
                runs = read_runs(client, ids)
                return all(r.state is not None and r.state.is_final() for r in runs)

            wait_until(all_final, "the six flow runs finish", 400)
            states = [r.state.type.value for r in read_runs(client, ids) if r.state is not None]
        assert states == ["COMPLETED"] * 6, log_path.read_text()[-3000:]

        gpu_steps = [r for r in read_records(record_dir) if r.stage == "gpu"]
        assert len(gpu_steps) == 6
        assert gpu_overlap_per_worker(gpu_steps)[worker] <= 2
        stats = _broker_stats(socket_path)
        assert stats["grants"] == 6, stats  # every GPU step was granted by the broker
        assert active_slots(name) == 0
        assert "no slot broker" not in log_path.read_text()
        print(log_path.read_text())
        metrics = _scrape(metrics_path)
        assert f'pgw_gpu_slots{{limit="{name}"}} 2' in metrics
        assert f'pgw_gpu_slots_held{{limit="{name}"}} 0' in metrics
        assert f'pgw_gpu_slot_grants_total{{worker="{worker}"}} 6' in metrics
        assert os.stat(metrics_path).st_mode & 0o777 == 0o600
    finally:
        stop_process_group(proc, grace_s=30)
    assert proc.returncode is not None
    assert not Path(socket_path).exists(), "the broker's socket outlived the worker"


def test_a_run_that_ends_while_runs_wait_frees_its_place_for_one_at_once(
    prefect_server: LocalPrefectServer, tmp_path: Path
) -> None:
    """With one flow-run place and a poll every 120 s (84-156 s with Prefect's jitter),
    four waiting runs follow one another within seconds: each run that ends polls."""
    worker = unique_worker()
    pool = f"refill-{worker}"
    with get_client(sync_client=True) as client:
        ensure_process_pool(client, pool)
        ensure_gpu_limit(client, f"gpu:{worker}", 1)
    deployment_id = deploy_for_local_workers(pool, f"pipeline-{worker}")
    record_dir = tmp_path / "records"
    params = PipelineParams(items=1, gpu_s=0.5, simulate=True, record_dir=str(record_dir))
    with get_client(sync_client=True) as client:  # waiting before the worker's first poll
        ids = submit_runs(client, deployment_id, 4, params.as_parameters())
    log_path = tmp_path / "worker.log"
    env = {
        **os.environ,
        **prefect_server.env(),
        WORKER_ID_ENV: worker,
        "PREFECT_WORKER_QUERY_SECONDS": "120",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect_gpu_workers.cli", "worker", "--pool", pool,
             "--flow-runs", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        with get_client(sync_client=True) as client:

            def all_final() -> bool:
                runs = read_runs(client, ids)
                return all(r.state is not None and r.state.is_final() for r in runs)

            # Two regular polls at most (a first one may come before the worker's sync).
            wait_until(all_final, "the four flow runs finish", 400)
            states = [r.state.type.value for r in read_runs(client, ids) if r.state is not None]
        assert states == ["COMPLETED"] * 4, log_path.read_text()[-3000:]
        by_run: dict[str, list[float]] = {}
        for record in read_records(record_dir):
            times = by_run.setdefault(record.run_id, [float("inf"), 0.0])
            times[0] = min(times[0], record.launched or times[0])
            times[1] = max(times[1], record.end)
        spans = sorted(by_run.values())
        assert len(spans) == 4
        gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(spans)]
        # Never two at once (one place), and each next run started long before the
        # next regular poll (84 s at the soonest) could have taken it.
        assert all(0 <= gap < 30 for gap in gaps), gaps
    finally:
        stop_process_group(proc, grace_s=30)
