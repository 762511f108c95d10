"""The worker Deployment a pool should have (``pgw_operator.desired``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pgw_operator.desired import (
    DEFAULT_RESOURCES,
    WORKER_HEALTH_PORT,
    desired_deployment,
    desired_service_account,
)
from pgw_operator.spec import POOL_LABEL

from builders import make_spec, pool_spec

CRD = Path(__file__).resolve().parents[2] / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"


def test_deployment_gives_each_pod_its_name_as_worker_id_and_the_gpu_limit() -> None:
    spec = make_spec(perWorker=2, limitPrefix="infer")
    deployment = desired_deployment("team-a", "ml", "uid-1", spec)
    assert deployment["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert deployment["spec"]["replicas"] == 2
    pod_spec = deployment["spec"]["template"]["spec"]
    (container,) = pod_spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["WORKER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert container["command"][:2] == ["prefect-gpu-workers", "worker"]
    assert container["command"][container["command"].index("--limit-prefix") + 1] == "infer"
    assert container["command"][container["command"].index("--flow-runs") + 1] == "8"
    assert container["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels[POOL_LABEL] == "team-a"
    assert deployment["spec"]["selector"]["matchLabels"] == {POOL_LABEL: "team-a"}


def test_api_key_is_referenced_never_copied() -> None:
    spec = pool_spec(
        prefect={"apiUrl": "https://x/api", "apiKeySecretRef": {"name": "prefect-key"}}
    )
    env = desired_deployment("p", "ns", "u", spec)["spec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    key = next(e for e in env if e["name"] == "PREFECT_API_KEY")
    assert key == {
        "name": "PREFECT_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "prefect-key", "key": "api-key"}},
    }


def test_pod_template_overrides_merge_but_cannot_drop_the_gpu_limit() -> None:
    spec = pool_spec(
        worker={
            "image": "i",
            "podTemplate": {
                "nodeSelector": {"pool": "a100"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                "resources": {"limits": {"memory": "8Gi", "nvidia.com/gpu": "4"}},
                "env": [{"name": "HF_HOME", "value": "/cache"}],
                "labels": {"team": "vision", POOL_LABEL: "spoofed"},
            },
        }
    )
    template = desired_deployment("p", "ns", "u", spec)["spec"]["template"]
    pod_spec = template["spec"]
    container = pod_spec["containers"][0]
    assert pod_spec["nodeSelector"] == {"pool": "a100"}
    assert pod_spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The template's memory limit, the default cpu limit, and the GPU limit from spec.gpu.
    assert container["resources"]["limits"] == {"memory": "8Gi", "nvidia.com/gpu": "1", "cpu": "4"}
    assert container["resources"]["requests"] == DEFAULT_RESOURCES["requests"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": "health"}
    assert {"name": "HF_HOME", "value": "/cache"} in container["env"]
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"][POOL_LABEL] == "p"


def test_whole_node_pool_runs_one_worker_per_node() -> None:
    deployment = desired_deployment("p", "ns", "u", make_spec(wholeNode=True))
    pod_spec = deployment["spec"]["template"]["spec"]
    anti = pod_spec["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert anti[0]["topologyKey"] == "kubernetes.io/hostname"
    assert "nvidia.com/gpu" not in pod_spec["containers"][0]["resources"].get("limits", {})


def test_workers_run_as_the_pool_s_own_account_unless_the_template_names_one() -> None:
    """Never the namespace's ``default`` account, whose bindings (RBAC, cloud workload
    identity) may be meant for something else; no token either way."""
    pod_spec = desired_deployment("p", "ns", "u", make_spec(perWorker=1))["spec"]["template"][
        "spec"
    ]
    assert pod_spec["serviceAccountName"] == "p-worker"
    assert pod_spec["automountServiceAccountToken"] is False
    account = desired_service_account("p", "ns", "u")
    assert account["metadata"]["name"] == "p-worker"
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["ownerReferences"][0]["uid"] == "u"
    assert account["metadata"]["labels"][POOL_LABEL] == "p"
    named = pool_spec(worker={"image": "i", "podTemplate": {"serviceAccountName": "reader"}})
    pod_spec = desired_deployment("p", "ns", "u", named)["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == "reader"


# --- spec.worker.metricsPort -------------------------------------------------------------


def worker_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def test_metrics_port_adds_the_flag_and_a_named_container_port() -> None:
    spec = pool_spec(worker={"image": "i", "metricsPort": 9400})
    container = worker_container(desired_deployment("p", "ns", "u", spec))
    assert container["command"][-2:] == ["--metrics-port", "9400"]
    assert container["ports"] == [
        {"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"},
        {"name": "metrics", "containerPort": 9400, "protocol": "TCP"},
    ]


def test_without_metrics_port_the_pod_template_is_the_one_before_it_existed() -> None:
    """An existing pool's template must not change on upgrade (a change rolls every
    worker); with the port, the flag and the port are the only differences."""
    plain = desired_deployment("p", "ns", "u", pool_spec())
    container = worker_container(plain)
    assert "--metrics-port" not in container["command"]
    assert container["ports"] == [
        {"name": "health", "containerPort": WORKER_HEALTH_PORT, "protocol": "TCP"}
    ]
    with_port = desired_deployment(
        "p", "ns", "u", pool_spec(worker={"image": "worker:1", "metricsPort": 9400})
    )
    metrics_container = worker_container(with_port)
    metrics_container["command"] = metrics_container["command"][:-2]
    metrics_container["ports"] = metrics_container["ports"][:1]
    with_port["spec"]["template"]["spec"]["containers"] = [metrics_container]
    assert json.dumps(with_port, sort_keys=False) == json.dumps(plain, sort_keys=False)


def test_the_crd_keeps_metrics_off_the_health_port() -> None:
    """The CRD's CEL rule names the port the operator gives the probes."""
    crd = yaml.safe_load(CRD.read_text())
    (version,) = crd["spec"]["versions"]
    worker = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["worker"]
    port = worker["properties"]["metricsPort"]
    assert (port["type"], port["minimum"], port["maximum"]) == ("integer", 1024, 65535)
    (rule,) = [r for r in worker["x-kubernetes-validations"] if "metricsPort" in r["rule"]]
    assert rule["rule"] == f"!has(self.metricsPort) || self.metricsPort != {WORKER_HEALTH_PORT}"
    assert rule["fieldPath"] == ".metricsPort"
    assert str(WORKER_HEALTH_PORT) in rule["message"]
