"""The chart without a cluster: lint, schema, and what it renders for each kind of values.

Needs only the pinned helm (``hack/build-tools helm``). What the API server
thinks of the output is in test_chart_cluster.py.
"""

from __future__ import annotations

import json
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s.cluster import REPO_ROOT

from pgw_operator.__main__ import leader_settings_of, parse_args, pod_policy_of
from pgw_operator.leader import LeaseSettings
from pgw_operator.pod_rules import PodPolicy

from .conftest import (
    CHART,
    Helm,
    Manifest,
    by_kind,
    one,
    parse_manifests,
    tool_bin,
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
    "ha-custom": {
        "replicaCount": 3,
        "leaderElection": {
            "leaseName": "pgw-lock",
            "leaseDurationSeconds": 30,
            "renewDeadlineSeconds": 20,
            "retryPeriodSeconds": 4,
        },
        "podAntiAffinity": {"type": "required", "topologyKey": "topology.kubernetes.io/zone"},
        "podDisruptionBudget": {"minAvailable": 2},
    },
    "no-leader-election": {"leaderElection": {"enabled": False}},
    "monitoring": {
        "metrics": {"enabled": True, "serviceMonitor": {"enabled": True}},
        "prefect": {
            "apiUrl": "http://prefect-server.prefect.svc.cluster.local:4200/api",
            "allowedApiUrls": ["http://prefect-server.prefect.svc.cluster.local:4200/api"],
        },
        "samplePool": {"enabled": True, "workPool": "gpu-demo"},
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "alertLabels": {"team": "ml-platform"},
                "runbookBaseUrl": "https://example.com/pgw/",
                "alerts": {"PgwGpuHeldButIdle": {"enabled": False}},
            },
            "podMonitor": {"enabled": True, "scrapeTimeout": "10s"},
            "dashboard": {"enabled": True},
        },
    },
}

FORBIDDEN_VERBS = {"*", "delete", "deletecollection", "update", "escalate", "bind", "impersonate"}
# The only grants of those verbs, each as narrow as it can be: the operator
# deletes its own GpuWorkerLimit records once their Prefect limits are gone,
# and renews its one leader-election Lease (update, by name).
LEASE = f"{FULLNAME}-leader"
ALLOWED_WRITES = {
    ("gpuworkers.dev", "gpuworkerlimits", "delete", ()),
    ("coordination.k8s.io", "leases", "update", (LEASE,)),
    ("coordination.k8s.io", "leases", "update", ("pgw-lock",)),  # ha-custom's leaseName
}


def render(helm: Helm, tmp_path: Path, values: dict[str, Any] | None = None) -> list[Manifest]:
    return parse_manifests(
        helm.render(values, release=RELEASE, namespace=NAMESPACE, tmp_dir=tmp_path)
    )


def chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


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
    *(
        ("gpuworkers.dev", "gpuworkerlimits", v, ())
        for v in ("get", "list", "watch", "create", "patch", "delete")
    ),
    ("gpuworkers.dev", "gpuworkerpools/scale", "patch", ()),  # spec.autoscaling
    *(("apps", "deployments", v, ()) for v in ("get", "list", "watch", "create", "patch")),
    *(("", "pods", v, ()) for v in ("get", "list", "watch", "patch")),
    ("", "events", "create", ()),
    *(("", "serviceaccounts", v, ()) for v in ("get", "create", "patch")),
    *(("policy", "poddisruptionbudgets", v, ()) for v in ("get", "create", "patch")),
}
# The leader-election Role, in the release namespace: create cannot name its
# object; get and update name the one Lease.
LEASE_GRANTS = {
    ("coordination.k8s.io", "leases", "create", ()),
    ("coordination.k8s.io", "leases", "get", (LEASE,)),
    ("coordination.k8s.io", "leases", "update", (LEASE,)),
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
        ({"replicas": 2}, "additional properties 'replicas' not allowed"),
        ({"replicaCount": 0}, "at '/replicaCount'"),
        (
            {"leaderElection": {"leaseDurationSeconds": "15s"}},
            "at '/leaderElection/leaseDurationSeconds'",
        ),
        ({"leaderElection": {"retryPeriodSeconds": 0}}, "at '/leaderElection/retryPeriodSeconds'"),
        ({"leaderElection": {"leaseName": "Op_Lease"}}, "at '/leaderElection/leaseName'"),
        ({"leaderElection": {"enable": True}}, "additional properties 'enable' not allowed"),
        ({"podAntiAffinity": {"type": "soft"}}, "at '/podAntiAffinity/type'"),
        (
            {"podDisruptionBudget": {"minAvailable": "half"}},
            "at '/podDisruptionBudget/minAvailable'",
        ),
        ({"podDisruptionBudget": {"minAvailable": -1}}, "at '/podDisruptionBudget/minAvailable'"),
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
        ({"samplePool": {"metricsPort": 80}}, "at '/samplePool/metricsPort'"),
        ({"samplePool": {"metricsPort": 8080}}, "at '/samplePool/metricsPort'"),
        ({"monitoring": {"podMonitor": {"enable": True}}}, "additional properties 'enable'"),
        (
            {"monitoring": {"prometheusRule": {"alerts": {"PgwNoSuchAlert": {"for": "5m"}}}}},
            "additional properties 'PgwNoSuchAlert' not allowed",
        ),
        (
            {"monitoring": {"prometheusRule": {"alerts": {"PgwPoolDegraded": {"for": "soon"}}}}},
            "at '/monitoring/prometheusRule/alerts/PgwPoolDegraded/for'",
        ),
        (
            {"monitoring": {"dashboard": {"sidecarLabel": "grafana dashboard"}}},
            "at '/monitoring/dashboard/sidecarLabel'",
        ),
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
        (
            {"leaderElection": {"enabled": False}, "replicaCount": 2},
            "replicaCount 2 needs leaderElection.enabled=true",
        ),
        (
            {"leaderElection": {"leaseDurationSeconds": 10}},
            "leaderElection.renewDeadlineSeconds (10) must be less than leaseDurationSeconds (10)",
        ),
        (
            {"leaderElection": {"retryPeriodSeconds": 10}},
            "leaderElection.retryPeriodSeconds (10) must be less than renewDeadlineSeconds (10)",
        ),
        (
            {"podDisruptionBudget": {"minAvailable": 2}},
            "podDisruptionBudget.minAvailable (2) must be less than the operator's replicas (2)",
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
        ("PodDisruptionBudget", FULLNAME),
        ("Role", f"{FULLNAME}-leader-election"),
        ("RoleBinding", f"{FULLNAME}-leader-election"),
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
        if m["kind"] in ("Deployment", "ServiceAccount", "PodDisruptionBudget", "Role"):
            assert m["metadata"]["namespace"] == NAMESPACE


LEADER_ARGS = [
    "--leader-elect",
    f"--leader-elect-lease-name={LEASE}",
    "--leader-elect-lease-duration=15",
    "--leader-elect-renew-deadline=10",
    "--leader-elect-retry-period=2",
]


def test_operator_deployment_is_a_leader_and_a_hot_standby_hardened(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path)
    deployment = one(manifests, "Deployment")
    spec = deployment["spec"]
    # Two replicas, one acting (the Lease's holder): a rollout adds a standby
    # before it stops a pod, and a stopped leader releases the Lease.
    assert spec["replicas"] == 2
    assert spec["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
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
        *LEADER_ARGS,
        "--log-format=full",
    ]
    # The identity and the Lease's namespace, from the downward API.
    env = {e["name"]: e.get("valueFrom") for e in container["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
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
    for binding in by_kind(manifests, "ClusterRoleBinding") + by_kind(manifests, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": FULLNAME, "namespace": NAMESPACE}
        ]
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
    # The only Role: leader election's, in the release namespace, to one Lease.
    (role,) = by_kind(manifests, "Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert grants(rules_of(role)) == LEASE_GRANTS
    (binding,) = by_kind(manifests, "RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"]["kind"] == "Role"


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
            if (group, resource, verb, names) in ALLOWED_WRITES:
                continue
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
        *LEADER_ARGS,
        "--log-format=full",
    ]
    roles = [r for r in by_kind(manifests, "Role") if r["metadata"]["name"] == FULLNAME]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    expected = NAMESPACED_GRANTS | {("", "secrets", "get", ("prefect-api-key",))}
    for role in roles:
        assert grants(rules_of(role)) == expected
    bindings = [b for b in by_kind(manifests, "RoleBinding") if b["metadata"]["name"] == FULLNAME]
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
            "honorLabels": True,
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
            "metricsPort": 9400,
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
    helm: Helm, tmp_path: Path, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart's args parse with the operator's own argument parser, to the same meaning."""
    values = VALUE_SETS[name]
    container = operator_container(render(helm, tmp_path, values))
    # What the downward API gives the pod (the chart's env names these fields).
    downward = {"metadata.name": "pgw-7c9f-abcde", "metadata.namespace": NAMESPACE}
    for env in container["env"]:
        if "valueFrom" in env:
            monkeypatch.setenv(env["name"], downward[env["valueFrom"]["fieldRef"]["fieldPath"]])
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
    chart_defaults = chart_values()["pools"]
    pools = {**chart_defaults, **values.get("pools", {})}
    assert pod_policy_of(args) == PodPolicy(
        service_accounts=frozenset(pools["allowedServiceAccounts"]),
        toleration_keys=frozenset(pools["allowedTolerationKeys"]),
        priority_classes=frozenset(pools["allowedPriorityClasses"]),
        max_drain_grace_s=pools["maxDrainGraceSeconds"],
    )
    election = {**chart_values()["leaderElection"], **values.get("leaderElection", {})}
    expected = (
        LeaseSettings(
            name=election["leaseName"] or LEASE,
            namespace=NAMESPACE,
            identity="pgw-7c9f-abcde",
            lease_duration_s=election["leaseDurationSeconds"],
            renew_deadline_s=election["renewDeadlineSeconds"],
            retry_period_s=election["retryPeriodSeconds"],
        )
        if election["enabled"]
        else None
    )
    assert leader_settings_of(args) == expected


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
    assert resources == {
        "pods",
        "deployments",
        "poddisruptionbudgets",
        "serviceaccounts",
        "gpuworkerlimits",
    }
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


# --- the hot standby -------------------------------------------------------------------


def pod_spec(manifests: list[Manifest]) -> dict[str, Any]:
    spec: dict[str, Any] = one(manifests, "Deployment")["spec"]["template"]["spec"]
    return spec


def test_the_replicas_spread_across_nodes_and_evictions_leave_a_standby(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path)
    selector = one(manifests, "Deployment")["spec"]["selector"]["matchLabels"]
    assert pod_spec(manifests)["affinity"] == {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": {"matchLabels": selector},
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }
            ]
        }
    }
    budget = one(manifests, "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["spec"] == {"minAvailable": 1, "selector": {"matchLabels": selector}}


def test_without_leader_election_one_replica_is_recreated_with_no_lease_rights(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["no-leader-election"])
    spec = one(manifests, "Deployment")["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    assert not [a for a in operator_container(manifests)["args"] if a.startswith("--leader")]
    assert "affinity" not in pod_spec(manifests)
    assert not by_kind(manifests, "PodDisruptionBudget")  # it would block every drain
    assert not by_kind(manifests, "Role")
    assert not by_kind(manifests, "RoleBinding")
    explicit = render(helm, tmp_path, {"leaderElection": {"enabled": False}, "replicaCount": 1})
    assert one(explicit, "Deployment")["spec"]["replicas"] == 1


def test_custom_ha_values_reach_the_flags_the_role_the_budget_and_the_rollout(
    helm: Helm, tmp_path: Path
) -> None:
    manifests = render(helm, tmp_path, VALUE_SETS["ha-custom"])
    spec = one(manifests, "Deployment")["spec"]
    assert spec["replicas"] == 3
    # One pod per zone, required: a surge pod could find no room, so the
    # rollout replaces one pod at a time instead.
    assert spec["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    (term,) = pod_spec(manifests)["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "topology.kubernetes.io/zone"
    assert one(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    args = operator_container(manifests)["args"]
    assert [a for a in args if a.startswith("--leader")] == [
        "--leader-elect",
        "--leader-elect-lease-name=pgw-lock",
        "--leader-elect-lease-duration=30",
        "--leader-elect-renew-deadline=20",
        "--leader-elect-retry-period=4",
    ]
    (role,) = by_kind(manifests, "Role")
    assert ("coordination.k8s.io", "leases", "update", ("pgw-lock",)) in grants(rules_of(role))
    assert ("coordination.k8s.io", "leases", "get", ("pgw-lock",)) in grants(rules_of(role))


def test_an_affinity_of_your_own_keeps_or_replaces_the_spreading(
    helm: Helm, tmp_path: Path
) -> None:
    node_affinity = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["ops"]}]}
            ]
        }
    }
    merged = pod_spec(render(helm, tmp_path, {"affinity": {"nodeAffinity": node_affinity}}))
    assert merged["affinity"]["nodeAffinity"] == node_affinity
    assert (
        "preferredDuringSchedulingIgnoredDuringExecution" in (merged["affinity"]["podAntiAffinity"])
    )
    own: dict[str, list[Any]] = {"preferredDuringSchedulingIgnoredDuringExecution": []}
    replaced = pod_spec(render(helm, tmp_path, {"affinity": {"podAntiAffinity": own}}))
    assert replaced["affinity"] == {"podAntiAffinity": own}
    spread_off = pod_spec(render(helm, tmp_path, {"podAntiAffinity": {"type": "none"}}))
    assert "affinity" not in spread_off


def test_the_budget_can_be_a_percentage_or_off(helm: Helm, tmp_path: Path) -> None:
    percent = render(helm, tmp_path, {"podDisruptionBudget": {"minAvailable": "50%"}})
    assert one(percent, "PodDisruptionBudget")["spec"]["minAvailable"] == "50%"
    off = render(helm, tmp_path, {"podDisruptionBudget": {"enabled": False}})
    assert not by_kind(off, "PodDisruptionBudget")


def test_no_rbac_means_no_lease_role_either(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, {"rbac": {"create": False}})
    assert not by_kind(manifests, "Role")
    assert "--leader-elect" in operator_container(manifests)["args"]


# --- monitoring: PrometheusRule, PodMonitor, dashboard ConfigMap --------------------

FILES = CHART / "files"
MONITORING_ON = {
    "monitoring": {
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "podMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
        "dashboard": {"enabled": True},
    }
}


def source_alert_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load((FILES / "alerts.yaml").read_text())["groups"]
    return groups


def is_dashboard(manifest: Manifest) -> bool:
    name: str = manifest["metadata"]["name"]
    return manifest["kind"] == "ConfigMap" and name.endswith("-dashboard")


def test_helm_lint_strict_is_clean_with_monitoring_on(helm: Helm, tmp_path: Path) -> None:
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(with_api_url_policy(MONITORING_ON)))
    proc = helm("lint", "--strict", str(CHART), "--values", str(values_file), check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "[WARNING]" not in output, output


def test_monitoring_objects_are_off_by_default(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path)
    assert not by_kind(manifests, "PrometheusRule")
    assert not by_kind(manifests, "PodMonitor")
    assert not [m for m in manifests if is_dashboard(m)]
    monitoring = chart_values()["monitoring"]
    assert not any(monitoring[k]["enabled"] for k in ("prometheusRule", "podMonitor", "dashboard"))


def test_the_schema_names_every_alert_of_the_file() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    rule_schema = schema["properties"]["monitoring"]["properties"]["prometheusRule"]
    named = set(rule_schema["properties"]["alerts"]["properties"])
    assert named == {r["alert"] for g in source_alert_groups() for r in g["rules"]}


def test_the_prometheus_rule_carries_the_alerts_file_as_it_is(helm: Helm, tmp_path: Path) -> None:
    manifests = render(helm, tmp_path, MONITORING_ON)
    rule = one(manifests, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"]["groups"] == source_alert_groups()


def test_values_drop_alerts_and_change_their_for_severity_labels_and_runbooks(
    helm: Helm, tmp_path: Path
) -> None:
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "namespace": "monitoring",
                "alertLabels": {"team": "ml-platform", "severity": "ignored"},
                "runbookBaseUrl": "https://example.com/pgw/",
                "alerts": {
                    "PgwPoolDegraded": {"for": "45m", "severity": "critical"},
                    "PgwGpuHeldButIdle": {"enabled": False},
                },
            }
        }
    }
    rule = one(render(helm, tmp_path, values), "PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    rendered = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    source = {r["alert"]: r for g in source_alert_groups() for r in g["rules"]}
    assert set(rendered) == set(source) - {"PgwGpuHeldButIdle"}
    assert rendered["PgwPoolDegraded"]["for"] == "45m"
    assert rendered["PgwPoolDegraded"]["labels"] == {"severity": "critical", "team": "ml-platform"}
    for name, r in rendered.items():
        assert r["expr"] == source[name]["expr"]
        assert r["labels"]["team"] == "ml-platform"
        # An alert's own severity wins over the labels for every alert.
        assert r["labels"]["severity"] != "ignored"
        assert r["annotations"]["runbook_url"] == (
            f"https://example.com/pgw/docs/operations.md#{name.lower()}"
        )
        if name != "PgwPoolDegraded":
            assert r["for"] == source[name]["for"]


def test_promtool_accepts_the_rendered_rules(helm: Helm, tmp_path: Path) -> None:
    """The template's changes keep the groups valid rule groups (as the source is)."""
    values = {
        "monitoring": {
            "prometheusRule": {
                "enabled": True,
                "alertLabels": {"team": "ml-platform"},
                "alerts": {"PgwPoolDegraded": {"for": "1h30m", "severity": "page"}},
            }
        }
    }
    rule = one(render(helm, tmp_path, values), "PrometheusRule")
    rules_file = tmp_path / "rendered-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    promtool = tool_bin("promtool") / "promtool"
    proc = subprocess.run(
        [str(promtool), "check", "rules", str(rules_file)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_the_pod_monitor_scrapes_worker_pods_metrics_port_and_labels_the_pool(
    helm: Helm, tmp_path: Path
) -> None:
    monitor = one(render(helm, tmp_path, MONITORING_ON), "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["selector"] == {
        "matchLabels": {
            "app.kubernetes.io/name": "prefect-gpu-worker",
            "app.kubernetes.io/component": "worker",
        }
    }
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {
            "port": "metrics",
            "path": "/metrics",
            "scheme": "http",
            "interval": "30s",
            "relabelings": [
                {
                    "sourceLabels": ["__meta_kubernetes_pod_label_gpuworkers_dev_pool"],
                    "targetLabel": "pool",
                }
            ],
        }
    ]


def test_the_pod_monitor_follows_watched_or_named_namespaces(helm: Helm, tmp_path: Path) -> None:
    watched = {**MONITORING_ON, "watchNamespaces": ["team-a", "team-b"]}
    monitor = one(render(helm, tmp_path, watched), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}
    named = {
        "watchNamespaces": ["team-a", "team-b"],
        "monitoring": {
            "podMonitor": {
                "enabled": True,
                "namespaces": ["team-b"],
                "namespace": "monitoring",
                "interval": "15s",
                "scrapeTimeout": "10s",
            }
        },
    }
    monitor = one(render(helm, tmp_path, named), "PodMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-b"]}
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "10s")


def test_the_pod_monitor_selects_the_pods_the_operator_makes() -> None:
    from pgw_operator.desired import pool_labels

    labels = pool_labels("gpu")
    assert labels["app.kubernetes.io/name"] == "prefect-gpu-worker"
    assert labels["app.kubernetes.io/component"] == "worker"
    # The relabeling reads the pool from this label (Prometheus' sanitised name).
    assert labels["gpuworkers.dev/pool"] == "gpu"


def test_the_dashboard_config_map_carries_the_generated_json_for_the_sidecar(
    helm: Helm, tmp_path: Path
) -> None:
    [config_map] = [m for m in render(helm, tmp_path, MONITORING_ON) if is_dashboard(m)]
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert list(config_map["data"]) == ["prefect-gpu-workers.json"]
    assert json.loads(config_map["data"]["prefect-gpu-workers.json"]) == json.loads(
        (FILES / "dashboard.json").read_text()
    )


def test_the_dashboard_s_label_namespace_and_annotations_can_change(
    helm: Helm, tmp_path: Path
) -> None:
    values = {
        "monitoring": {
            "dashboard": {
                "enabled": True,
                "namespace": "grafana",
                "sidecarLabel": "example.com/dashboard",
                "sidecarLabelValue": "yes",
                "labels": {"team": "ml"},
                "annotations": {"grafana_folder": "GPU"},
            }
        }
    }
    [config_map] = [m for m in render(helm, tmp_path, values) if is_dashboard(m)]
    metadata = config_map["metadata"]
    assert metadata["namespace"] == "grafana"
    assert metadata["labels"]["example.com/dashboard"] == "yes"
    assert metadata["labels"]["team"] == "ml"
    assert "grafana_dashboard" not in metadata["labels"]
    assert metadata["annotations"] == {"grafana_folder": "GPU"}


def test_the_sample_pool_s_metrics_port_can_be_off(helm: Helm, tmp_path: Path) -> None:
    values = json.loads(json.dumps(VALUE_SETS["sample-pool"]))
    values["samplePool"]["metricsPort"] = 0
    pool = one(render(helm, tmp_path, values), "GpuWorkerPool")
    assert "metricsPort" not in pool["spec"]["worker"]
