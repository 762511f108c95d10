"""An upgrade from the release before GpuWorkerLimit objects keeps every limit.

The previous release's operator runs from git (the tree of ``PREVIOUS_RELEASE``,
its own ``pgw_operator`` and core modules first on the path), makes a pool's
limits and keeps them in its ledger in ``status.workers``. Then it stops and
this checkout's operator starts: each pod's limit must stay as it is (not
recreated: a held slot stays held), every moment of the handover, until each
is named by a GpuWorkerLimit and ``status.workers`` is cleared; and the new
operator then scales the pool as usual.
"""

from __future__ import annotations

import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_gpu_workers.server import LocalPrefectServer, free_port

from .cluster import REPO_ROOT, DevCluster
from .operator_harness import (
    OperatorProcess,
    Pools,
    PrefectLimits,
    pool_spec,
    ready_with_limits,
    running_operator,
    start_pool,
    wait_until,
)

# The last commit whose operator kept the ledger in the pool's status (issue 24's end).
PREVIOUS_RELEASE = "fdf570d"


@pytest.fixture(scope="module")
def previous_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's operator and core modules, unpacked from git."""
    root = tmp_path_factory.mktemp("previous-release")
    archive = root / "tree.tar"
    subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", "--format=tar", f"--output={archive}",
         PREVIOUS_RELEASE, "operator", "src"],
        check=True,
    )  # fmt: skip
    with tarfile.open(archive) as tar:
        tar.extractall(root, filter="data")
    return root


class Watchman(threading.Thread):
    """Polls the pool's limits all through the handover; notes any that went missing."""

    def __init__(self, limits: PrefectLimits, names: set[str]) -> None:
        super().__init__(daemon=True)
        self.limits, self.names = limits, names
        self.missing: set[str] = set()
        self.looks = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            present = self.limits.all_names()
            self.missing |= self.names - present
            self.looks += 1
            time.sleep(0.2)


@pytest.fixture
def watchman(limits: PrefectLimits) -> Iterator[list[Watchman]]:
    started: list[Watchman] = []
    yield started
    for watcher in started:
        watcher.running = False


def test_an_upgrade_from_the_status_ledger_keeps_every_limit(
    dev_cluster: DevCluster,
    namespace: str,
    node_group: str,
    pools: Pools,
    limits: PrefectLimits,
    prefect_server: LocalPrefectServer,
    previous_release: Path,
    watchman: list[Watchman],
    tmp_path: Path,
) -> None:
    old = OperatorProcess(
        dev_cluster.kubeconfig, namespace, tmp_path / "previous.log", metrics_port=free_port(),
        pythonpath=(previous_release / "operator", previous_release / "src"),
    ).start()  # fmt: skip
    try:
        spec = pool_spec(prefect_server.api_url, node_group, "gpu8", {"perWorker": 1}, 3)
        found = start_pool(pools, limits, "upgrade", spec)
        status = wait_until(
            lambda: len((s := pools.get("upgrade")["status"]).get("workers") or []) == 3 and s,
            "the previous release's ledger in status.workers",
        )
        assert pools.worker_limits("upgrade") == [], "the previous release wrote objects"
    finally:
        old.stop()
    busy = sorted(found)[0]
    limits.hold_slot(f"gpu:{busy}")
    names = {entry["limitName"] for entry in status["workers"]}
    watcher = Watchman(limits, names)
    watchman.append(watcher)
    watcher.start()

    # Its log tail is printed when it stops (pytest shows it for a failed test).
    with running_operator(dev_cluster, namespace, tmp_path / "new.log") as new:
        wait_until(
            lambda: (
                "workers" not in pools.get("upgrade")["status"]
                and {e["limitName"] for e in pools.limit_entries("upgrade")} == names
            ),
            "every ledger entry in a GpuWorkerLimit and status.workers cleared",
        )
        watcher.running = False
        watcher.join()
        assert watcher.looks > 5
        assert watcher.missing == set(), f"limits gone during the upgrade: {watcher.missing}"
        held = limits.get(f"gpu:{busy}")
        assert held is not None
        assert held["active_slots"] == 1, "the busy worker's limit was recreated"
        assert {o["metadata"]["ownerReferences"][0]["name"] for o in
                pools.worker_limits("upgrade")} == set(found)  # fmt: skip

        # The new operator carries on: a scale-down removes exactly the removed pods'.
        pools.scale("upgrade", 1)
        (kept,) = wait_until(lambda: ready_with_limits(pools, limits, "upgrade", 1), "1 limit")
        wait_until(
            lambda: (
                all(limits.get(f"gpu:{p}") is None for p in set(found) - {kept})
                and len(pools.worker_limits("upgrade")) == 1
            ),
            "the removed pods' limits and objects gone",
        )
        new.assert_alive()
