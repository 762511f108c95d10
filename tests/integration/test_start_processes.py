"""The service's process bookkeeping on real processes: owner tokens, orphans, name locks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_gpu_workers.procfs import owner_alive, owner_token
from prefect_gpu_workers.service.plan import SERVICE_WORKER_ENV
from prefect_gpu_workers.service.processes import (
    OWNER_ENV,
    NameLock,
    NameLocked,
    marked_pids,
    orphaned_pids,
    stop_pids,
)


@pytest.fixture
def dead_owner() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    token = owner_token(proc.pid)
    proc.wait()
    return token


@pytest.fixture
def marked(
    dead_owner: str,
) -> Iterator[tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Two processes marked with one worker name: one of a live service (this
    process), one whose service is dead."""
    name = f"w-{uuid.uuid4().hex[:8]}"
    base = {**os.environ, SERVICE_WORKER_ENV: name}
    ours = subprocess.Popen(["sleep", "300"], env={**base, OWNER_ENV: owner_token()})
    orphan = subprocess.Popen(["sleep", "300"], env={**base, OWNER_ENV: dead_owner})
    # Popen returns when exec has begun; the environment shows a moment later.
    expected = sorted([ours.pid, orphan.pid])
    deadline = time.monotonic() + 10
    while marked_pids(name) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    yield name, ours, orphan
    for proc in (ours, orphan):
        proc.kill()
        proc.wait()


def test_owner_token_tells_a_live_process_from_a_dead_one(dead_owner: str) -> None:
    assert owner_alive(owner_token())
    assert not owner_alive(dead_owner)
    assert not owner_alive("not-a-token")


def test_only_processes_of_a_dead_service_are_orphans(
    marked: tuple[str, subprocess.Popen[bytes], subprocess.Popen[bytes]],
) -> None:
    name, ours, orphan = marked
    assert marked_pids(name) == sorted([ours.pid, orphan.pid])
    assert marked_pids(name, owner_token()) == [ours.pid]
    assert orphaned_pids(name) == [orphan.pid]
    assert stop_pids(lambda: orphaned_pids(name), grace_s=10) == [orphan.pid]
    assert orphan.wait(10) == -15  # SIGTERM was enough
    assert ours.poll() is None


def test_a_name_lock_is_exclusive_and_says_who_holds_it(tmp_path: Path) -> None:
    lock = NameLock(tmp_path / "box.lock")
    lock.acquire()
    # flock locks belong to the open file, so a second open in this process conflicts too.
    with pytest.raises(NameLocked, match=rf"\(pid {os.getpid()}\) runs worker 'box'"):
        NameLock(tmp_path / "box.lock").acquire()
    lock.release()
    again = NameLock(tmp_path / "box.lock")
    again.acquire()
    again.release()
