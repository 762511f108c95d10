"""Thin adapter to the Kubernetes API for what kopf does not do itself.

Blocking client calls; the reconciler runs them in a thread. Every failure
leaves this module as a :class:`KubernetesError` (see :func:`as_kubernetes_error`),
so no other module needs the kubernetes client's exception types.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any, TypeVar

import kubernetes
import urllib3

from pgw_operator import metrics
from pgw_operator.desired import replica_failure
from pgw_operator.errors import KubernetesError
from pgw_operator.spec import FIELD_MANAGER, GROUP, PLURAL, POOL_LABEL, VERSION
from pgw_operator.worker_limits import LIMIT_PLURAL

T = TypeVar("T")


def _api_message(body: Any) -> str:
    """The API server's own message from a Status body (not the whole JSON)."""
    try:
        message = json.loads(body).get("message")
    except (TypeError, ValueError, AttributeError):
        return ""
    return str(message) if message else ""


def as_kubernetes_error(
    exc: Exception, what: str, rejected: str = "KubernetesApiError"
) -> KubernetesError | None:
    """The operator's error for a failed Kubernetes call, or None if ``exc`` is not one.

    Args:
        exc: what the kubernetes client raised.
        what: the call, for the message (e.g. "apply Deployment ns/pool").
        rejected: reason for a 4xx other than 403 (e.g. ``DeploymentRejected``).
    """
    if isinstance(exc, kubernetes.client.ApiException):
        status = int(exc.status or 0)
        # A denied call has its own reason, so RBAC gaps are visible in
        # conditions, events, logs and pgw_reconcile_errors_total alike.
        if status == 403:
            reason = "KubernetesForbidden"
        elif 400 <= status < 500 and status != 429:
            reason = rejected
        else:
            reason = "KubernetesApiError"
        detail = _api_message(exc.body)
        message = f"{what}: HTTP {status} {exc.reason}" + (f": {detail}" if detail else "")
        return KubernetesError(reason, message, status)
    if isinstance(exc, urllib3.exceptions.HTTPError):
        return KubernetesError("KubernetesApiUnreachable", f"{what}: {exc}")
    return None


def _call(
    what: str, call: Callable[[], T], rejected: str = "KubernetesApiError", verb: str = "other"
) -> T:
    metrics.KUBERNETES_REQUESTS.labels(verb).inc()
    try:
        return call()
    except (kubernetes.client.ApiException, urllib3.exceptions.HTTPError) as exc:
        error = as_kubernetes_error(exc, what, rejected)
        assert error is not None
        raise error from exc


def load_config() -> None:
    """In-cluster config inside a pod, else the current kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]
    _CLIENT.clear()


# Threads that run blocking calls at once (the reconciler's, kopf's sync handlers'):
# the connections kept open to the API server.
CONNECTIONS = 32
_CLIENT: list[kubernetes.client.ApiClient] = []


def _client() -> kubernetes.client.ApiClient:
    """One API client for every call: an API class built without one makes its own
    connection pool, a new TLS connection per call."""
    if not _CLIENT:
        configuration = kubernetes.client.Configuration.get_default_copy()
        configuration.connection_pool_maxsize = CONNECTIONS
        _CLIENT.append(kubernetes.client.ApiClient(configuration))
    return _CLIENT[0]


def _server_side_apply(
    kind: str, patch: Callable[..., Any], manifest: dict[str, Any], rejected: str
) -> Any:
    """Server-side apply ``manifest`` through ``patch`` (a namespaced patch call) as this
    operator's field manager: fields it owns are corrected, others left alone."""
    meta = manifest["metadata"]
    return _call(
        f"{kind} {meta['namespace']}/{meta['name']}",
        lambda: patch(
            name=meta["name"],
            namespace=meta["namespace"],
            body=manifest,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
        ),
        rejected=rejected,
        verb="apply",
    )


