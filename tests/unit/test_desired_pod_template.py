"""The worker pod's template fields and the PodDisruptionBudget (pure manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from pgw_operator.desired import (
    OPERATOR_ENV,
    WORKER_UID,
    desired_deployment,
    desired_pdb,
    disabled_pdb_patch,
    disruption_of,
    pool_labels,
)
from pgw_operator.spec import POOL_LABEL, PoolSpec

CRD = Path(__file__).resolve().parents[2] / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"


def spec_with(template: dict[str, Any]) -> PoolSpec:
    return PoolSpec.from_dict(
        {
            "workPool": {"name": "gpu-pool"},
            "prefect": {"apiUrl": "http://prefect:4200/api"},
            "gpu": {"perWorker": 1},
            "worker": {"image": "example/worker:1", "podTemplate": template},
        }
    )


def pod_of(template: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, worker container) of the pool ``p``'s Deployment."""
    deployment = desired_deployment("p", "ml", "uid-1", spec_with(template))
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


SHM = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
CACHE = {"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}}


def test_volumes_and_mounts_follow_the_operators_own() -> None:
    pod, container = pod_of(
        {
            "volumes": [SHM, CACHE],
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/dev/shm"},
                {"name": "models", "mountPath": "/models", "readOnly": True},
                {"name": "models", "mountPath": "/tmp/cache"},  # below /tmp is fine
            ],
        }
    )
    assert [v["name"] for v in pod["volumes"]] == ["prefect-home", "tmp", "dshm", "models"]
    assert pod["volumes"][2] == SHM
    mounts = [(m["name"], m["mountPath"]) for m in container["volumeMounts"]]
    assert mounts == [
        ("prefect-home", "/var/run/prefect"),
        ("tmp", "/tmp"),
        ("dshm", "/dev/shm"),
        ("models", "/models"),
        ("models", "/tmp/cache"),
    ]
    assert container["volumeMounts"][3]["readOnly"] is True


