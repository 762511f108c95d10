"""Fixtures for the chart tests: the pinned helm, rendering helpers, the dev cluster.

``dev_cluster`` is the session fixture of tests/cluster/k8s (``hack/dev-cluster``),
re-exported here so the chart's cluster tests share the one control plane.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import BUILD_TOOLS, REPO_ROOT, DevCluster, run
from k8s.conftest import (  # noqa: F401  (the shared fixtures)
    dev_cluster,
    node_prefect_server,
    project_images,
    real_node,
)

CHART = REPO_ROOT / "charts" / "prefect-gpu-workers"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Helm:
    """The pinned helm binary, optionally bound to a kubeconfig."""

    binary: Path
    kubeconfig: Path | None = None

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.binary), *args]
        if self.kubeconfig is not None:
            cmd.append(f"--kubeconfig={self.kubeconfig}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def render(
        self,
        values: Mapping[str, Any] | None = None,
        *,
        release: str = "pgw",
        namespace: str = "pgw-system",
        include_crds: bool = False,
        tmp_dir: Path,
    ) -> str:
        """``helm template`` with ``values`` (written to a file), as text.

        Values that name no API URL policy get ``prefect.allowAnyApiUrl`` (the
        chart renders nothing without one): see :func:`with_api_url_policy`.
        """
        args = ["template", release, str(CHART), "--namespace", namespace]
        if include_crds:
            args.append("--include-crds")
        values = with_api_url_policy(values or {})
        if values:
            values_file = tmp_dir / f"values-{abs(hash(json.dumps(values, sort_keys=True)))}.json"
            values_file.write_text(json.dumps(values))
            args += ["--values", str(values_file)]
        return self(*args).stdout

    def render_error(self, values: Mapping[str, Any], *, tmp_dir: Path, policy: bool = True) -> str:
        """Render values that must fail; return helm's error output.

        ``policy=False`` leaves out the API URL policy :meth:`render` adds."""
        values_file = tmp_dir / "bad-values.json"
        values_file.write_text(json.dumps(with_api_url_policy(values) if policy else values))
        proc = self("template", "pgw", str(CHART), "--values", str(values_file), check=False)
        assert proc.returncode != 0, f"helm accepted values it should reject: {values}"
        return proc.stderr


ANY_API_URL = "prefect.allowAnyApiUrl=true"  # for ``helm install --set``


def with_api_url_policy(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with ``prefect.allowAnyApiUrl: true`` unless they set an allowlist
    or the flag themselves: the chart refuses to render with neither, and most
    tests are about something else."""
    prefect = dict(values.get("prefect") or {})
    if prefect.get("allowedApiUrls") or "allowAnyApiUrl" in prefect:
        return dict(values)
    return {**values, "prefect": {**prefect, "allowAnyApiUrl": True}}


def parse_manifests(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def by_kind(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Sequence[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = [m for m in by_kind(manifests, kind) if name is None or m["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def tool_bin(*tools: str) -> Path:
    """Folder of the pinned tools (hack/build-tools builds them once, cached)."""
    proc = run([BUILD_TOOLS, *tools], timeout=3600)
    if proc.returncode != 0:
        pytest.fail(f"hack/build-tools {' '.join(tools)} failed:\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def helm() -> Helm:
    """helm without a cluster (template, lint)."""
    return Helm(tool_bin("helm") / "helm")


@pytest.fixture(scope="session")
def cluster_helm(helm: Helm, dev_cluster: DevCluster) -> Helm:  # noqa: F811
    """helm bound to the dev cluster's admin kubeconfig."""
    return Helm(helm.binary, dev_cluster.kubeconfig)
