"""Shared fixtures, and the test tiers by folder.

Tiers: ``tests/unit`` (pure: no server, nothing built), ``tests/integration``
(a real Prefect server), ``tests/cluster`` (the dev control plane and its
tools). Every test is marked with its tier, so ``-m unit`` selects like the
folder does. This file keeps Prefect out of its imports: the unit tier does
not pay for it unless a test needs it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from prefect_gpu_workers.server import LocalPrefectServer

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the tier its folder names."""
    for item in items:
        parts = item.path.relative_to(TESTS).parts if TESTS in item.path.parents else ()
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefectServer]:
    """A real ``prefect server start`` on the embedded PostgreSQL, shared by the session's tests.

    PostgreSQL, as production servers run: on SQLite, a dozen flow runs at once
    on two busy cores locked the database for minutes ("database is locked").

    Tests point both this process (temporary settings) and any subprocess
    (``prefect_server.env()``) at it.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect_gpu_workers.server import LocalPrefectServer

    server = LocalPrefectServer(home=tmp_path_factory.mktemp("prefect-home"), database="postgres")
    # A first start migrates a fresh database: minutes on a loaded 2-core machine.
    server.start(timeout_s=300)
    try:
        os.environ.update(server.env())
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
    finally:
        server.stop()


@pytest.fixture
def repo_root() -> Path:
    return TESTS.parent
