"""GitOps files: the Argo CD health check (run in real Lua) and the Application example.

The statuses fed to the health check come from the operator's own
``status_body``, so the check is tested against what the operator writes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import REPO_ROOT

from pgw_operator.conditions import PoolHealth
from pgw_operator.plan import LedgerEntry
from pgw_operator.status import status_body

from .conftest import CHART, Helm
from builders import pool_manifest, pool_spec_dict

ARGOCD = REPO_ROOT / "deploy" / "argocd"
HEALTH_LUA = (ARGOCD / "health-gpuworkerpool.lua").read_text()
HEALTH_KEY = "resource.customizations.health.gpuworkers.dev_GpuWorkerPool"

SPEC: dict[str, Any] = pool_spec_dict(replicas=2)


def pool_object(
    health: PoolHealth | None, *, generation: int = 3, observed: int | None = None
) -> dict[str, Any]:
    """A GpuWorkerPool as Argo CD sees it, its status written by the operator's code."""
    obj = pool_manifest("pool", SPEC, namespace="ml", generation=generation)
    if health is not None:
        ledger = {
            f"gpu:pool-{i}": LedgerEntry(f"gpu:pool-{i}", f"pool-{i}", "gpu-8", 1, "1", 0, "Ready")
            for i in range(health.ready_workers)
        }
        obj["status"] = status_body("pool", observed or generation, {}, ledger, health)
    return obj


def run_health(obj: dict[str, Any], lua_module: str = "lupa.lua51") -> tuple[str, str]:
    """Run the check the way Argo CD does: ``obj`` global, the script returns ``hs``."""
    lupa = importlib.import_module(lua_module)
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    hs = lua.execute(HEALTH_LUA)
    return str(hs["status"]), str(hs["message"])


CONVERGED = PoolHealth(desired_replicas=2, pods=2, ready_workers=2, pending_limits=0)
SCALING = PoolHealth(desired_replicas=3, pods=3, ready_workers=2, pending_limits=1)
UNREACHABLE = PoolHealth(
    desired_replicas=2,
    pods=2,
    ready_workers=2,
    pending_limits=0,
    error_reason="PrefectUnreachable",
    error_message="Prefect API http://prefect:4200/api down",
)
SIZING = PoolHealth(
    desired_replicas=1,
    pods=1,
    ready_workers=0,
    pending_limits=0,
    problems=("pod pool-0 on node cpu has no nvidia.com/gpu",),
)
SCALED_TO_ZERO = PoolHealth(desired_replicas=0, pods=0, ready_workers=0, pending_limits=0)


# gopher-lua (Argo CD) is Lua 5.1; 5.4 guards against version-specific code.
@pytest.mark.parametrize("lua_module", ["lupa.lua51", "lupa.lua54"])
@pytest.mark.parametrize(
    ("obj", "status", "message_part"),
    [
        (pool_object(None), "Progressing", "Waiting for the operator"),
        (pool_object(CONVERGED), "Healthy", "2/2 workers ready"),
        (pool_object(SCALING), "Progressing", "2/3 workers ready"),
        (pool_object(UNREACHABLE), "Degraded", "PrefectUnreachable: Prefect API"),
        (pool_object(SIZING), "Degraded", "LimitSizing: pod pool-0 on node cpu"),
        (pool_object(SCALED_TO_ZERO), "Healthy", "0/0 workers ready"),
        # The spec changed after the last status: whatever it said is stale.
        (pool_object(CONVERGED, generation=4, observed=3), "Progressing", "generation 4"),
        (pool_object(UNREACHABLE, generation=4, observed=3), "Progressing", "generation 4"),
    ],
    ids=[
        "no-status",
        "ready",
        "scaling",
        "prefect-down",
        "sizing-problem",
        "scaled-to-zero",
        "stale-ready",
        "stale-degraded",
    ],
)
def test_health_check_maps_operator_status(
    obj: dict[str, Any], status: str, message_part: str, lua_module: str
) -> None:
    got_status, message = run_health(obj, lua_module)
    assert got_status == status, message
    assert message_part in message


def test_health_check_handles_partial_statuses() -> None:
    obj = pool_object(None)
    obj["status"] = {"observedGeneration": 3}  # written before any condition
    assert run_health(obj)[0] == "Progressing"
    obj["status"]["conditions"] = [{"type": "Ready", "status": "True"}]
    assert run_health(obj) == ("Healthy", "Ready")
    del obj["metadata"]["generation"]
    assert run_health(obj)[0] == "Healthy"


def application() -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((ARGOCD / "application.yaml").read_text()) if d]
    assert len(docs) == 1
    app: dict[str, Any] = docs[0]
    return app


def test_application_installs_this_chart_with_values_the_chart_accepts(
    helm: Helm, tmp_path: Path
) -> None:
    app = application()
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    source = app["spec"]["source"]
    assert REPO_ROOT / source["path"] == CHART
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    for sample in (False, True):
        extra = ["--set", "samplePool.enabled=true"] if sample else []
        proc = helm(
            "lint",
            "--strict",
            str(CHART),
            "--values",
            str(values_file),
            *extra,
            "--namespace",
            app["spec"]["destination"]["namespace"],
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_application_syncs_crds_first_and_ignores_scaled_replicas() -> None:
    spec = application()["spec"]
    assert {
        "group": "gpuworkers.dev",
        "kind": "GpuWorkerPool",
        "jsonPointers": ["/spec/replicas"],
    } in spec["ignoreDifferences"]
    # Without it a sync would still write Git's replicas over the HPA's.
    assert "RespectIgnoreDifferences=true" in spec["syncPolicy"]["syncOptions"]
    annotations = spec["source"]["helm"]["valuesObject"]["samplePool"]["annotations"]
    # CRDs sit in wave 0; the pool comes after them and skips the dry run
    # that fails while its CRD does not exist yet.
    assert int(annotations["argocd.argoproj.io/sync-wave"]) > 0
    assert "SkipDryRunOnMissingResource=true" in annotations["argocd.argoproj.io/sync-options"]


def test_argocd_readme_explains_registration_waves_and_tracking() -> None:
    text = (ARGOCD / "README.md").read_text()
    for needle in (
        HEALTH_KEY,
        "health-gpuworkerpool.lua",
        "sync-wave",
        "ignoreDifferences",
        "/spec/replicas",
        "RespectIgnoreDifferences",
        "tracking",
    ):
        assert needle in text, needle
