"""Shared fixtures: one real Prefect server for the whole session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from prefect_gpu_workers.server import LocalPrefectServer


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPrefectServer]:
    """A real ``prefect server start`` on SQLite, shared by the session's tests.

    Tests point both this process (temporary settings) and any subprocess
    (``prefect_server.env()``) at it.
    """
    server = LocalPrefectServer(home=tmp_path_factory.mktemp("prefect-home"))
    with server:
        os.environ.update(server.env())
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
