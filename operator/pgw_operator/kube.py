"""Thin adapter to the Kubernetes API for what kopf does not do itself.

Blocking client calls; the reconciler runs them in a thread.
"""

from __future__ import annotations

import base64
from typing import Any

import kubernetes

from pgw_operator.spec import FIELD_MANAGER, GROUP, PLURAL, VERSION


def load_config() -> None:
    """In-cluster config inside a pod, else the current kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()  # type: ignore[no-untyped-call]
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()  # type: ignore[no-untyped-call]


def apply_deployment(manifest: dict[str, Any]) -> None:
    """Server-side apply: fields this operator owns are corrected, others left alone."""
    meta = manifest["metadata"]
    kubernetes.client.AppsV1Api().patch_namespaced_deployment(
        name=meta["name"],
        namespace=meta["namespace"],
        body=manifest,
        field_manager=FIELD_MANAGER,
        force=True,
        _content_type="application/apply-patch+yaml",
    )


def patch_pool_status(namespace: str, name: str, status: dict[str, Any]) -> None:
    kubernetes.client.CustomObjectsApi().patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, name, {"status": status}
    )


def read_secret_value(namespace: str, name: str, key: str) -> str:
    secret = kubernetes.client.CoreV1Api().read_namespaced_secret(name, namespace)
    data = (secret.data or {}).get(key)
    if data is None:
        raise KeyError(f"secret {namespace}/{name} has no key {key!r}")
    return base64.b64decode(data).decode()


def annotate_pod(namespace: str, name: str, annotations: dict[str, str]) -> None:
    kubernetes.client.CoreV1Api().patch_namespaced_pod(
        name, namespace, {"metadata": {"annotations": annotations}}
    )
