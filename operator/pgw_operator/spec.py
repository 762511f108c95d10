"""Typed view of a GpuWorkerPool spec, and the names the operator gives things.

The API server applies the CRD's defaults and validation; parsing here applies
the same defaults (``DEFAULTS``, their one source: a test checks the CRD
against it) so that pure functions can be tested with partial specs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prefect_gpu_workers.naming import DEFAULT_LIMIT_PREFIX

GROUP = "gpuworkers.dev"
VERSION = "v1alpha1"
PLURAL = "gpuworkerpools"
KIND = "GpuWorkerPool"

# spec.gpu.memory's value that reads each GPU's memory from the node's label.
GPU_MEMORY_AUTO = "auto"

# Label on every Deployment and pod of a pool; its value is the pool name.
POOL_LABEL = f"{GROUP}/pool"
WORKER_CONTAINER = "worker"
FIELD_MANAGER = "prefect-gpu-workers-operator"
MANAGED_BY = "prefect-gpu-workers-operator"


# Every default of the spec, by its path under `spec`. The CRD's `default:`
# values must be exactly these (tests/unit/test_operator_spec.py).
DEFAULTS: dict[str, Any] = {
    "replicas": 1,
    "workPool.create": True,
    "workPool.flowRunsPerWorker": 10,
    "prefect.apiKeySecretRef.key": "api-key",
    "prefect.finalizerTimeoutSeconds": 600,
    "gpu.resourceName": "nvidia.com/gpu",
    "gpu.wholeNode": False,
    "gpu.slotsPerGpu": 1,
    "gpu.limitPrefix": DEFAULT_LIMIT_PREFIX,
    "worker.imagePullPolicy": "IfNotPresent",
    "worker.limitWaitTimeoutSeconds": 300,
    "worker.drainGracePeriodSeconds": 60,
    "autoscaling.minReplicas": 0,
    "autoscaling.lookaheadSeconds": 0,
    "autoscaling.pollIntervalSeconds": 5,
    "autoscaling.scaleDownDelaySeconds": 300,
    "autoscaling.cooldownSeconds": 15,
    "disruption.maxUnavailable": 1,
}


def spec_value(spec: Mapping[str, Any], path: str) -> Any:
    """The value at ``path`` (e.g. "gpu.slotsPerGpu") of a raw spec, else its default."""
    node: Any = spec
    for part in path.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return DEFAULTS[path]
        node = node[part]
    return node


@dataclass(frozen=True)
class SecretRef:
    name: str
    key: str


@dataclass(frozen=True)
class PoolSpec:
    """The spec as decisions read it; build it with :meth:`from_dict` (which applies DEFAULTS)."""

    work_pool: str
    api_url: str
    image: str
    replicas: int
    create_work_pool: bool
    flow_runs_per_worker: int
    api_key: SecretRef | None
    resource_name: str
    gpus_per_worker: int | None
    whole_node: bool
    slots_per_gpu: int
    limit_prefix: str
    image_pull_policy: str
    limit_wait_timeout_s: int
    drain_grace_period_s: int
    pod_template: dict[str, Any]
    # spec.gpu.memoryPerSlot, a Kubernetes quantity ("20Gi"): slots per GPU
    # from the node's GPU memory label instead of slots_per_gpu.
    memory_per_slot: str | None
    # spec.gpu.memory: "auto" (the node's GPU memory label) or each GPU's memory
    # ("80Gi"): each worker also gets a GPU memory limit. None: no memory limit.
    gpu_memory: str | None = None
    finalizer_timeout_s: int = int(DEFAULTS["prefect.finalizerTimeoutSeconds"])
    # spec.worker.metricsPort: the worker serves its slot broker's Prometheus
    # text on this port (container port "metrics"). None: no metrics port, and
    # the pod template exactly as before (existing pools do not roll).
    metrics_port: int | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> PoolSpec:
        secret = spec["prefect"].get("apiKeySecretRef")
        gpus = (spec.get("gpu") or {}).get("perWorker")
        return cls(
            work_pool=spec["workPool"]["name"],
            api_url=spec["prefect"]["apiUrl"],
            image=spec["worker"]["image"],
            replicas=int(spec_value(spec, "replicas")),
            create_work_pool=bool(spec_value(spec, "workPool.create")),
            flow_runs_per_worker=int(spec_value(spec, "workPool.flowRunsPerWorker")),
            api_key=(
                SecretRef(secret["name"], str(spec_value(spec, "prefect.apiKeySecretRef.key")))
                if secret
                else None
            ),
            resource_name=str(spec_value(spec, "gpu.resourceName")),
            gpus_per_worker=int(gpus) if gpus is not None else None,
            whole_node=bool(spec_value(spec, "gpu.wholeNode")),
            slots_per_gpu=int(spec_value(spec, "gpu.slotsPerGpu")),
            limit_prefix=str(spec_value(spec, "gpu.limitPrefix")),
            image_pull_policy=str(spec_value(spec, "worker.imagePullPolicy")),
            limit_wait_timeout_s=int(spec_value(spec, "worker.limitWaitTimeoutSeconds")),
            drain_grace_period_s=int(spec_value(spec, "worker.drainGracePeriodSeconds")),
            pod_template=dict(spec["worker"].get("podTemplate") or {}),
            memory_per_slot=(spec.get("gpu") or {}).get("memoryPerSlot"),
            gpu_memory=(spec.get("gpu") or {}).get("memory"),
            finalizer_timeout_s=int(spec_value(spec, "prefect.finalizerTimeoutSeconds")),
            metrics_port=_optional_int(spec["worker"].get("metricsPort")),
        )


def _optional_int(value: Any) -> int | None:
    return int(value) if value is not None else None
