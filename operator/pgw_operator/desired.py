"""The worker Deployment (and PodDisruptionBudget) a GpuWorkerPool should have.

Pure functions of the pool. The operator server-side-applies these manifests
on every reconcile, so drift in any field listed here is corrected and spec
changes roll out. Children carry only the labels set here: never the pool's
own labels, which may include a GitOps tool's tracking label (Argo CD would
then prune them).

How ``spec.worker.podTemplate`` merges into the worker pod:

- appended after the operator's own: ``env``, ``volumes``, ``volumeMounts``;
  the operator's environment variables, volumes (``prefect-home``, ``tmp``) and
  mount paths (Prefect's home, ``/tmp``) cannot be replaced (the CRD rejects
  such entries; entries that got past it are dropped here);
- ``envFrom`` as given: an ``env`` entry wins over ``envFrom`` in Kubernetes,
  so no ConfigMap or Secret can change ``WORKER_ID`` or any other variable the
  operator sets;
- ``securityContext`` (pod) and ``containerSecurityContext`` (worker
  container) are merged key by key over the restricted defaults; whatever they
  say, the result keeps ``runAsNonRoot: true``, a non-root user,
  ``allowPrivilegeEscalation: false``, no privileged mode, every capability
  dropped and a seccomp profile other than Unconfined. ``readOnlyRootFilesystem``
  may be turned off;
- ``topologySpreadConstraints`` without a ``labelSelector`` get the pool's
  pod selector;
- ``labels``: the operator's labels win (the CRD rejects overriding them);
- everything else (``runtimeClassName``, ``nodeSelector``, ``tolerations``...)
  is copied.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pgw_operator.spec import (
    DEFAULTS,
    GPU_MEMORY_AUTO,
    GROUP,
    KIND,
    MANAGED_BY,
    POOL_LABEL,
    VERSION,
    WORKER_CONTAINER,
    PoolSpec,
)
from prefect_gpu_workers.commands import drain_seconds_within
from prefect_gpu_workers.commands import worker_command as entrypoint_command

# The worker process keeps Prefect's home here; the root filesystem is read-only.
PREFECT_HOME = "/var/run/prefect"
WORKER_HEALTH_PORT = 8080
WORKER_UID = 10001  # >= 10000: clear of the uids of the node's own users
# What the operator owns in the pod: a pod template cannot replace these.
OPERATOR_ENV = frozenset(
    {"WORKER_ID", "PGW_LIMIT_PREFIX", "PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_HOME",
     "PREFECT_WORKER_WEBSERVER_PORT"}
)  # fmt: skip
OPERATOR_VOLUMES = {"prefect-home": PREFECT_HOME, "tmp": "/tmp"}  # volume -> mount path
# What scanners (checkov) flag in a worker Deployment that is the pool's to
# decide or cannot be otherwise, each with its reason, on the object itself.
SCANNER_NOTES = {
    "checkov.io/skip1": "CKV_K8S_43=the image is the pool's spec.worker.image: pin a digest there",
    "checkov.io/skip2": "CKV_K8S_15=the pull policy is the pool's spec.worker.imagePullPolicy",
    "checkov.io/skip3": "CKV_K8S_35=Prefect reads its API key only from PREFECT_API_KEY, "
    "and every flow-run process needs it",
    "checkov.io/skip4": "CKV2_K8S_6=what flows reach decides egress: the namespace's "
    "NetworkPolicy is its admin's",
}


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


def worker_service_account(pool: str) -> str:
    """Name of the ServiceAccount the operator makes for a pool's workers.

    Example:
        >>> worker_service_account("gpu-workers")
        'gpu-workers-worker'
    """
    return f"{pool}-worker"


def desired_service_account(pool: str, namespace: str, uid: str) -> dict[str, Any]:
    """The pool's workers' own ServiceAccount: no rights of its own, no token mounted,
    owned by the pool (the garbage collector removes it with the pool)."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": worker_service_account(pool),
            "namespace": namespace,
            "labels": pool_labels(pool),
            "ownerReferences": [owner_reference(pool, uid)],
        },
        "automountServiceAccountToken": False,
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
    user_env = [e for e in spec.pod_template.get("env") or [] if e.get("name") not in OPERATOR_ENV]
    return env + user_env


