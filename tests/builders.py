"""Builders shared by the tests of every tier: pool specs, pod and node facts, ledgers.

Import as ``from builders import ...`` (``tests/`` is on the import path: its
conftest.py puts it there). Defaults are the smallest valid objects; tests
state only what they are about.
"""

from __future__ import annotations

from typing import Any

from pgw_operator.facts import NodeFacts, PodFacts
from pgw_operator.plan import EntryState, LedgerEntry, PrefectLimit
from pgw_operator.spec import GROUP, KIND, VERSION, PoolSpec

DEFAULT_API_URL = "http://prefect:4200/api"


def pool_spec_dict(**overrides: Any) -> dict[str, Any]:
    """A minimal valid GpuWorkerPool ``spec``; each keyword replaces a top-level key."""
    spec: dict[str, Any] = {
        "workPool": {"name": "gpu"},
        "prefect": {"apiUrl": DEFAULT_API_URL},
        "gpu": {"perWorker": 1},
        "worker": {"image": "worker:1"},
    }
    spec.update(overrides)
    return spec


def pool_spec(**overrides: Any) -> PoolSpec:
    """:func:`pool_spec_dict` parsed as the operator parses it."""
    return PoolSpec.from_dict(pool_spec_dict(**overrides))


def make_spec(**gpu: Any) -> PoolSpec:
    """Two replicas of 8 flow runs each in pool ``gpu-pool``; keywords are the ``gpu`` section."""
    return pool_spec(
        replicas=2,
        workPool={"name": "gpu-pool", "flowRunsPerWorker": 8},
        gpu=gpu or {"perWorker": 1},
        worker={"image": "example/worker:1"},
    )


def pool_manifest(
    name: str,
    spec: dict[str, Any],
    namespace: str | None = None,
    **metadata: Any,
) -> dict[str, Any]:
    """A whole GpuWorkerPool object (apiVersion, kind, metadata, spec)."""
    meta: dict[str, Any] = {"name": name, **metadata}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": meta, "spec": spec}


def pod(name: str, node: str | None = "gpu-8", gpus: int | None = 1, **kw: Any) -> PodFacts:
    """A running, ready worker pod on ``node`` whose container asks for ``gpus`` GPUs."""
    limits = {"nvidia.com/gpu": str(gpus)} if gpus else {}
    base: dict[str, Any] = {"phase": "Running", "terminating": False, "ready": True, "restarts": 0}
    base.update(kw)
    return PodFacts(name=name, node=node, limits=limits, **base)


NODES = {
    "gpu-8": NodeFacts("gpu-8", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu.count": "8"}),
    "timesliced": NodeFacts(
        "timesliced", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu.replicas": "4"}
    ),
    "mig": NodeFacts("mig", {"nvidia.com/mig-1g.10gb": "7"}, {}),
    "cpu": NodeFacts("cpu", {"cpu": "8"}, {}),
}


def entry(name: str, size: int = 1, restarts: int = 0, state: EntryState = "Ready") -> LedgerEntry:
    """The ledger entry of pod ``name``'s limit ``gpu:<name>`` on node gpu-8."""
    return LedgerEntry(f"gpu:{name}", name, "gpu-8", size, str(size), restarts, state)


def prefect_limit(name: str, limit: int = 1, active: bool = True, slots: int = 0) -> PrefectLimit:
    """Prefect's view of the limit ``gpu:<name>``."""
    return PrefectLimit(f"gpu:{name}", limit, active, slots)


def by_name(*limits: PrefectLimit) -> dict[str, PrefectLimit]:
    return {limit.name: limit for limit in limits}
