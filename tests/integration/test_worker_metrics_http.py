"""A real broker against a real Prefect server: a step's labels become its deployment's
GPU accounting, scraped over HTTP as Prometheus would."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from broker_harness import BrokerThread, create_limit, start_thread, unique_worker, wait_until
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.utilities.asyncutils import run_coro_as_sync
from worker_harness import metric_sample

from prefect_gpu_workers.naming import SLOT_BROKER_ENV
from prefect_gpu_workers.server import LocalPrefectServer
from prefect_gpu_workers.slots.client import gpu_slot
from prefect_gpu_workers.slots.wire import decode, encode


def _scrape(port: int, path: str = "/metrics") -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return str(response.read().decode())


HELD = "pgw_gpu_step_held_slot_seconds_total"


async def _deployment(name: str) -> str:
    async with get_client() as client:
        flow_id = await client.create_flow_from_name(f"{name}-flow")
        return str(await client.create_deployment(flow_id=flow_id, name=name))


def test_a_deployments_held_seconds_are_served_over_http(
    prefect_server: LocalPrefectServer,
) -> None:
    worker = unique_worker()
    limit = f"gpu:{worker}"
    create_limit(limit, 1)
    deployment_name = f"train-{worker}"
    deployment_id: Any = run_coro_as_sync(_deployment(deployment_name))
    step = {"limit": limit, "deployment": deployment_name, "flow": "pipeline", "task": "fit"}
    with BrokerThread(worker) as broker:
        port = broker.serve_metrics_http()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(broker.socket_path)
            lines = sock.makefile("rb")
            labels = {"deployment_id": deployment_id, "flow": "pipeline", "task": "fit"}
            sock.sendall(encode({"op": "acquire", "limit": limit, "occupy": 1, "labels": labels}))
            assert decode(lines.readline())["event"] == "granted"
            # A step still holding is counted up to the scrape.
            wait_until(
                lambda: (
                    (
                        metric_sample(_scrape(port), "pgw_gpu_step_held_slot_seconds_total", **step)
                        or 0
                    )
                    > 0
                ),
                "the held seconds of a live step grow",
            )
            sock.sendall(encode({"op": "release"}))
            assert decode(lines.readline())["event"] == "released"
        text = _scrape(port)
        assert metric_sample(text, "pgw_gpu_steps_total", **step) == 1
        held = metric_sample(text, "pgw_gpu_step_held_slot_seconds_total", **step)
        assert held is not None
        assert held > 0
        # Released (answered after the broker let go): it no longer grows.
        assert metric_sample(_scrape(port), HELD, **step) == held
        assert metric_sample(text, "pgw_gpu_slots_active", limit=limit) is not None
        with pytest.raises(urllib.error.HTTPError) as caught:
            _scrape(port, "/other")
        assert caught.value.code == 404


def test_a_step_in_a_flow_and_task_is_counted_under_their_names(
    prefect_server: LocalPrefectServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = unique_worker()
    limit = f"gpu:{worker}"
    create_limit(limit, 1)

    @task(name="fit-step")
    def fit() -> None:
        with gpu_slot(1, worker_id=worker):
            pass

    @flow(name="accounted-pipeline")
    def pipeline() -> None:
        fit()

    with BrokerThread(worker) as broker:
        monkeypatch.setenv(SLOT_BROKER_ENV, broker.socket_path)
        port = broker.serve_metrics_http()
        thread = start_thread(pipeline)
        thread.join(120)
        assert not thread.is_alive()
        step = {"limit": limit, "deployment": "none", "flow": "accounted-pipeline"}
        assert metric_sample(_scrape(port), "pgw_gpu_steps_total", **step, task="fit-step") == 1
