"""The worker entrypoint waits through a Prefect outage and for its limit, then starts.

What a pod sees when it starts before Prefect is back, or before the operator
has created its limit: the entrypoint neither crashes (a crash loop) nor starts
a worker without a limit (GPU steps unlimited); it says what it waits for and
starts once both are there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from broker_harness import unique_worker, wait_until
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.local.prefect_ops import ensure_gpu_limit, ensure_process_pool
from prefect_gpu_workers.naming import WORKER_ID_ENV
from prefect_gpu_workers.server import LocalPrefectServer, stop_process_group


def test_the_worker_waits_through_an_outage_and_starts_when_its_limit_appears(
    tmp_path: Path,
) -> None:
    server = LocalPrefectServer(home=tmp_path / "prefect")  # not started: Prefect is down
    worker, pool = unique_worker(), f"waits-{unique_worker()}"
    log_path = tmp_path / "worker.log"
    env = {**os.environ, **server.env(), WORKER_ID_ENV: worker, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect_gpu_workers", "worker", "--pool", pool,
             "--flow-runs", "2", "--wait-timeout", "600", "--drain-seconds", "0"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    def output() -> str:
        return log_path.read_text(errors="replace")

    def says(text: str) -> bool:
        assert proc.poll() is None, f"the worker exited ({proc.returncode}):\n{output()}"
        return text in output()

    try:
        wait_until(lambda: says("waiting for the Prefect API"), "the outage reported", 120)
        server.start()
        wait_until(lambda: says("waiting for limit: "), "the missing limit reported", 120)
        assert f"gpu:{worker}" in output()
        assert "slot broker for" not in output()  # no worker without its limit

        with (
            temporary_settings(updates={PREFECT_API_URL: server.api_url}),
            get_client(sync_client=True) as client,
        ):
            ensure_process_pool(client, pool)  # as the operator does before any pod starts
            ensure_gpu_limit(client, f"gpu:{worker}", 2)
            wait_until(lambda: says(f"limit gpu:{worker} is ready"), "the limit seen", 60)
            wait_until(lambda: says("slot broker for"), "the worker started", 120)
            wait_until(
                lambda: worker in {w.name for w in client.read_workers_for_work_pool(pool)},
                "Prefect lists the worker",
                120,
            )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, output()[-3000:]
    finally:
        stop_process_group(proc, grace_s=10)
        server.stop()
