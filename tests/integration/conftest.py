"""Fixtures for the integration tests (real Prefect server; helpers in broker_harness)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from integration.broker_harness import HolderProcess


@pytest.fixture
def holders() -> Iterator[list[HolderProcess]]:
    """Holder processes a test starts; every one is gone after the test."""
    started: list[HolderProcess] = []
    yield started
    for holder in started:
        holder.stop()
