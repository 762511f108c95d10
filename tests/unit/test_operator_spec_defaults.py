"""Spec defaults have one source (pgw_operator.spec.DEFAULTS); the CRD must state the same."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from pgw_operator.spec import DEFAULTS, PoolSpec

CRD = Path(__file__).resolve().parents[2] / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"


def crd_defaults(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    """(path under spec, default) for every `default:` in an OpenAPI schema."""
    if "default" in schema:
        yield path, schema["default"]
    for name, child in (schema.get("properties") or {}).items():
        yield from crd_defaults(child, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from crd_defaults(schema["items"], f"{path}[]")


def test_the_crd_defaults_are_exactly_the_operators() -> None:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    spec_schema = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert dict(crd_defaults(spec_schema)) == DEFAULTS


def test_a_minimal_spec_gets_every_default() -> None:
    spec = PoolSpec.from_dict(
        {
            "workPool": {"name": "p"},
            "prefect": {"apiUrl": "http://prefect/api", "apiKeySecretRef": {"name": "s"}},
            "gpu": {"perWorker": 1},
            "worker": {"image": "i"},
        }
    )
    assert spec.replicas == DEFAULTS["replicas"]
    assert spec.create_work_pool is DEFAULTS["workPool.create"]
    assert spec.flow_runs_per_worker == DEFAULTS["workPool.flowRunsPerWorker"]
    assert spec.api_key is not None
    assert spec.api_key.key == DEFAULTS["prefect.apiKeySecretRef.key"]
    assert spec.resource_name == DEFAULTS["gpu.resourceName"]
    assert spec.whole_node is DEFAULTS["gpu.wholeNode"]
    assert spec.slots_per_gpu == DEFAULTS["gpu.slotsPerGpu"]
    assert spec.limit_prefix == DEFAULTS["gpu.limitPrefix"]
    assert spec.image_pull_policy == DEFAULTS["worker.imagePullPolicy"]
    assert spec.limit_wait_timeout_s == DEFAULTS["worker.limitWaitTimeoutSeconds"]
    assert spec.drain_grace_period_s == DEFAULTS["worker.drainGracePeriodSeconds"]


def test_set_values_win_over_defaults() -> None:
    spec = PoolSpec.from_dict(
        {
            "replicas": 0,
            "workPool": {"name": "p", "create": False},
            "prefect": {"apiUrl": "http://prefect/api"},
            "gpu": {"wholeNode": True, "slotsPerGpu": 3, "limitPrefix": "a100"},
            "worker": {"image": "i", "drainGracePeriodSeconds": 0},
        }
    )
    assert (spec.replicas, spec.create_work_pool, spec.api_key) == (0, False, None)
    assert (spec.whole_node, spec.slots_per_gpu, spec.limit_prefix) == (True, 3, "a100")
    assert spec.drain_grace_period_s == 0
