"""The chart without a cluster: lint, schema, and what it renders for each kind of values.

Needs only the pinned helm (``hack/build-tools helm``). What the API server
thinks of the output is in test_chart_cluster.py.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import REPO_ROOT

from pgw_operator.__main__ import parse_args, pod_policy_of
from pgw_operator.pod_rules import PodPolicy

from .conftest import (
    CHART,
    Helm,
    Manifest,
    by_kind,
    one,
    parse_manifests,
    with_api_url_policy,
)

RELEASE, NAMESPACE = "pgw", "pgw-system"
FULLNAME = "pgw-prefect-gpu-workers"

# Value sets the cluster tests also send through the API server.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "watch-namespaces": {
        "watchNamespaces": ["team-a", "team-b"],
        "prefect": {"apiKeySecret": {"name": "prefect-api-key", "key": "api-key"}},
    },
    "metrics-servicemonitor": {
        "metrics": {
            "enabled": True,
            "port": 9191,
            "serviceMonitor": {
                "enabled": True,
                "labels": {"release": "prometheus"},
                "interval": "15s",
                "scrapeTimeout": "10s",
            },
        },
    },
    "sample-pool": {
        "prefect": {
            "apiUrl": "http://prefect-server.prefect.svc.cluster.local:4200/api",
            "apiKeySecret": {"name": "prefect-api-key", "key": "token"},
            "allowedApiUrls": [
                "http://prefect-server.prefect.svc.cluster.local:4200/api",
                "team-a=https://api.prefect.cloud/api/accounts/a1/workspaces/w1",
            ],
        },
        "samplePool": {
            "enabled": True,
            "replicas": 2,
            "workPool": "gpu-demo",
            "gpu": {"perWorker": 2, "slotsPerGpu": 4},
        },
    },
    "pool-policy": {
        "pools": {
            "allowedServiceAccounts": ["model-reader"],
            "allowedTolerationKeys": ["nvidia.com/gpu", "example.com/dedicated"],
            "allowedPriorityClasses": ["gpu-batch"],
            "maxDrainGraceSeconds": 7200,
        },
        "metrics": {"enabled": True},
        "networkPolicy": {
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"team": "monitoring"}}}],
            "apiServerTo": [{"ipBlock": {"cidr": "10.0.0.1/32"}}],
            "prefectTo": [{"namespaceSelector": {"matchLabels": {"name": "prefect"}}}],
            "prefectPorts": [4200],
        },
    },
    "custom-security-and-resources": {
        "podSecurityContext": {"runAsUser": 4242, "runAsGroup": 4242, "fsGroup": 4242},
        "securityContext": {"runAsUser": 4242},
        "resources": {
            "requests": {"cpu": "200m", "memory": "256Mi"},
            "limits": {"cpu": 1, "memory": "1Gi"},
        },
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}
        ],
        "podAnnotations": {"example.com/team": "ml-platform"},
        "verbose": True,
        "logFormat": "json",
        "image": {"repository": "registry.example.com/pgw/operator", "tag": "0.1.0-rc1"},
    },
}

FORBIDDEN_VERBS = {"*", "delete", "deletecollection", "update", "escalate", "bind", "impersonate"}


def render(helm: Helm, tmp_path: Path, values: dict[str, Any] | None = None) -> list[Manifest]:
    return parse_manifests(
        helm.render(values, release=RELEASE, namespace=NAMESPACE, tmp_dir=tmp_path)
    )


def rules_of(role: Manifest) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = role["rules"]
    return rules


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    """(apiGroup, resource, verb, resourceNames) for every permission in ``rules``."""
    return {
        (group, resource, verb, tuple(rule.get("resourceNames") or ()))
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


NAMESPACED_GRANTS = {
    *(("gpuworkers.dev", "gpuworkerpools", v, ()) for v in ("get", "list", "watch", "patch")),
    *(("gpuworkers.dev", "gpuworkerpools/status", v, ()) for v in ("get", "patch")),
    ("gpuworkers.dev", "gpuworkerpools/scale", "patch", ()),  # spec.autoscaling
    *(("apps", "deployments", v, ()) for v in ("get", "list", "watch", "create", "patch")),
    *(("", "pods", v, ()) for v in ("get", "list", "watch", "patch")),
    ("", "events", "create", ()),
    *(("", "serviceaccounts", v, ()) for v in ("get", "create", "patch")),
    *(("policy", "poddisruptionbudgets", v, ()) for v in ("get", "create", "patch")),
}
CLUSTER_READ_GRANTS = {
    *(("", "nodes", v, ()) for v in ("get", "list", "watch")),
    *(("apiextensions.k8s.io", "customresourcedefinitions", v, ()) for v in ("list", "watch")),
}


def operator_container(manifests: list[Manifest]) -> dict[str, Any]:
    deployment = one(manifests, "Deployment")
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["operator"]
    return containers[0]


# --- the CRD copy ---------------------------------------------------------------


def test_chart_crds_are_byte_identical_to_top_level_crds() -> None:
    top = {p.name: p.read_bytes() for p in (REPO_ROOT / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "crds").glob("*.yaml")}
    assert top, "no CRDs in crds/"
    assert sorted(chart) == sorted(top), "charts/prefect-gpu-workers/crds/ lists other files"
    drifted = [name for name in top if chart[name] != top[name]]
    assert not drifted, f"chart CRDs drifted from crds/: {drifted}; run: hack/sync-crds"


def test_chart_app_version_is_the_project_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == project["version"] == "0.1.0"


# --- lint and schema ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_strict_is_clean(helm: Helm, tmp_path: Path, name: str) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(VALUE_SETS[name]))
    proc = helm(
        "lint",
        "--strict",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--values",
        str(values_file),
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[WARNING]" not in output, output
    assert "[ERROR]" not in output, output
    assert "1 chart(s) linted, 0 chart(s) failed" in output


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy'"),
        ({"image": {"tag": "v1 beta"}}, "at '/image/tag'"),
        ({"watchNamespaces": ["Team_A"]}, "at '/watchNamespaces/0'"),
        ({"watchNamespaces": ["team-a", "team-a"]}, "at '/watchNamespaces'"),
        ({"replicaCount": 2}, "additional properties 'replicaCount' not allowed"),
        (
            {"securityContext": {"readOnlyRootFS": True}},
            "additional properties 'readOnlyRootFS' not allowed",
        ),
        ({"podSecurityContext": {"runAsUser": -1}}, "at '/podSecurityContext/runAsUser'"),
        ({"resources": {"limits": {"memory": "lots"}}}, "at '/resources/limits/memory'"),
        ({"prefect": {"apiUrl": "prefect-server:4200/api"}}, "at '/prefect/apiUrl'"),
        ({"prefect": {"apiKeySecret": {"name": "Prefect Key"}}}, "at '/prefect/apiKeySecret/name'"),
        ({"prefect": {"allowedApiUrls": ["http://p/api?x="]}}, "at '/prefect/allowedApiUrls/0'"),
        ({"prefect": {"allowedApiUrls": ["http://u@p/api"]}}, "at '/prefect/allowedApiUrls/0'"),
        (
            {"prefect": {"allowedApiUrls": ["Team_A=https://p/api"]}},
            "at '/prefect/allowedApiUrls/0'",
        ),
        ({"metrics": {"port": 70000}}, "at '/metrics/port'"),
        ({"logFormat": "yaml"}, "at '/logFormat'"),
        (
            {"metrics": {"serviceMonitor": {"interval": "half a minute"}}},
            "at '/metrics/serviceMonitor/interval'",
        ),
        (
            {"livenessProbe": {"httpGet": {"path": "/"}}},
            "additional properties 'httpGet' not allowed",
        ),
        ({"samplePool": {"gpu": {"perWorker": 1, "wholeNode": True}}}, "at '/samplePool/gpu'"),
        ({"samplePool": {"workPool": "a/b"}}, "at '/samplePool/workPool'"),
    ],
)
def test_schema_rejects_invalid_values_with_the_path(
    helm: Helm, tmp_path: Path, values: dict[str, Any], expected: str
) -> None:
    error = helm.render_error(values, tmp_dir=tmp_path)
    assert "values don't meet the specifications of the schema" in error, error
    assert expected in error, error


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (
            {"metrics": {"serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled=true needs metrics.enabled=true",
        ),
        ({"samplePool": {"enabled": True}}, "samplePool.enabled=true needs prefect.apiUrl"),
        (
            {
                "samplePool": {"enabled": True},
                "prefect": {"apiUrl": "http://p:4200/api"},
                "watchNamespaces": ["team-a"],
            },
            'samplePool.namespace "pgw-system" is not in watchNamespaces',
        ),
        (
            {"serviceAccount": {"create": False}},
            "serviceAccount.name is required when serviceAccount.create=false",
        ),
    ],
)
def test_templates_reject_inconsistent_values_with_a_message(
    helm: Helm, tmp_path: Path, values: dict[str, Any], expected: str
) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    proc = helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--values",
        str(values_file),
        check=False,
    )
    assert proc.returncode != 0
    assert expected in proc.stderr, proc.stderr


# --- what the default values render ----------------------------------------------------


def test_defaults_render_the_operator_and_cluster_wide_rbac_only(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path)
    kinds = sorted((m["kind"], m["metadata"]["name"]) for m in manifests)
    assert kinds == [
        ("ClusterRole", f"{NAMESPACE}-{FULLNAME}"),
        ("ClusterRole", f"{NAMESPACE}-{FULLNAME}-read"),
        ("ClusterRoleBinding", f"{NAMESPACE}-{FULLNAME}"),
        ("ClusterRoleBinding", f"{NAMESPACE}-{FULLNAME}-read"),
        ("Deployment", FULLNAME),
        ("NetworkPolicy", FULLNAME),
        ("ServiceAccount", FULLNAME),
        ("ValidatingAdmissionPolicy", f"{NAMESPACE}-{FULLNAME}-operator"),
        ("ValidatingAdmissionPolicy", f"{NAMESPACE}-{FULLNAME}-pools"),
        ("ValidatingAdmissionPolicyBinding", f"{NAMESPACE}-{FULLNAME}-operator"),
        ("ValidatingAdmissionPolicyBinding", f"{NAMESPACE}-{FULLNAME}-pools"),
    ]
    for m in manifests:
        labels = m["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "prefect-gpu-workers"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/version"] == "0.1.0"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        admission = m["kind"].startswith("ValidatingAdmissionPolicy")
        assert labels["app.kubernetes.io/component"] == ("admission" if admission else "operator")
        assert labels["helm.sh/chart"] == "prefect-gpu-workers-0.1.0"
        if m["kind"] in ("Deployment", "ServiceAccount"):
            assert m["metadata"]["namespace"] == NAMESPACE


def test_operator_deployment_is_one_recreated_hardened_replica(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path)
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector.items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]
    assert pod["automountServiceAccountToken"] is True
    assert one(manifests, "ServiceAccount")["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }

    container = operator_container(manifests)
    assert container["image"] == "ghcr.io/prefect-gpu-workers/operator:0.1.0"
    assert container["command"] == ["python", "-m", "pgw_operator"]
    # No --namespace: all namespaces; no --metrics: nothing else listens. The pod
    # policy's defaults are said out loud.
    assert container["args"] == [
        "--liveness=http://0.0.0.0:8080/healthz",
        "--allow-any-api-url",  # what with_api_url_policy adds
        "--allowed-toleration-key=nvidia.com/gpu",
        "--max-drain-grace-seconds=3600",
        "--log-format=full",
    ]
    assert container["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["requests"] == {"cpu": "50m", "memory": "128Mi"}
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]


def test_default_rbac_is_exactly_what_the_operator_uses(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path)
    namespaced = one(manifests, "ClusterRole", f"{NAMESPACE}-{FULLNAME}")
    cluster_read = one(manifests, "ClusterRole", f"{NAMESPACE}-{FULLNAME}-read")
    # No Secret name configured: no Secret access at all (an empty
    # resourceNames list would mean every Secret).
    assert grants(rules_of(namespaced)) == NAMESPACED_GRANTS
    assert grants(rules_of(cluster_read)) == CLUSTER_READ_GRANTS
    for binding in by_kind(manifests, "ClusterRoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
    assert not by_kind(manifests, "Role")
    assert not by_kind(manifests, "RoleBinding")


def test_secret_access_is_scoped_to_the_named_secrets(helm: Helm, tmp_path: Path) -> None:
    values = {
        "prefect": {
            "apiKeySecret": {"name": "prefect-api-key"},
            "extraSecretNames": ["team-b-key", "prefect-api-key"],
        }
    }
    manifests = render(helm, tmp_path, values)
    rules = rules_of(one(manifests, "ClusterRole", f"{NAMESPACE}-{FULLNAME}"))
    secret_rules = [r for r in rules if "secrets" in r["resources"]]
    assert secret_rules == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["prefect-api-key", "team-b-key"],
            "verbs": ["get"],
        }
    ]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_no_role_grants_writes_beyond_what_the_operator_does(
    helm: Helm, tmp_path: Path, name: str
) -> None:
    for role in render(helm, tmp_path, VALUE_SETS[name]):
        if role["kind"] not in ("ClusterRole", "Role"):
            continue
        for group, resource, verb, names in grants(rules_of(role)):
            assert verb not in FORBIDDEN_VERBS, (role["metadata"]["name"], resource, verb)
            assert "*" not in (group, resource)
            if resource == "secrets":
                assert verb == "get", "Secrets: get only"
                assert names, "Secret access must name its Secrets"


def test_watch_namespaces_render_one_role_per_namespace(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["watch-namespaces"])
    container = operator_container(manifests)
    assert container["args"] == [
        "--liveness=http://0.0.0.0:8080/healthz",
        "--namespace=team-a",
        "--namespace=team-b",
        "--allow-any-api-url",
        "--allowed-toleration-key=nvidia.com/gpu",
        "--max-drain-grace-seconds=3600",
        "--log-format=full",
    ]
    roles = by_kind(manifests, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    expected = NAMESPACED_GRANTS | {("", "secrets", "get", ("prefect-api-key",))}
    for role in roles:
        assert grants(rules_of(role)) == expected
    bindings = by_kind(manifests, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": FULLNAME,
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
    # Only node, CRD and namespace reads stay cluster-wide.
    cluster_roles = by_kind(manifests, "ClusterRole")
    assert [r["metadata"]["name"] for r in cluster_roles] == [f"{NAMESPACE}-{FULLNAME}-read"]
    # kopf lists and watches namespaces when given --namespace (see rbac.yaml).
    namespaces = {("", "namespaces", "list", ()), ("", "namespaces", "watch", ())}
    assert grants(rules_of(cluster_roles[0])) == CLUSTER_READ_GRANTS | namespaces


def test_metrics_service_and_service_monitor_render_only_when_enabled(
    helm: Helm, tmp_path: Path
) -> None:
    assert not by_kind(render(helm, tmp_path), "Service")
    metrics_only = render(helm, tmp_path, {"metrics": {"enabled": True}})
    assert by_kind(metrics_only, "Service")
    assert not by_kind(metrics_only, "ServiceMonitor")

    manifests = render(helm, tmp_path, VALUE_SETS["metrics-servicemonitor"])
    container = operator_container(manifests)
    assert "--metrics=0.0.0.0:9191" in container["args"]
    assert {"name": "metrics", "containerPort": 9191, "protocol": "TCP"} in container["ports"]
    service = one(manifests, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9191, "targetPort": "metrics", "protocol": "TCP"}
    ]
    pod_labels = one(manifests, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()

    monitor = one(manifests, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= (
        service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {
            "port": "metrics",
            "path": "/metrics",
            "scheme": "http",
            "interval": "15s",
            "scrapeTimeout": "10s",
        }
    ]


def test_sample_pool_renders_a_valid_looking_pool(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["sample-pool"])
    pool = one(manifests, "GpuWorkerPool", "gpu-workers")
    assert pool["apiVersion"] == "gpuworkers.dev/v1alpha1"
    assert pool["metadata"]["namespace"] == NAMESPACE
    assert pool["spec"] == {
        "replicas": 2,
        "workPool": {"name": "gpu-demo"},
        "prefect": {
            "apiUrl": "http://prefect-server.prefect.svc.cluster.local:4200/api",
            "apiKeySecretRef": {"name": "prefect-api-key", "key": "token"},
        },
        "gpu": {"resourceName": "nvidia.com/gpu", "perWorker": 2, "slotsPerGpu": 4},
        "worker": {
            "image": "ghcr.io/prefect-gpu-workers/worker:0.1.0",
            "imagePullPolicy": "IfNotPresent",
        },
    }


def test_custom_security_context_and_resources_merge_with_the_hardened_defaults(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["custom-security-and-resources"])
    deployment = one(manifests, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = operator_container(manifests)
    assert pod["securityContext"]["runAsUser"] == 4242
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["runAsUser"] == 4242
    # Overriding one field keeps the others (helm merges maps).
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["resources"] == {
        "requests": {"cpu": "200m", "memory": "256Mi"},
        "limits": {"cpu": 1, "memory": "1Gi"},
    }
    assert container["image"] == "registry.example.com/pgw/operator:0.1.0-rc1"
    assert container["args"][-2:] == ["--log-format=json", "--verbose"]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"][0]["key"] == "dedicated"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"example.com/team": "ml-platform"}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_operator_accepts_the_arguments_the_chart_passes(
    helm: Helm, tmp_path: Path, name: str
) -> None:
    """The chart's args parse with the operator's own argument parser, to the same meaning."""
    values = VALUE_SETS[name]
    container = operator_container(render(helm, tmp_path, values))
    assert container["command"][1:3] == ["-m", "pgw_operator"]
    args = parse_args(container["args"])
    assert args.namespace == values.get("watchNamespaces", [])
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    metrics = {"port": 9090, **values.get("metrics", {})}
    assert args.metrics == (f"0.0.0.0:{metrics['port']}" if metrics.get("enabled") else "")
    assert args.log_format == values.get("logFormat", "full")
    assert args.verbose is values.get("verbose", False)
    prefect = with_api_url_policy(values)["prefect"]
    assert args.allowed_api_url == prefect.get("allowedApiUrls", [])
    assert args.allow_any_api_url is prefect.get("allowAnyApiUrl", False)
    chart_defaults = yaml.safe_load((CHART / "values.yaml").read_text())["pools"]
    pools = {**chart_defaults, **values.get("pools", {})}
    assert pod_policy_of(args) == PodPolicy(
        service_accounts=frozenset(pools["allowedServiceAccounts"]),
        toleration_keys=frozenset(pools["allowedTolerationKeys"]),
        priority_classes=frozenset(pools["allowedPriorityClasses"]),
        max_drain_grace_s=pools["maxDrainGraceSeconds"],
    )


def test_the_network_policy_lets_in_only_probes_and_metrics_and_out_only_dns_api_and_prefect(
    helm: Helm, tmp_path: Path
) -> None:
    values = VALUE_SETS["pool-policy"]
    policy = one(render(helm, tmp_path, values), "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert [rule["ports"][0]["port"] for rule in policy["ingress"]] == [8080, 9090]
    assert policy["ingress"][1]["from"] == values["networkPolicy"]["metricsFrom"]
    dns, api_server, prefect = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert [p["port"] for p in api_server["ports"]] == [443, 6443]
    assert api_server["to"] == values["networkPolicy"]["apiServerTo"]
    assert [p["port"] for p in prefect["ports"]] == [4200]
    assert prefect["to"] == values["networkPolicy"]["prefectTo"]
    off = render(helm, tmp_path, {"networkPolicy": {"enabled": False}})
    assert not by_kind(off, "NetworkPolicy")


def test_the_admission_policy_states_the_admin_s_lists(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["pool-policy"])
    policy = one(manifests, "ValidatingAdmissionPolicy", f"{NAMESPACE}-{FULLNAME}-pools")["spec"]
    expressions = " ".join(v["expression"] for v in policy["validations"])
    assert '["model-reader"]' in expressions
    assert '["nvidia.com/gpu","example.com/dedicated"]' in expressions
    assert '["gpu-batch"]' in expressions
    assert "<= 7200" in expressions
    binding = one(manifests, "ValidatingAdmissionPolicyBinding", f"{NAMESPACE}-{FULLNAME}-pools")[
        "spec"
    ]
    assert binding["validationActions"] == ["Deny"]
    assert "matchResources" not in binding  # every namespace: the operator serves them all
    off = render(helm, tmp_path, {"pools": {"admissionPolicy": False}})
    assert [m["metadata"]["name"] for m in by_kind(off, "ValidatingAdmissionPolicy")] == [
        f"{NAMESPACE}-{FULLNAME}-operator"
    ]


def test_the_operator_s_admission_policy_binds_its_own_account_only(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path)
    name = f"{NAMESPACE}-{FULLNAME}-operator"
    policy = one(manifests, "ValidatingAdmissionPolicy", name)["spec"]
    (condition,) = policy["matchConditions"]
    account = f"system:serviceaccount:{NAMESPACE}:{FULLNAME}"
    assert condition["expression"] == f'request.userInfo.username == "{account}"'
    resources = {r["resources"][0] for r in policy["matchConstraints"]["resourceRules"]}
    assert resources == {"pods", "deployments", "poddisruptionbudgets", "serviceaccounts"}
    off = render(helm, tmp_path, {"operatorAdmissionPolicy": False})
    assert all(m["metadata"]["name"] != name for m in off)


def test_the_chart_renders_nothing_without_an_api_url_policy(helm: Helm, tmp_path: Path) -> None:
    """No allowlist and no ``allowAnyApiUrl``: a tenant boundary is chosen, not defaulted."""
    error = helm.render_error({}, tmp_dir=tmp_path, policy=False)
    assert "prefect.allowedApiUrls is empty" in error
    assert "prefect.allowAnyApiUrl=true" in error


def test_image_digest_wins_over_tag(helm: Helm, tmp_path: Path) -> None:
    digest = "sha256:" + "ab" * 32
    manifests = render(helm, tmp_path, {"image": {"tag": "ignored", "digest": digest}})
    assert operator_container(manifests)["image"] == (
        f"ghcr.io/prefect-gpu-workers/operator@{digest}"
    )
