"""Builders shared by the tests of every tier: pool specs, pod and node facts, ledgers.

Import as ``from builders import ...`` (``tests/`` is on the import path: its
conftest.py puts it there). Defaults are the smallest valid objects; tests
state only what they are about.
"""

from __future__ import annotations

from dataclasses import dataclass
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


# Nodes whose GPU feature discovery labels say each device's memory (MiB): an
# "80GB" H100 has 79.6 GiB; a 4-way time-sliced A100; MIG 2g.20gb slices; none.
GFD_NODES = {
    "a100": NodeFacts(
        "a100",
        {"nvidia.com/gpu": "8"},
        {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.count": "8"},
    ),
    "h100": NodeFacts("h100", {"nvidia.com/gpu": "8"}, {"nvidia.com/gpu.memory": "81559"}),
    "sliced": NodeFacts(
        "sliced",
        {"nvidia.com/gpu": "8"},
        {"nvidia.com/gpu.memory": "81920", "nvidia.com/gpu.replicas": "4"},
    ),
    "mig-2g": NodeFacts(
        "mig-2g", {"nvidia.com/mig-2g.20gb": "3"}, {"nvidia.com/mig-2g.20gb.memory": "19968"}
    ),
    "bare": NodeFacts("bare", {"nvidia.com/gpu": "8"}, {}),
}


def entry(name: str, size: int = 1, restarts: int = 0, state: EntryState = "Ready") -> LedgerEntry:
    """The ledger entry of pod ``name``'s limit ``gpu:<name>`` on node gpu-8."""
    return LedgerEntry(f"gpu:{name}", name, "gpu-8", size, str(size), restarts, state)


def prefect_limit(name: str, limit: int = 1, active: bool = True, slots: int = 0) -> PrefectLimit:
    """Prefect's view of the limit ``gpu:<name>``."""
    return PrefectLimit(f"gpu:{name}", limit, active, slots)


def memory_entry(
    name: str, size: int = 80, restarts: int = 0, state: EntryState = "Ready"
) -> LedgerEntry:
    """The ledger entry of pod ``name``'s GPU memory limit ``gpu-memory:<name>`` (GiB) on gpu-8."""
    return LedgerEntry(
        f"gpu-memory:{name}", name, "gpu-8", size, "1", restarts, state, kind="memory"
    )


def prefect_memory_limit(
    name: str, limit: int = 80, active: bool = True, slots: int = 0
) -> PrefectLimit:
    """Prefect's view of the memory limit ``gpu-memory:<name>``."""
    return PrefectLimit(f"gpu-memory:{name}", limit, active, slots)


def by_name(*limits: PrefectLimit) -> dict[str, PrefectLimit]:
    return {limit.name: limit for limit in limits}


POD_TEMPLATE = "spec.worker.podTemplate"


@dataclass(frozen=True)
class PodEscalation:
    """Something a tenant could put in a pool's pod template to get more than its
    namespace allows, and where each check names it."""

    name: str
    template: dict[str, Any]
    field: str  # named by the operator's check (pgw_operator.pod_rules)
    # Named by the API server (the CRD's CEL rules); None: an admin's list, which
    # the operator (and the chart's admission policy) checks, not the CRD.
    crd_field: str | None = ""

    @property
    def crd(self) -> str | None:
        return self.field if self.crd_field == "" else self.crd_field


def _volume(**source: Any) -> dict[str, Any]:
    return {"volumes": [{"name": "v", **source}]}


T = POD_TEMPLATE
POD_ESCALATIONS = [
    PodEscalation("nfs volume", _volume(nfs={"server": "s", "path": "/"}), f"{T}.volumes[0].nfs"),
    PodEscalation("hostPath volume", _volume(hostPath={"path": "/"}), f"{T}.volumes[0].hostPath"),
    PodEscalation("gitRepo volume", _volume(gitRepo={"repository": "r"}),
                  f"{T}.volumes[0].gitRepo"),
    PodEscalation("iscsi volume", _volume(iscsi={"targetPortal": "t", "iqn": "i", "lun": 0}),
                  f"{T}.volumes[0].iscsi"),
    PodEscalation("cephfs volume", _volume(cephfs={"monitors": ["m"]}), f"{T}.volumes[0].cephfs"),
    PodEscalation("rbd volume", _volume(rbd={"monitors": ["m"], "image": "i"}),
                  f"{T}.volumes[0].rbd"),
    PodEscalation("flexVolume", _volume(flexVolume={"driver": "d"}), f"{T}.volumes[0].flexVolume"),
    PodEscalation("projected token",
                  _volume(projected={"sources": [{"configMap": {"name": "c"}},
                                                 {"serviceAccountToken": {"path": "t"}}]}),
                  f"{T}.volumes[0].projected.sources[1].serviceAccountToken"),
    PodEscalation("seLinux user", {"securityContext": {"seLinuxOptions": {"user": "system_u"}}},
                  f"{T}.securityContext.seLinuxOptions"),
    PodEscalation("seLinux type",
                  {"containerSecurityContext": {"seLinuxOptions": {"type": "spc_t"}}},
                  f"{T}.containerSecurityContext.seLinuxOptions.type"),
    PodEscalation("sysctls",
                  {"securityContext": {"sysctls": [{"name": "kernel.msgmax", "value": "1"}]}},
                  f"{T}.securityContext.sysctls"),
    PodEscalation("root group", {"securityContext": {"runAsGroup": 0}},
                  f"{T}.securityContext.runAsGroup"),
    PodEscalation("root fsGroup", {"securityContext": {"fsGroup": 0}},
                  f"{T}.securityContext.fsGroup"),
    PodEscalation("root supplemental group", {"securityContext": {"supplementalGroups": [5, 0]}},
                  f"{T}.securityContext.supplementalGroups"),
    PodEscalation("container root group", {"containerSecurityContext": {"runAsGroup": 0}},
                  f"{T}.containerSecurityContext.runAsGroup"),
    PodEscalation("procMount", {"containerSecurityContext": {"procMount": "Unmasked"}},
                  f"{T}.containerSecurityContext.procMount"),
    PodEscalation("windowsOptions",
                  {"securityContext": {"windowsOptions": {"hostProcess": True}}},
                  f"{T}.securityContext.windowsOptions"),
    PodEscalation("privileged", {"containerSecurityContext": {"privileged": True}},
                  f"{T}.containerSecurityContext.privileged"),
    PodEscalation("run as root", {"securityContext": {"runAsUser": 0}},
                  f"{T}.securityContext.runAsUser"),
    PodEscalation("capabilities",
                  {"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}},
                  f"{T}.containerSecurityContext.capabilities.add"),
    PodEscalation("seccomp off", {"securityContext": {"seccompProfile": {"type": "Unconfined"}}},
                  f"{T}.securityContext.seccompProfile.type"),
    PodEscalation("AppArmor annotation",
                  {"annotations": {"container.apparmor.security.beta.kubernetes.io/worker":
                                   "unconfined"}},
                  f"{T}.annotations[container.apparmor.security.beta.kubernetes.io/worker]",
                  crd_field=f"{T}.annotations"),
    PodEscalation("any service account", {"serviceAccountName": "deployer"},
                  f"{T}.serviceAccountName", crd_field=None),
    PodEscalation("tolerate every taint", {"tolerations": [{"operator": "Exists"}]},
                  f"{T}.tolerations[0].key", crd_field=None),
    PodEscalation("tolerate a control-plane taint",
                  {"tolerations": [{"key": "node-role.kubernetes.io/control-plane",
                                    "operator": "Exists"}]},
                  f"{T}.tolerations[0].key", crd_field=None),
    PodEscalation("system priority", {"priorityClassName": "system-node-critical"},
                  f"{T}.priorityClassName", crd_field=None),
]  # fmt: skip
