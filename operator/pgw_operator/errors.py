"""Errors a reconcile reports as a status condition and an event instead of crashing.

Their messages reach status and Events, which the pool's owner reads: they say
what the operator did and how it failed, never what a remote service answered.
"""

from __future__ import annotations


class ReconcileError(Exception):
    """A reconcile pass could not finish; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PrefectError(ReconcileError):
    """Prefect could not be used (unreachable, refusing, rejecting)."""


class KubernetesError(ReconcileError):
    """A Kubernetes API call failed; ``status`` is its HTTP status (None: unreachable).

    Reasons: ``KubernetesForbidden`` (403), ``KubernetesApiUnreachable`` (transport),
    ``KubernetesApiError`` (anything else), unless the call names its own.
    """

    def __init__(self, reason: str, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(reason, message)
