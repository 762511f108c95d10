"""The worker Deployment a GpuWorkerPool should have: a pure function of the pool.

The operator server-side-applies this manifest on every reconcile, so drift in
any field listed here is corrected and spec changes roll out. Children carry
only the labels set here: never the pool's own labels, which may include a
GitOps tool's tracking label (Argo CD would then prune them).
"""

from __future__ import annotations

from typing import Any

from pgw_operator.spec import (
    GROUP,
    KIND,
    MANAGED_BY,
    POOL_LABEL,
    VERSION,
    WORKER_CONTAINER,
    PoolSpec,
)
from prefect_gpu_workers.commands import worker_command as entrypoint_command

# The worker process keeps Prefect's home here; the root filesystem is read-only.
PREFECT_HOME = "/var/run/prefect"
WORKER_HEALTH_PORT = 8080
WORKER_UID = 1000


def pool_labels(pool: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "prefect-gpu-worker",
        "app.kubernetes.io/instance": f"gpuworkerpool-{pool}"[:63].rstrip("-."),
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        POOL_LABEL: pool,
    }


def selector(pool: str) -> dict[str, str]:
    return {POOL_LABEL: pool}


def selector_string(pool: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector(pool).items())


def owner_reference(pool: str, uid: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "name": pool,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def worker_env(spec: PoolSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        # The pod's own name is its worker identity and names its limit.
        {"name": "WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "PGW_LIMIT_PREFIX", "value": spec.limit_prefix},
        {"name": "PREFECT_API_URL", "value": spec.api_url},
        {"name": "PREFECT_HOME", "value": PREFECT_HOME},
        {"name": "PREFECT_WORKER_WEBSERVER_PORT", "value": str(WORKER_HEALTH_PORT)},
    ]
    if spec.api_key is not None:
        ref = {"name": spec.api_key.name, "key": spec.api_key.key}
        env.append({"name": "PREFECT_API_KEY", "valueFrom": {"secretKeyRef": ref}})
    user_env = [e for e in spec.pod_template.get("env") or [] if e.get("name") != "WORKER_ID"]
    return env + user_env


def worker_command(spec: PoolSpec) -> list[str]:
    """Wait for this pod's limit, then exec the Prefect worker named after the pod."""
    return entrypoint_command(
        spec.work_pool,
        flow_runs=spec.flow_runs_per_worker,
        limit_prefix=spec.limit_prefix,
        wait_timeout_s=spec.limit_wait_timeout_s,
        with_healthcheck=True,
    )


def worker_resources(spec: PoolSpec) -> dict[str, Any]:
    resources: dict[str, Any] = {
        k: dict(v) for k, v in (spec.pod_template.get("resources") or {}).items()
    }
    if spec.gpus_per_worker is not None:
        # The container's GPU limit is what its limit is sized from; the device
        # plugin requires requests == limits for extended resources.
        count = str(spec.gpus_per_worker)
        resources.setdefault("limits", {})[spec.resource_name] = count
        if spec.resource_name in resources.get("requests", {}):
            resources["requests"][spec.resource_name] = count
    return resources


def _affinity(pool: str, spec: PoolSpec) -> dict[str, Any] | None:
    affinity = dict(spec.pod_template.get("affinity") or {})
    if spec.whole_node:
        # One worker per node: its limit is sized from the whole node.
        affinity["podAntiAffinity"] = {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {"labelSelector": {"matchLabels": selector(pool)},
                 "topologyKey": "kubernetes.io/hostname"}
            ]
        }  # fmt: skip
    return affinity or None


def desired_deployment(pool: str, namespace: str, uid: str, spec: PoolSpec) -> dict[str, Any]:
    template = spec.pod_template
    labels = pool_labels(pool)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": worker_command(spec),
        "env": worker_env(spec),
        "resources": worker_resources(spec),
        "ports": [{"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"}],
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "health"},
            "initialDelaySeconds": 10,
            "periodSeconds": 30,
            "failureThreshold": 3,
        },
        "startupProbe": {
            # The worker waits for its limit before it listens.
            "httpGet": {"path": "/health", "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": max(1, (spec.limit_wait_timeout_s + 60) // 5),
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "prefect-home", "mountPath": PREFECT_HOME},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if spec.whole_node:
        # Whole-node workers see every GPU of the node without requesting them.
        container["env"].append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": spec.drain_grace_period_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumes": [
            {"name": "prefect-home", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
        "automountServiceAccountToken": False,
    }
    for key in ("nodeSelector", "tolerations", "serviceAccountName", "priorityClassName",
                "imagePullSecrets"):  # fmt: skip
        if template.get(key):
            pod_spec[key] = template[key]
    affinity = _affinity(pool, spec)
    if affinity:
        pod_spec["affinity"] = affinity
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": pool,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(pool, uid)],
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(pool)},
            "template": {
                "metadata": {
                    "labels": {**dict(template.get("labels") or {}), **labels},
                    "annotations": dict(template.get("annotations") or {}),
                },
                "spec": pod_spec,
            },
        },
    }
