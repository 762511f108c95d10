"""Helpers for the worker entrypoint's tests: a worker in a child process with its own
pool, limit and deployment, and the states of its runs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
from prefect.client.orchestration import SyncPrefectClient
from prefect.deployments.runner import RunnerDeployment
from prefect.types.entrypoint import EntrypointType
from prometheus_client.parser import text_string_to_metric_families

from pgw_flows.params import PipelineParams
from prefect_gpu_workers.local.prefect_ops import local_job_variables, read_runs


@dataclass
class DrainingWorker:
    """A worker entrypoint in a child process, its pool, limit and deployment."""

    worker: str
    limit: str
    deployment_id: UUID
    proc: subprocess.Popen[bytes]
    log_path: Path
    metrics_socket: Path  # its ``--metrics-socket``

    def metrics(self) -> str:
        """The worker's Prometheus text, read from its Unix socket."""
        transport = httpx.HTTPTransport(uds=str(self.metrics_socket))
        with httpx.Client(transport=transport, trust_env=False, timeout=10) as http:
            return http.get("http://localhost/metrics").raise_for_status().text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def submit(self, client: SyncPrefectClient, gpu_s: float, env: dict[str, str]) -> UUID:
        params = PipelineParams(items=1, download_s=0.5, gpu_s=gpu_s, save_s=0.5, simulate=True)
        run = client.create_flow_run_from_deployment(
            self.deployment_id, parameters=params.as_parameters(), job_variables={"env": env}
        )
        return run.id


def metric_sample(text: str, family: str, **labels: str) -> float | None:
    """The value of the first sample of ``family`` whose labels include ``labels``,
    in Prometheus text; None when there is none."""
    for metric in text_string_to_metric_families(text):
        for sample in metric.samples:
            if sample.name == family and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def states(client: SyncPrefectClient, ids: list[UUID]) -> dict[UUID, tuple[str, str, str]]:
    """Each run's state type, name and message."""
    return {
        run.id: (run.state.type.value, run.state.name or "", run.state.message or "")
        for run in read_runs(client, ids)
        if run.state is not None
    }


def deploy_by_module(flow: Any, name: str, pool: str) -> UUID:
    """Deploy a test flow by module path (its module found through the workers'
    ``PYTHONPATH``), started as local mode starts runs: the engine itself, no
    workspace-resolving process per run."""
    deployment = RunnerDeployment.from_flow(
        flow,
        name=name,
        work_pool_name=pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        job_variables=local_job_variables(),
    )
    deployment_id = deployment.apply(work_pool_name=pool)
    assert isinstance(deployment_id, UUID)
    return deployment_id
