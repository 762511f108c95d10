"""Worker pools on the dev cluster's real node, for the tests that run flows there.

The operator (run by the test) makes the pools' worker pods from the worker
image built by hack/build-images; they run on the real node (kubelet,
containerd, runc) against the Prefect server the node's pods reach
(``node_prefect_server``). ``tests/cluster/k8s/conftest.py`` hands them out as
the ``node_workers`` fixture.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from kubernetes import client
from prefect.client.orchestration import SyncPrefectClient

from prefect_gpu_workers.local.prefect_ops import read_runs

from .operator_harness import Pools, PrefectLimits, start_pool, unique, wait_until
from .real_node import Image, RealNode

# Where the flows in worker pods write their stage records: the pod's /tmp
# emptyDir, which the test reads from the kubelet's directory on this machine.
POD_RECORDS = "/tmp/records"


@dataclass(frozen=True)
class NodeWorkers:
    """Worker pools on the real node, from the worker image, served by the node's Prefect."""

    node: RealNode
    worker: Image
    api_url: str
    pools: Pools
    limits: PrefectLimits

    def start(
        self,
        name: str,
        replicas: int,
        flow_runs: int,
        grace_s: int = 0,
        metrics_port: int | None = None,
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """Pool ``name``: workers of one fake GPU and 2 slots each (serving their
        metrics on ``metrics_port`` where given). Its work pool, and pod -> limit
        once it is Ready."""
        work_pool = unique(f"node-{name}")
        worker: dict[str, Any] = {
            "image": self.worker.ref,
            "imagePullPolicy": "Never",  # imported into the node; no registry
            "drainGracePeriodSeconds": grace_s,
            "podTemplate": {
                **self.node.placement(),
                "env": [{"name": "PREFECT_WORKER_QUERY_SECONDS", "value": "1"}],
            },
        }
        if metrics_port is not None:
            worker["metricsPort"] = metrics_port
        spec = {
            "replicas": replicas,
            "workPool": {"name": work_pool, "flowRunsPerWorker": flow_runs},
            "prefect": {"apiUrl": self.api_url},
            "gpu": {"perWorker": 1, "slotsPerGpu": 2},
            "worker": worker,
        }
        return work_pool, start_pool(self.pools, self.limits, name, spec)


def run_params(records: bool, **seconds: float) -> dict[str, Any]:
    """The pipeline's parameters for a simulated run (no torch): stage seconds as given."""
    params: dict[str, Any] = {"items": 1, "simulate": True, "download_s": 0.5, "gpu_s": 3.0,
                              "save_s": 0.5, **seconds}  # fmt: skip
    if records:
        params["record_dir"] = POD_RECORDS
    return params


def wait_until_final(prefect: SyncPrefectClient, run_ids: list[UUID], timeout: float = 300) -> Any:
    """The flow runs once every one of them is in a final state."""
    return wait_until(
        lambda: (
            (found := read_runs(prefect, run_ids))
            and all(r.state is not None and r.state.is_final() for r in found)
            and found
        ),
        f"{len(run_ids)} flow runs to end",
        timeout=timeout,
        interval=1,
    )


def worker_status(pools: Pools, pod: str) -> client.V1ContainerStatus | None:
    """The worker container's status in ``pod`` (None before the kubelet reports one)."""
    status = pools.core.read_namespaced_pod(pod, pools.namespace).status
    return next(iter(status.container_statuses or []), None) if status else None
