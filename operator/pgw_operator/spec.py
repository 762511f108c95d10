"""Typed view of a GpuWorkerPool spec, and the names the operator gives things.

The API server applies the CRD's defaults and validation; parsing here repeats
the defaults so that pure functions can be tested with partial specs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

GROUP = "gpuworkers.dev"
VERSION = "v1alpha1"
PLURAL = "gpuworkerpools"
KIND = "GpuWorkerPool"

# Label on every Deployment and pod of a pool; its value is the pool name.
POOL_LABEL = f"{GROUP}/pool"
WORKER_CONTAINER = "worker"
FIELD_MANAGER = "prefect-gpu-workers-operator"
MANAGED_BY = "prefect-gpu-workers-operator"


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str = "api-key"


@dataclass(frozen=True)
class PoolSpec:
    work_pool: str
    api_url: str
    image: str
    replicas: int = 1
    create_work_pool: bool = True
    flow_runs_per_worker: int = 10
    api_key: SecretRef | None = None
    resource_name: str = "nvidia.com/gpu"
    gpus_per_worker: int | None = None
    whole_node: bool = False
    slots_per_gpu: int = 1
    limit_prefix: str = "gpu"
    image_pull_policy: str = "IfNotPresent"
    limit_wait_timeout_s: int = 300
    drain_grace_period_s: int = 60
    pod_template: dict[str, Any] = field(default_factory=dict)
    # spec.gpu.memoryPerSlot, a Kubernetes quantity ("20Gi"): slots per GPU
    # from the node's GPU memory label instead of slots_per_gpu.
    memory_per_slot: str | None = None

    @classmethod
    def from_dict(cls, spec: dict[str, Any]) -> PoolSpec:
        work_pool = spec["workPool"]
        prefect = spec["prefect"]
        gpu = spec.get("gpu") or {}
        worker = spec["worker"]
        secret = prefect.get("apiKeySecretRef")
        return cls(
            work_pool=work_pool["name"],
            api_url=prefect["apiUrl"],
            image=worker["image"],
            replicas=int(spec.get("replicas", 1)),
            create_work_pool=bool(work_pool.get("create", True)),
            flow_runs_per_worker=int(work_pool.get("flowRunsPerWorker", 10)),
            api_key=SecretRef(secret["name"], secret.get("key", "api-key")) if secret else None,
            resource_name=gpu.get("resourceName", "nvidia.com/gpu"),
            gpus_per_worker=gpu.get("perWorker"),
            whole_node=bool(gpu.get("wholeNode", False)),
            slots_per_gpu=int(gpu.get("slotsPerGpu", 1)),
            limit_prefix=gpu.get("limitPrefix", "gpu"),
            image_pull_policy=worker.get("imagePullPolicy", "IfNotPresent"),
            limit_wait_timeout_s=int(worker.get("limitWaitTimeoutSeconds", 300)),
            drain_grace_period_s=int(worker.get("drainGracePeriodSeconds", 60)),
            pod_template=dict(worker.get("podTemplate") or {}),
            memory_per_slot=(spec.get("gpu") or {}).get("memoryPerSlot"),
        )
