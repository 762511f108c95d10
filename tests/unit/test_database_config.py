"""Pure parts of the embedded PostgreSQL: URL, socket path limit, where the binaries come from."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from prefect_gpu_workers.database import (
    POSTGRES_BIN_DIR_ENV,
    SOCKET_FILE,
    UNIX_SOCKET_PATH_MAX,
    EmbeddedPostgresUnavailable,
    connection_url,
    find_bin_dir,
    server_user,
    socket_fits,
)


def test_connection_url_names_the_socket_directory_as_host() -> None:
    assert (
        connection_url(Path("/work/run"))
        == "postgresql+asyncpg://postgres@/postgres?host=/work/run"
    )


def test_socket_fits_up_to_the_unix_socket_path_limit() -> None:
    room = UNIX_SOCKET_PATH_MAX - len(f"/{SOCKET_FILE}")
    assert socket_fits(Path("/" + "a" * (room - 1)))
    assert not socket_fits(Path("/" + "a" * room))


def test_a_bin_dir_override_without_the_executables_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(POSTGRES_BIN_DIR_ENV, str(tmp_path))
    (tmp_path / "initdb").write_text("#!/bin/sh\n")  # not executable
    with pytest.raises(EmbeddedPostgresUnavailable, match=r"no executable .*initdb"):
        find_bin_dir()


def test_a_bin_dir_override_with_the_executables_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("initdb", "postgres"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(POSTGRES_BIN_DIR_ENV, str(tmp_path))
    assert find_bin_dir() == tmp_path


def test_postgres_never_runs_as_root() -> None:
    user = server_user()
    if os.geteuid() == 0:
        assert user.name == "nobody"
        assert user.uid not in (None, 0)
    else:
        assert user.uid is None  # this process's own user
