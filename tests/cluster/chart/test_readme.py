"""The docs' "Try it on the dev control plane" block, run as written against the dev cluster.

The block lives in docs/kubernetes/try-it.md (it moved there from README.md).

Only the two names at its top are replaced (unique ones, as other test runs
share the cluster); everything else runs verbatim in bash, from the
repository root, with a real Prefect server behind ``PREFECT_API_URL``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from k8s.cluster import REPO_ROOT, DevCluster
from k8s.operator_harness import PrefectLimits, denied_api_calls

from prefect_gpu_workers.server import LocalPrefectServer

from .conftest import Helm

pytestmark = pytest.mark.cluster

MARKER = "<!-- dev-cluster walkthrough"
WALKTHROUGH_PAGE = REPO_ROOT / "docs" / "kubernetes" / "try-it.md"


def walkthrough() -> str:
    """The fenced bash block right after the walkthrough marker in the docs page."""
    text = WALKTHROUGH_PAGE.read_text()
    start = text.index(MARKER)
    match = re.compile(r"```bash\n(.*?)\n```", re.S).search(text, start)
    assert match, "no bash block after the walkthrough marker"
    return match.group(1)


def test_docs_dev_cluster_walkthrough_runs_as_written(
    dev_cluster: DevCluster,
    cluster_helm: Helm,
    prefect_server: LocalPrefectServer,
    tmp_path: Path,
) -> None:
    suffix = uuid.uuid4().hex[:6]
    # The release name keeps the chart's name, so its objects are named after it.
    release, ns = f"prefect-gpu-workers-{suffix}", f"gpu-demo-{suffix}"
    script, renamed = re.subn(r"^RELEASE=\S+", f"RELEASE={release}", walkthrough(), flags=re.M)
    script, renamed_ns = re.subn(r"^NS=\S+", f"NS={ns}", script, flags=re.M)
    assert (renamed, renamed_ns) == (1, 1), "the block must start by naming RELEASE and NS"

    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    env |= prefect_server.env() | {"TMPDIR": str(tmp_path), "COLUMNS": "250"}
    operator_log = tmp_path / "pgw-operator.log"
    proc = subprocess.Popen(
        ["bash", "-euxo", "pipefail", "-c", script],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        # Whatever the script left running (the operator after a failed step).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        for pool in dev_cluster.kubectl(
            "get", "gwp", "-n", ns, "-o", "name", check=False
        ).stdout.split():
            dev_cluster.kubectl(
                "patch",
                pool,
                "-n",
                ns,
                "--type=merge",
                "-p",
                '{"metadata":{"finalizers":null}}',
                check=False,
            )
        cluster_helm("uninstall", release, "-n", release, "--ignore-not-found", check=False)
        dev_cluster.kubectl(
            "delete", "namespace", ns, release, "--ignore-not-found", "--wait=false"
        )

    log = operator_log.read_text(errors="replace") if operator_log.exists() else ""
    assert proc.returncode == 0, f"{output}\n--- operator log:\n{log[-4000:]}"
    assert f'release "{release}" uninstalled' in output
    assert "gpuworkerpool.gpuworkers.dev/gpu-workers condition met" in output
    # kubectl get gwp: NAME DESIRED READY SLOTS STATUS, before and after the scale.
    assert re.search(r"^gpu-workers\s+2\s+2\s+2\s+Ready\s", output, re.M), output
    assert "gpuworkerpool.gpuworkers.dev/gpu-workers scaled" in output
    assert re.search(
        r"^gpuworkerpool\.gpuworkers\.dev/gpu-workers\s+3\s+3\s+3\s+Ready\s", output, re.M
    ), output
    assert re.search(r"^deployment\.apps/gpu-workers\s+3/3\s", output, re.M), output
    limits = set(re.findall(r"gpu:gpu-workers-[a-z0-9]+-[a-z0-9]+", output))
    assert len(limits) >= 3, output
    # The operator, as the chart's ServiceAccount, was never refused, and it
    # deleted every limit with the pool.
    assert not denied_api_calls(log), "\n".join(denied_api_calls(log))
    assert not [name for name in limits if PrefectLimits(prefect_server.api_url).get(name)]