def test_the_operators_volumes_and_paths_cannot_be_replaced() -> None:
    # The CRD rejects these; a spec that got past it still cannot take them.
    pod, container = pod_of(
        {
            "volumes": [
                {"name": "tmp", "emptyDir": {"medium": "Memory"}},
                {"name": "host", "hostPath": {"path": "/"}},
                SHM,
            ],
            "volumeMounts": [
                {"name": "dshm", "mountPath": "/tmp"},
                {"name": "dshm", "mountPath": "//tmp/"},
                {"name": "dshm", "mountPath": "/var/run/prefect"},
                {"name": "dshm", "mountPath": "/var/run/prefect/profiles"},
                {"name": "dshm", "mountPath": "/run/prefect"},
                {"name": "dshm", "mountPath": "/var/run/./prefect"},
                {"name": "dshm", "mountPath": "/dev/shm"},
            ],
        }
    )
    assert pod["volumes"][:2] == [
        {"name": "prefect-home", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]
    assert [v["name"] for v in pod["volumes"]] == ["prefect-home", "tmp", "dshm"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == [
        "/var/run/prefect",
        "/tmp",
        "/dev/shm",
    ]


def test_env_from_is_added_and_cannot_change_the_operators_variables() -> None:
    env_from = [{"configMapRef": {"name": "hf-settings"}},
                {"secretRef": {"name": "hf-token"}, "prefix": "HF_"}]  # fmt: skip
    _, container = pod_of(
        {
            "envFrom": env_from,
            "env": [
                {"name": "HF_HOME", "value": "/models"},
                {"name": "PREFECT_API_URL", "value": "http://elsewhere/api"},
                {"name": "WORKER_ID", "value": "someone-else"},
            ],
        }
    )
    assert container["envFrom"] == env_from
    env = {e["name"]: e for e in container["env"]}
    # `env` wins over `envFrom` in Kubernetes, and the operator's entries are in `env`:
    # a ConfigMap or Secret key named WORKER_ID changes nothing.
    assert env["WORKER_ID"] == {
        "name": "WORKER_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    assert env["PREFECT_API_URL"]["value"] == "http://prefect:4200/api"
    assert env["HF_HOME"]["value"] == "/models"
    assert [e["name"] for e in container["env"]].count("PREFECT_API_URL") == 1


def test_runtime_class_and_topology_spread() -> None:
    explicit = {"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule",
                "labelSelector": {"matchLabels": {"team": "ml"}}}  # fmt: skip
    pod, _ = pod_of(
        {
            "runtimeClassName": "nvidia",
            "topologySpreadConstraints": [
                {
                    "maxSkew": 1,
                    "topologyKey": "kubernetes.io/hostname",
                    "whenUnsatisfiable": "ScheduleAnyway",
                },
                explicit,
            ],
        }
    )
    assert pod["runtimeClassName"] == "nvidia"
    default, kept = pod["topologySpreadConstraints"]
    assert default["labelSelector"] == {"matchLabels": {POOL_LABEL: "p"}}
    assert default["topologyKey"] == "kubernetes.io/hostname"
    assert kept == explicit


def test_defaults_are_restricted() -> None:
    pod, container = pod_of({})
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": WORKER_UID,
        "runAsGroup": WORKER_UID,
        "fsGroup": WORKER_UID,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert WORKER_UID >= 10000  # clear of the node's own users
    assert container["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
    }
    assert "runtimeClassName" not in pod
    assert "topologySpreadConstraints" not in pod
    assert "envFrom" not in container


def test_security_contexts_merge_and_may_only_be_tightened() -> None:
    pod, container = pod_of(
        {
            "securityContext": {
                "runAsUser": 2000,
                "runAsGroup": 2000,
                "fsGroup": 3000,
                "supplementalGroups": [44],
            },
            "containerSecurityContext": {
                "readOnlyRootFilesystem": False,
                "capabilities": {"drop": ["NET_RAW"]},
                "seccompProfile": {"type": "Localhost", "localhostProfile": "gpu.json"},
            },
        }
    )
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 2000,
        "runAsGroup": 2000,
        "fsGroup": 3000,
        "supplementalGroups": [44],
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    security = container["securityContext"]
    assert "runAsUser" not in security  # the pod's user applies to the container
    assert security["readOnlyRootFilesystem"] is False
    assert security["capabilities"] == {"drop": ["ALL", "NET_RAW"]}  # ALL is never lost
    assert security["seccompProfile"] == {"type": "Localhost", "localhostProfile": "gpu.json"}


@pytest.mark.parametrize(
    ("template", "where", "key", "expected"),
    [
        ({"securityContext": {"runAsNonRoot": False}}, "pod", "runAsNonRoot", True),
        ({"securityContext": {"runAsUser": 0}}, "pod", "runAsUser", WORKER_UID),
        ({"securityContext": {"seccompProfile": {"type": "Unconfined"}}}, "pod",
         "seccompProfile", {"type": "RuntimeDefault"}),
        ({"containerSecurityContext": {"privileged": True}}, "container", "privileged", False),
        ({"containerSecurityContext": {"allowPrivilegeEscalation": True}}, "container",
         "allowPrivilegeEscalation", False),
        ({"containerSecurityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}, "container",
         "capabilities", {"drop": ["ALL"]}),
        ({"containerSecurityContext": {"runAsNonRoot": False, "runAsUser": 0}}, "container",
         "runAsNonRoot", True),
        ({"containerSecurityContext": {"runAsUser": 0}}, "container", "runAsUser", WORKER_UID),
        ({"containerSecurityContext": {"appArmorProfile": {"type": "Unconfined"}}}, "container",
         "appArmorProfile", {"type": "RuntimeDefault"}),
    ],
)  # fmt: skip
def test_loosening_past_the_crd_still_yields_a_restricted_pod(
    template: dict[str, Any], where: str, key: str, expected: Any
) -> None:
    pod, container = pod_of(template)
    context = pod["securityContext"] if where == "pod" else container["securityContext"]
    assert context[key] == expected


def test_the_operator_keeps_the_command_and_its_labels() -> None:
    deployment = desired_deployment(
        "p", "ml", "uid-1",
        spec_with({"labels": {POOL_LABEL: "other", "team": "ml"}, "command": ["sh"]}),
    )  # fmt: skip
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == {**pool_labels("p"), "team": "ml"}
    (container,) = template["spec"]["containers"]
    assert container["command"][:2] == ["prefect-gpu-workers", "worker"]
    assert "args" not in container


def test_the_crd_rejects_each_variable_the_operator_sets() -> None:
    """desired.OPERATOR_ENV and the CRD's CEL rules on podTemplate.env name the same variables."""
    crd = yaml.safe_load(CRD.read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    template = schema["properties"]["spec"]["properties"]["worker"]["properties"]["podTemplate"]
    rules = " ".join(r["rule"] for r in template["properties"]["env"]["items"][
        "x-kubernetes-validations"])  # fmt: skip
    assert {name for name in OPERATOR_ENV if f"'{name}'" in rules} == OPERATOR_ENV


# PodDisruptionBudget -----------------------------------------------------------


def test_no_budget_unless_asked() -> None:
    assert disruption_of({"replicas": 2}) is None
    assert desired_pdb("p", "ml", "uid-1", None) is None
    assert disruption_of({"disruption": {}}) == 1  # the CRD's default, repeated
    assert disruption_of({"disruption": {"maxUnavailable": "25%"}}) == "25%"
    assert disruption_of({"disruption": {"maxUnavailable": 0}}) == 0


@pytest.mark.parametrize("max_unavailable", [0, 1, "25%"])
def test_budget_selects_exactly_the_pools_workers(max_unavailable: int | str) -> None:
    pdb = desired_pdb("p", "ml", "uid-1", max_unavailable)
    assert pdb is not None
    assert (pdb["apiVersion"], pdb["kind"]) == ("policy/v1", "PodDisruptionBudget")
    assert pdb["metadata"]["name"] == "p"
    assert pdb["metadata"]["namespace"] == "ml"
    (owner,) = pdb["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("GpuWorkerPool", "p", "uid-1")
    assert pdb["spec"]["maxUnavailable"] == max_unavailable
    assert "minAvailable" not in pdb["spec"]
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    # Its selector matches the Deployment's pods, and only this pool's.
    pods = desired_deployment("p", "ml", "uid-1", spec_with({}))["spec"]["template"]
    wanted = pdb["spec"]["selector"]["matchLabels"]
    assert wanted.items() <= pods["metadata"]["labels"].items()
    assert not wanted.items() <= pool_labels("p-other").items()


def test_an_unset_budget_is_turned_off_not_deleted() -> None:
    patch = disabled_pdb_patch()
    assert patch["spec"] == {"maxUnavailable": "100%"}
    assert "may be deleted" in patch["metadata"]["annotations"]["gpuworkers.dev/disruption-budget"]