def owner_references(kind: str, namespace: str, name: str) -> list[dict[str, Any]] | None:
    """``metadata.ownerReferences`` of the pool's Deployment, PodDisruptionBudget or
    ServiceAccount as plain dicts, or None when there is no object of that name.

    Raises:
        KubernetesError: any failure but 404.
    """
    read = {
        "Deployment": lambda: kubernetes.client.AppsV1Api(_client()).read_namespaced_deployment(
            name, namespace
        ),
        "PodDisruptionBudget": lambda: kubernetes.client.PolicyV1Api(
            _client()
        ).read_namespaced_pod_disruption_budget(name, namespace),
        "ServiceAccount": lambda: kubernetes.client.CoreV1Api(
            _client()
        ).read_namespaced_service_account(name, namespace),
    }[kind]
    try:
        found: Any = _call(f"{kind} {namespace}/{name}", read, verb="get")
    except KubernetesError as exc:
        if exc.status == 404:
            return None
        raise
    return [
        {"kind": ref.kind, "name": ref.name, "uid": ref.uid, "controller": ref.controller}
        for ref in found.metadata.owner_references or []
    ]


def apply_service_account(manifest: dict[str, Any]) -> None:
    """Server-side apply the pool's workers' ServiceAccount.

    Raises:
        KubernetesError: ``ServiceAccountRejected`` when the API server refuses it.
    """
    patch = kubernetes.client.CoreV1Api(_client()).patch_namespaced_service_account
    _server_side_apply("ServiceAccount", patch, manifest, "ServiceAccountRejected")


def apply_deployment(manifest: dict[str, Any]) -> str | None:
    """Server-side apply a worker Deployment.

    Returns:
        Why its pods cannot be created, if they cannot (its ``ReplicaFailure``
        condition: Pod Security, a quota...), else None.

    Raises:
        KubernetesError: ``DeploymentRejected`` when the API server refuses the manifest.
    """
    patch = kubernetes.client.AppsV1Api(_client()).patch_namespaced_deployment
    applied = _server_side_apply("worker Deployment", patch, manifest, "DeploymentRejected")
    conditions = (applied.status.conditions or []) if applied and applied.status else []
    return replica_failure(
        [{"type": c.type, "status": c.status, "message": c.message} for c in conditions]
    )


def patch_pool_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    _call(
        f"status of pool {namespace}/{name}",
        lambda: kubernetes.client.CustomObjectsApi(_client()).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, {"status": status}
        ),
        verb="patch",
    )


def read_secret_value(namespace: str, name: str, key: str) -> str:
    """Raises KubernetesError (reason ``ApiKeySecretUnavailable`` for a missing Secret or key)."""
    what = f"secret {namespace}/{name}"
    secret = _call(
        what,
        lambda: kubernetes.client.CoreV1Api(_client()).read_namespaced_secret(name, namespace),
        rejected="ApiKeySecretUnavailable",
        verb="get",
    )
    data = (secret.data or {}).get(key)
    if data is None:
        raise KubernetesError("ApiKeySecretUnavailable", f"{what} has no key {key!r}")
    return base64.b64decode(data).decode()


def annotate_pod(namespace: str, name: str, annotations: dict[str, str]) -> None:
    _call(
        f"pod {namespace}/{name}",
        lambda: kubernetes.client.CoreV1Api(_client()).patch_namespaced_pod(
            name, namespace, {"metadata": {"annotations": annotations}}
        ),
        verb="patch",
    )


def scale_pool(namespace: str, name: str, replicas: int) -> None:
    """Set a pool's replicas through its scale subresource, as an HPA would.

    Raises:
        KubernetesError: ``ScaleRejected`` when the API server refuses the patch.
    """
    _call(
        f"scale of pool {namespace}/{name}",
        lambda: kubernetes.client.CustomObjectsApi(_client()).patch_namespaced_custom_object_scale(
            GROUP, VERSION, namespace, PLURAL, name, {"spec": {"replicas": replicas}}
        ),
        rejected="ScaleRejected",
        verb="patch",
    )


