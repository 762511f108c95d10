"""Errors a reconcile reports as a status condition and an event instead of crashing."""

from __future__ import annotations


class ReconcileError(Exception):
    """A reconcile pass could not finish; ``reason`` is a CamelCase condition reason."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class PrefectError(ReconcileError):
    """Prefect could not be used (unreachable, refusing, rejecting)."""