def _owned_mount_path(path: str) -> bool:
    """True for a path the operator mounts: Prefect's home (or below it) and /tmp itself."""
    normal = "/" + "/".join(part for part in path.split("/") if part not in ("", "."))
    return normal == "/tmp" or any(
        normal == home or normal.startswith(home + "/") for home in (PREFECT_HOME, "/run/prefect")
    )


def worker_volumes(spec: PoolSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pod's volumes and the worker container's mounts: the operator's, then the user's."""
    volumes: list[dict[str, Any]] = [
        {"name": "prefect-home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": name, "mountPath": path} for name, path in OPERATOR_VOLUMES.items()
    ]
    template = spec.pod_template
    volumes += [
        dict(v) for v in template.get("volumes") or []
        if v.get("name") not in OPERATOR_VOLUMES and "hostPath" not in v
    ]  # fmt: skip
    mounts += [
        dict(m) for m in template.get("volumeMounts") or []
        if not _owned_mount_path(str(m.get("mountPath", "")))
    ]  # fmt: skip
    return volumes, mounts


def pod_security_context(spec: PoolSpec) -> dict[str, Any]:
    """Restricted pod defaults, with the template's ``securityContext`` merged over them."""
    merged: dict[str, Any] = {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
        **dict(spec.pod_template.get("securityContext") or {}),
    }
    return _restricted(merged)


def container_security_context(spec: PoolSpec) -> dict[str, Any]:
    """Restricted container defaults, ``containerSecurityContext`` merged over them.

    The user is set once, on the pod (a container-level ``runAsUser`` would
    override a pod template's); only a container-level override sets it here.
    """
    user = dict(spec.pod_template.get("containerSecurityContext") or {})
    drop = sorted({"ALL", *((user.pop("capabilities", None) or {}).get("drop") or [])})
    merged: dict[str, Any] = {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        **user,
        "capabilities": {"drop": drop},
    }
    merged["privileged"] = False
    merged["allowPrivilegeEscalation"] = False
    return _restricted(merged)


def _restricted(context: dict[str, Any]) -> dict[str, Any]:
    """Force what restricted Pod Security requires, whatever a template said."""
    context["runAsNonRoot"] = True
    if context.get("runAsUser") == 0:
        context["runAsUser"] = WORKER_UID
    for profile in ("seccompProfile", "appArmorProfile"):
        if (context.get(profile) or {}).get("type") == "Unconfined":
            context[profile] = {"type": "RuntimeDefault"}
    return context


def topology_spread(pool: str, spec: PoolSpec) -> list[dict[str, Any]]:
    """The template's constraints; one without a labelSelector spreads this pool's pods."""
    return [
        {"labelSelector": {"matchLabels": selector(pool)}, **c}
        for c in spec.pod_template.get("topologySpreadConstraints") or []
    ]


def worker_command(spec: PoolSpec) -> list[str]:
    """Wait for this pod's limit, then run the Prefect worker named after the pod.

    On SIGTERM it drains for the pod's grace period less a margin
    (``drain_seconds_within``), so it stops its last runs itself, before the kubelet's kill.
    With ``spec.gpu.memory`` its slot broker places memory requests on its GPUs:
    ``--gpus`` where the spec fixes them (``perWorker``), ``--gpu-memory`` where
    the spec states each GPU's memory (``auto``: NVML in the pod, else the memory
    limit split over the GPUs). Without it the command is as before. With
    ``spec.worker.metricsPort`` the worker serves its metrics there
    (``--metrics-port``); without it, as before.
    """
    memory = spec.gpu_memory
    return entrypoint_command(
        spec.work_pool,
        flow_runs=spec.flow_runs_per_worker,
        limit_prefix=spec.limit_prefix,
        wait_timeout_s=spec.limit_wait_timeout_s,
        with_healthcheck=True,
        drain_s=drain_seconds_within(spec.drain_grace_period_s),
        gpus=spec.gpus_per_worker if memory is not None else None,
        gpu_memory=memory if memory not in (None, GPU_MEMORY_AUTO) else None,
        metrics_port=spec.metrics_port,
    )


def worker_ports(spec: PoolSpec) -> list[dict[str, Any]]:
    """The worker container's ports: ``health`` (the probes), and ``metrics`` with
    ``spec.worker.metricsPort`` (the worker's ``--metrics-port``, for a PodMonitor
    or a scrape by pod IP). Unset, the list is exactly the one before metrics
    existed, so the pod template of an existing pool does not change (no rollout
    on upgrade).

    Example:
        >>> from pgw_operator.spec import PoolSpec
        >>> spec = PoolSpec.from_dict({"workPool": {"name": "p"}, "prefect": {"apiUrl": "x"},
        ...     "worker": {"image": "i", "metricsPort": 9400}})
        >>> [port["name"] for port in worker_ports(spec)]
        ['health', 'metrics']
    """
    ports = [{"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"}]
    if spec.metrics_port is not None:
        ports.append({"name": "metrics", "containerPort": spec.metrics_port, "protocol": "TCP"})
    return ports


# What a worker gets where its pod template says nothing: enough to schedule
# beside others, and a ceiling so that one runaway worker cannot starve a node.
DEFAULT_RESOURCES = {
    "requests": {"cpu": "250m", "memory": "512Mi"},
    "limits": {"cpu": "4", "memory": "16Gi"},
}


def worker_resources(spec: PoolSpec) -> dict[str, Any]:
    """The template's ``resources``, each of cpu and memory defaulted where unset
    (:data:`DEFAULT_RESOURCES`), and the GPU limit.

    Example:
        >>> from pgw_operator.spec import PoolSpec
        >>> spec = PoolSpec.from_dict({"workPool": {"name": "p"}, "prefect": {"apiUrl": "x"},
        ...     "gpu": {"perWorker": 2}, "worker": {"image": "i", "podTemplate": {
        ...     "resources": {"limits": {"memory": "64Gi"}}}}})
        >>> worker_resources(spec)["limits"]
        {'memory': '64Gi', 'cpu': '4', 'nvidia.com/gpu': '2'}
    """
    resources: dict[str, Any] = {
        k: dict(v) for k, v in (spec.pod_template.get("resources") or {}).items()
    }
    for kind, defaults in DEFAULT_RESOURCES.items():
        for name, value in defaults.items():
            resources.setdefault(kind, {}).setdefault(name, value)
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
    volumes, mounts = worker_volumes(spec)
    container: dict[str, Any] = {
        "name": WORKER_CONTAINER,
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": worker_command(spec),
        "env": worker_env(spec),
        "resources": worker_resources(spec),
        "ports": worker_ports(spec),
        "livenessProbe": {
            "httpGet": {"path": "/health", "port": "health"},
            "initialDelaySeconds": 10,
            "periodSeconds": 30,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            # Ready: polling Prefect for flow runs (the worker's own health check).
            "httpGet": {"path": "/health", "port": "health"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "startupProbe": {
            # The worker waits for its limit before it listens.
            "httpGet": {"path": "/health", "port": "health"},
            "periodSeconds": 5,
            "failureThreshold": max(1, (spec.limit_wait_timeout_s + 60) // 5),
        },
        "securityContext": container_security_context(spec),
        "volumeMounts": mounts,
    }
    if template.get("envFrom"):
        container["envFrom"] = [dict(source) for source in template["envFrom"]]
    if spec.whole_node:
        # Whole-node workers see every GPU of the node without requesting them.
        container["env"].append({"name": "NVIDIA_VISIBLE_DEVICES", "value": "all"})
    pod_spec: dict[str, Any] = {
        "containers": [container],
        "terminationGracePeriodSeconds": spec.drain_grace_period_s,
        "securityContext": pod_security_context(spec),
        "volumes": volumes,
        # The pool's own account (no rights, no token) unless the template names
        # one the admin allows: never the namespace's `default`, which may hold
        # bindings (RBAC, cloud workload identity) meant for something else.
        "serviceAccountName": worker_service_account(pool),
        "automountServiceAccountToken": False,
    }
    for key in ("nodeSelector", "tolerations", "serviceAccountName", "priorityClassName",
                "imagePullSecrets", "runtimeClassName"):  # fmt: skip
        if template.get(key):
            pod_spec[key] = template[key]
    if template.get("topologySpreadConstraints"):
        pod_spec["topologySpreadConstraints"] = topology_spread(pool, spec)
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
            "annotations": dict(SCANNER_NOTES),
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


def disruption_of(pool_spec: Mapping[str, Any]) -> int | str | None:
    """``spec.disruption.maxUnavailable`` (1 by default), None when ``spec.disruption`` is unset."""
    disruption = pool_spec.get("disruption")
    if disruption is None:
        return None
    value = disruption.get("maxUnavailable")
    if value is None:
        value = DEFAULTS["disruption.maxUnavailable"]
    return value if isinstance(value, str) else int(value)


def desired_pdb(
    pool: str, namespace: str, uid: str, max_unavailable: int | str | None
) -> dict[str, Any] | None:
    """The pool's PodDisruptionBudget, or None when ``spec.disruption`` is not set.

    Voluntary evictions (a node drain, the cluster autoscaler) take at most
    ``max_unavailable`` workers (a count or a percentage) at a time. A worker
    that is not Ready is always evictable (``unhealthyPodEvictionPolicy:
    AlwaysAllow``): a crash-looping pod must never block a drain. Scaling the
    pool down is not an eviction and is not limited.

    Example:
        >>> desired_pdb("gpu", "ml", "uid-1", 1)["spec"]["maxUnavailable"]
        1
    """
    if max_unavailable is None:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {
            "name": pool,
            "namespace": namespace,
            "labels": pool_labels(pool),
            "ownerReferences": [owner_reference(pool, uid)],
        },
        "spec": {
            "maxUnavailable": max_unavailable,
            "selector": {"matchLabels": selector(pool)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def disabled_pdb_patch() -> dict[str, Any]:
    """A merge patch that turns a pool's PodDisruptionBudget off once ``spec.disruption`` is unset.

    The operator may create and patch budgets but never delete anything; a
    budget of 100% allows every eviction, and the object goes with its pool (or
    by hand). A merge patch, unlike an apply, never creates a budget that is not there.
    """
    note = "off: spec.disruption is unset; this budget allows every eviction and may be deleted"
    return {
        "metadata": {"annotations": {f"{GROUP}/disruption-budget": note}},
        "spec": {"maxUnavailable": "100%"},
    }


def foreign_controller(owner_references: list[dict[str, Any]], uid: str) -> str | None:
    """Who controls an existing object of the pool's name, if not the pool.

    The operator applies its Deployment, PodDisruptionBudget and workers'
    ServiceAccount under names of the pool's; one made by someone else must not
    be taken over (server-side apply would add the pool as its owner, and the
    pool's deletion would then remove it), only reported.

    Args:
        owner_references: the existing object's ``metadata.ownerReferences``.
        uid: the pool's uid.

    Returns:
        None when the pool is its controller, else a description for the message.

    Example:
        >>> foreign_controller([{"kind": "GpuWorkerPool", "name": "a", "uid": "u",
        ...                      "controller": True}], "u") is None
        True
        >>> foreign_controller([], "u")
        'no controller'
    """
    for ref in owner_references:
        if ref.get("controller"):
            if ref.get("uid") == uid:
                return None
            return f"controller {ref.get('kind')}/{ref.get('name')} (uid {ref.get('uid')})"
    return "no controller"


# The pod name in a ReplicaSet's failure message: a new one at every retry.
_POD_NAME = re.compile(r'pods? "[^"]*" is')


def replica_failure(conditions: list[dict[str, Any]]) -> str | None:
    """Why a Deployment's pods cannot be created (its ``ReplicaFailure`` condition,
    which the Deployment controller copies from the ReplicaSet), pod names left
    out so that the message is the same at every retry; None when they can.

    Example:
        >>> replica_failure([{"type": "ReplicaFailure", "status": "True", "message":
        ...     'pods "w-7d9-x2k" is forbidden: exceeded quota: q, requested: pods=1'}])
        'pods are forbidden: exceeded quota: q, requested: pods=1'
    """
    for condition in conditions:
        if condition.get("type") == "ReplicaFailure" and condition.get("status") == "True":
            message = str(condition.get("message") or "pods cannot be created")
            return _POD_NAME.sub("pods are", message, count=1)[:1000]
    return None