def apply_pdb(manifest: dict[str, Any]) -> None:
    """Server-side apply a PodDisruptionBudget.

    Raises:
        KubernetesError: ``DisruptionBudgetRejected`` when the API server refuses it.
    """
    patch = kubernetes.client.PolicyV1Api(_client()).patch_namespaced_pod_disruption_budget
    _server_side_apply("PodDisruptionBudget", patch, manifest, "DisruptionBudgetRejected")


def patch_pdb_if_present(namespace: str, name: str, patch: dict[str, Any]) -> bool:
    """Merge-patch a PodDisruptionBudget; False when there is none (a patch creates nothing).

    Raises:
        KubernetesError: any failure but 404.
    """
    try:
        _call(
            f"PodDisruptionBudget {namespace}/{name}",
            lambda: kubernetes.client.PolicyV1Api(_client()).patch_namespaced_pod_disruption_budget(
                name, namespace, patch, field_manager=FIELD_MANAGER
            ),
            rejected="DisruptionBudgetRejected",
            verb="patch",
        )
    except KubernetesError as exc:
        if exc.status == 404:
            return False
        raise
    return True


# GpuWorkerLimit objects ---------------------------------------------------------------


def _limits_api() -> Any:
    return kubernetes.client.CustomObjectsApi(_client())


def create_worker_limit(manifest: dict[str, Any]) -> None:
    """Create a pod's GpuWorkerLimit (the write ahead of its Prefect limits).

    Raises:
        KubernetesError: ``WorkerLimitRejected`` (409 when one of its name exists).
    """
    meta = manifest["metadata"]
    _call(
        f"GpuWorkerLimit {meta['namespace']}/{meta['name']}",
        lambda: _limits_api().create_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], LIMIT_PLURAL, manifest,
            field_manager=FIELD_MANAGER,
        ),
        rejected="WorkerLimitRejected",
        verb="create",
    )  # fmt: skip


def patch_worker_limit(namespace: str, name: str, spec: dict[str, Any]) -> None:
    """Replace a GpuWorkerLimit's spec (merge patch; ``limits`` is replaced whole)."""
    _call(
        f"GpuWorkerLimit {namespace}/{name}",
        lambda: _limits_api().patch_namespaced_custom_object(
            GROUP, VERSION, namespace, LIMIT_PLURAL, name, {"spec": spec},
            field_manager=FIELD_MANAGER,
        ),
        rejected="WorkerLimitRejected",
        verb="patch",
    )  # fmt: skip


def list_worker_limits(namespace: str, pool: str) -> list[dict[str, Any]]:
    """The pool's GpuWorkerLimit objects as the API server has them now (not a cache)."""
    listed = _call(
        f"GpuWorkerLimits of pool {namespace}/{pool}",
        lambda: _limits_api().list_namespaced_custom_object(
            GROUP, VERSION, namespace, LIMIT_PLURAL, label_selector=f"{POOL_LABEL}={pool}"
        ),
        verb="list",
    )
    return list(listed.get("items") or [])


def release_worker_limit(namespace: str, name: str, deleting: bool = False) -> None:
    """Let a GpuWorkerLimit go once its limits are gone: its finalizer off, then delete
    it unless it is ``deleting`` already (then the patch lets it go). Gone already is
    fine: the garbage collector may have deleted it with its pod."""
    what = f"GpuWorkerLimit {namespace}/{name}"
    try:
        _call(
            what,
            lambda: _limits_api().patch_namespaced_custom_object(
                GROUP, VERSION, namespace, LIMIT_PLURAL, name,
                {"metadata": {"finalizers": None}},
            ),
            verb="patch",
        )  # fmt: skip
        if deleting:
            return
        _call(
            what,
            lambda: _limits_api().delete_namespaced_custom_object(
                GROUP, VERSION, namespace, LIMIT_PLURAL, name
            ),
            verb="delete",
        )
    except KubernetesError as exc:
        if exc.status != 404:
            raise
