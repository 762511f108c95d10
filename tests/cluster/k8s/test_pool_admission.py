"""The API server, with the CRD's schema and CEL rules, admits or rejects pool specs.

No operator needed: what is rejected here never reaches it. Covers the pod
template fields, spec.worker.metricsPort, spec.autoscaling and spec.disruption.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client

from .cluster import DevCluster
from .operator_harness import Pools, install_crd
from builders import POD_ESCALATIONS


@pytest.fixture(scope="module")
def crd(dev_cluster: DevCluster) -> None:
    install_crd(dev_cluster)


def base_spec(**overrides: Any) -> dict[str, Any]:
    return {
        "workPool": {"name": "p"},
        "prefect": {"apiUrl": "http://prefect/api"},
        "gpu": {"perWorker": 1},
        "worker": {"image": "i"},
        **overrides,
    }


def template(**fields: Any) -> dict[str, Any]:
    return {"worker": {"image": "i", "podTemplate": fields}}


def mount(path: str) -> dict[str, Any]:
    return template(volumeMounts=[{"name": "v", "mountPath": path}])


def metrics_port(port: Any) -> dict[str, Any]:
    return {"worker": {"image": "i", "metricsPort": port}}


POD_TEMPLATE = "spec.worker.podTemplate"
METRICS_PORT = "spec.worker.metricsPort"
HOSTILE_SPECS: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, spec overrides, field named in the error, words of the message)
    ("command", template(command=["sh", "-c", "sleep 1d"]), POD_TEMPLATE, "worker command"),
    ("args", template(args=["--pool", "other"]), POD_TEMPLATE, "worker command"),
    ("limit prefix env", template(env=[{"name": "PGW_LIMIT_PREFIX", "value": "x"}]),
     f"{POD_TEMPLATE}.env[0]", "spec.gpu.limitPrefix"),
    ("api url env", template(env=[{"name": "A", "value": "1"},
                                  {"name": "PREFECT_API_URL", "value": "http://evil/api"}]),
     f"{POD_TEMPLATE}.env[1]", "spec.prefect.apiUrl"),
    ("api key env", template(env=[{"name": "PREFECT_API_KEY", "value": "k"}]),
     f"{POD_TEMPLATE}.env[0]", "apiKeySecretRef"),
    ("operator volume", template(volumes=[{"name": "tmp", "emptyDir": {"medium": "Memory"}}]),
     f"{POD_TEMPLATE}.volumes[0].name", "operator's"),
    ("host path", template(volumes=[{"name": "root", "hostPath": {"path": "/"}}]),
     f"{POD_TEMPLATE}.volumes[0].hostPath", "hostPath"),
    ("mount over prefect home", mount("/var/run/prefect"),
     f"{POD_TEMPLATE}.volumeMounts[0].mountPath", "mounted by the operator"),
    ("mount below prefect home", mount("/run/prefect/x"),
     f"{POD_TEMPLATE}.volumeMounts[0].mountPath", "mounted by the operator"),
    ("mount over tmp", mount("/tmp/"),
     f"{POD_TEMPLATE}.volumeMounts[0].mountPath", "mounted by the operator"),
    ("mount with dot dot", mount("/data/../tmp"),
     f"{POD_TEMPLATE}.volumeMounts[0].mountPath", "clean absolute path"),
    ("pool label", template(labels={"gpuworkers.dev/pool": "other"}),
     f"{POD_TEMPLATE}.labels", "set by the operator"),
    ("managed-by label", template(labels={"app.kubernetes.io/managed-by": "me"}),
     f"{POD_TEMPLATE}.labels", "set by the operator"),
    ("root pod", template(securityContext={"runAsNonRoot": False}),
     f"{POD_TEMPLATE}.securityContext.runAsNonRoot", "must stay true"),
    ("uid 0", template(securityContext={"runAsUser": 0}),
     f"{POD_TEMPLATE}.securityContext.runAsUser", "root"),
    ("unconfined seccomp", template(securityContext={"seccompProfile": {"type": "Unconfined"}}),
     f"{POD_TEMPLATE}.securityContext.seccompProfile.type", "Unconfined"),
    ("privileged", template(containerSecurityContext={"privileged": True}),
     f"{POD_TEMPLATE}.containerSecurityContext.privileged", "never privileged"),
    ("escalation", template(containerSecurityContext={"allowPrivilegeEscalation": True}),
     f"{POD_TEMPLATE}.containerSecurityContext.allowPrivilegeEscalation", "stay false"),
    ("added capability",
     template(containerSecurityContext={"capabilities": {"add": ["SYS_ADMIN"]}}),
     f"{POD_TEMPLATE}.containerSecurityContext.capabilities.add", "cannot be added"),
    ("root container", template(containerSecurityContext={"runAsNonRoot": False}),
     f"{POD_TEMPLATE}.containerSecurityContext.runAsNonRoot", "must stay true"),
    ("min above max", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}},
     "spec.autoscaling.minReplicas", "must not exceed"),
    ("no max", {"autoscaling": {"minReplicas": 0}}, "spec.autoscaling.maxReplicas", "Required"),
    ("max zero", {"autoscaling": {"maxReplicas": 0}}, "spec.autoscaling.maxReplicas", "1"),
    ("percent over 100", {"disruption": {"maxUnavailable": "150%"}},
     "spec.disruption.maxUnavailable", "percentage"),
    ("negative budget", {"disruption": {"maxUnavailable": -1}},
     "spec.disruption.maxUnavailable", "count"),
    ("budget that blocks drains", {"disruption": {"maxUnavailable": 0}},
     "spec.disruption.maxUnavailable", "block every node drain"),
    ("zero percent budget", {"disruption": {"maxUnavailable": "0%"}},
     "spec.disruption.maxUnavailable", "block every node drain"),
    ("metrics port below 1024", metrics_port(80), METRICS_PORT, "greater than or equal to 1024"),
    ("metrics port zero", metrics_port(0), METRICS_PORT, "greater than or equal to 1024"),
    ("metrics port above 65535", metrics_port(65536), METRICS_PORT, "less than or equal to 65535"),
    ("metrics port on the health port", metrics_port(8080), METRICS_PORT, "health port"),
    ("metrics port as text", metrics_port("9400"), METRICS_PORT, "integer"),
    *((f"pod escalation: {e.name}", template(**e.template), e.crd, "")
      for e in POD_ESCALATIONS if e.crd is not None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [(o, f, w) for _, o, f, w in HOSTILE_SPECS],
    ids=[i for i, _, _, _ in HOSTILE_SPECS],
)
def test_hostile_specs_are_rejected_naming_the_field(
    dev_cluster: DevCluster,
    namespace: str,
    crd: None,
    overrides: dict[str, Any],
    field: str,
    words: str,
) -> None:
    with pytest.raises(client.ApiException) as info:
        Pools(dev_cluster, namespace).create("hostile", base_spec(**overrides))
    assert info.value.status == 422
    body = str(info.value.body)
    assert field in body, body
    assert words in body, body


def test_a_full_pod_template_autoscaling_and_budget_are_accepted_with_defaults(
    dev_cluster: DevCluster, namespace: str, crd: None
) -> None:
    pod_template = {
        "runtimeClassName": "nvidia",
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
            {"name": "models", "persistentVolumeClaim": {"claimName": "model-cache"}},
        ],
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "models", "mountPath": "/models", "readOnly": True},
            {"name": "models", "mountPath": "/tmp/cache"},
        ],
        "envFrom": [{"configMapRef": {"name": "hf"}},
                    {"secretRef": {"name": "hf"}, "prefix": "HF_"}],
        "env": [{"name": "HF_HOME", "value": "/models"}],
        "topologySpreadConstraints": [
            {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
             "whenUnsatisfiable": "ScheduleAnyway"}
        ],
        "securityContext": {"runAsUser": 2000, "fsGroup": 2000, "runAsNonRoot": True,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containerSecurityContext": {"readOnlyRootFilesystem": False,
                                     "capabilities": {"drop": ["ALL"]}},
        "labels": {"team": "vision"},
    }  # fmt: skip
    spec = base_spec(
        worker={"image": "i", "podTemplate": pod_template},
        autoscaling={"maxReplicas": 8},
        disruption={},
    )
    pools = Pools(dev_cluster, namespace)
    created = pools.create("full", spec)["spec"]
    # Nothing pruned: every field of the template came through as written.
    assert created["worker"]["podTemplate"] == pod_template
    assert created["autoscaling"] == {
        "maxReplicas": 8,
        "minReplicas": 0,
        "lookaheadSeconds": 0,
        "pollIntervalSeconds": 5,
        "scaleDownDelaySeconds": 300,
        "cooldownSeconds": 15,
    }
    assert created["disruption"] == {"maxUnavailable": 1}
    percent = base_spec(disruption={"maxUnavailable": "25%"})
    assert pools.create("percent", percent)["spec"]["disruption"] == {"maxUnavailable": "25%"}


def test_a_metrics_port_is_accepted_as_written_and_absent_by_default(
    dev_cluster: DevCluster, namespace: str, crd: None
) -> None:
    pools = Pools(dev_cluster, namespace)
    for port in (1024, 9400, 65535):
        created = pools.create(f"metrics-{port}", base_spec(**metrics_port(port)))
        assert created["spec"]["worker"]["metricsPort"] == port
    assert "metricsPort" not in pools.create("no-metrics", base_spec())["spec"]["worker"]
