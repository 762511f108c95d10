"""hack/sync-crds keeps the chart's CRD copy identical to crds/; --check only reports."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_CRDS = Path("charts/prefect-gpu-workers/crds")


def sync(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(root / "hack" / "sync-crds"), *args], capture_output=True, text=True, check=False
    )


def test_the_repository_chart_crds_are_in_sync() -> None:
    result = sync(REPO_ROOT, "--check")
    assert result.returncode == 0, result.stderr


def test_check_names_drift_and_sync_repairs_it(tmp_path: Path) -> None:
    (tmp_path / "hack").mkdir()
    shutil.copy(REPO_ROOT / "hack" / "sync-crds", tmp_path / "hack" / "sync-crds")
    shutil.copytree(REPO_ROOT / "crds", tmp_path / "crds")
    shutil.copytree(REPO_ROOT / CHART_CRDS, tmp_path / CHART_CRDS)
    crd = tmp_path / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"
    crd.write_text(crd.read_text() + "# edited\n")
    (tmp_path / CHART_CRDS / "stale.yaml").write_text("{}\n")

    check = sync(tmp_path, "--check")
    assert check.returncode == 1
    assert crd.name in check.stderr
    assert "stale.yaml" in check.stderr
    assert (tmp_path / CHART_CRDS / "stale.yaml").exists(), "--check changed files"

    assert sync(tmp_path).returncode == 0
    assert (tmp_path / CHART_CRDS / crd.name).read_text() == crd.read_text()
    assert not (tmp_path / CHART_CRDS / "stale.yaml").exists()
    assert sync(tmp_path, "--check").returncode == 0
