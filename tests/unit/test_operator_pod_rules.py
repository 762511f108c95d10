"""What a pool may put in its pods: each escalation a tenant could try is named
by field and rule; what Pod Security "restricted" and the admin allow passes."""

from __future__ import annotations

from typing import Any

import pytest

from pgw_operator.pod_rules import PodPolicy, first_violations, violations

from builders import POD_ESCALATIONS


def spec_with(template: dict[str, Any], **spec: Any) -> dict[str, Any]:
    worker = {"image": "i", "podTemplate": template, **spec.pop("worker", {})}
    return {"workPool": {"name": "p"}, "prefect": {"apiUrl": "https://p/api"},
            "gpu": {"perWorker": 1}, "worker": worker, **spec}  # fmt: skip


@pytest.mark.parametrize(
    ("template", "field"),
    [(e.template, e.field) for e in POD_ESCALATIONS],
    ids=[e.name for e in POD_ESCALATIONS],
)
def test_each_escalation_is_named_by_its_field(template: dict[str, Any], field: str) -> None:
    found = violations(spec_with(template), PodPolicy())
    assert [v.field for v in found] == [field]
    assert found[0].rule  # says which rule


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"disruption": {"maxUnavailable": 0}}, "spec.disruption.maxUnavailable"),
        ({"disruption": {"maxUnavailable": "0%"}}, "spec.disruption.maxUnavailable"),
        ({"worker": {"drainGracePeriodSeconds": 86400}}, "spec.worker.drainGracePeriodSeconds"),
    ],
)
def test_a_budget_or_grace_that_blocks_node_drains_is_named(
    spec: dict[str, Any], field: str
) -> None:
    assert [v.field for v in violations(spec_with({}, **spec), PodPolicy())] == [field]


def test_what_the_admin_lists_passes() -> None:
    template = {
        "serviceAccountName": "model-reader",
        "priorityClassName": "gpu-batch",
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"},
                        {"key": "dedicated", "operator": "Equal", "value": "ml"}],
    }  # fmt: skip
    policy = PodPolicy(
        service_accounts=frozenset({"model-reader"}),
        toleration_keys=frozenset({"nvidia.com/gpu", "dedicated"}),
        priority_classes=frozenset({"gpu-batch"}),
        max_drain_grace_s=7200,
    )
    spec = spec_with(template, worker={"drainGracePeriodSeconds": 7200})
    assert violations(spec, policy) == []
    assert len(violations(spec, PodPolicy())) == 4  # the defaults allow none of it


def test_a_restricted_template_passes() -> None:
    """Everything Pod Security "restricted" allows, as a platform team would write it."""
    template = {
        "volumes": [
            {"name": "models", "persistentVolumeClaim": {"claimName": "models"}},
            {"name": "shm", "emptyDir": {"medium": "Memory"}},
            {"name": "conf", "projected": {"sources": [{"configMap": {"name": "c"}},
                                                      {"secret": {"name": "s"}}]}},
            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
            {"name": "info", "downwardAPI": {"items": []}},
            {"name": "csi", "csi": {"driver": "x"}},
        ],
        "securityContext": {"runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                            "supplementalGroups": [10002],
                            "seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"},
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containerSecurityContext": {"readOnlyRootFilesystem": False, "procMount": "Default",
                                     "capabilities": {"drop": ["ALL"]}},
        "annotations": {"example.com/team": "ml"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }  # fmt: skip
    spec = spec_with(template, disruption={"maxUnavailable": "10%"})
    assert violations(spec, PodPolicy()) == []


def test_the_message_is_bounded_however_many_fields_break_rules() -> None:
    volumes = [{"name": f"v{i}", "nfs": {}} for i in range(50)]
    found = violations(spec_with({"volumes": volumes}), PodPolicy())
    lines = list(first_violations(found))
    assert len(lines) == 4
    assert lines[-1] == "and 47 more"
