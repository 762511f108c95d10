"""What a pool may put in the pods it makes: pure.

Creating a GpuWorkerPool is creating pods in its namespace, with the
operator's rights. So a pool's pod template is held to Pod Security
"restricted" (the fixed rules, which the CRD's CEL rules state too), and to
what the cluster's admin allows beyond it (:class:`PodPolicy`: operator flags,
chart values ``pools.*``, which the chart's ValidatingAdmissionPolicy states
too). The operator checks both before it applies anything, so that a pool
admitted before a rule existed, or on a server without the policy, still
makes no pod outside them: the pool is Degraded (``PodTemplateNotAllowed``)
with the field and the rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pgw_operator.desired import disruption_of

TEMPLATE = "spec.worker.podTemplate"

# Pod Security "restricted": the only volume sources a pod may use.
RESTRICTED_VOLUME_SOURCES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)
# Pod Security "baseline": the SELinux types a pod may ask for (user and role never).
SELINUX_TYPES = ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
# Annotations that set a security profile outside securityContext.
PROFILE_ANNOTATION_PREFIXES = (
    "container.apparmor.security.beta.kubernetes.io/",
    "seccomp.security.alpha.kubernetes.io/",
)
DEFAULT_TOLERATION_KEYS = ("nvidia.com/gpu",)
DEFAULT_MAX_DRAIN_GRACE_S = 3600


@dataclass(frozen=True)
class PodPolicy:
    """What the cluster's admin allows pools beyond the fixed rules.

    Example:
        >>> PodPolicy().toleration_keys
        frozenset({'nvidia.com/gpu'})
    """

    service_accounts: frozenset[str] = frozenset()
    toleration_keys: frozenset[str] = frozenset(DEFAULT_TOLERATION_KEYS)
    priority_classes: frozenset[str] = frozenset()
    max_drain_grace_s: int = DEFAULT_MAX_DRAIN_GRACE_S


@dataclass(frozen=True)
class Violation:
    """One field of a pool that breaks one rule."""

    field: str
    rule: str

    def __str__(self) -> str:
        return f"{self.field}: {self.rule}"


@dataclass
class _Check:
    found: list[Violation] = field(default_factory=list)

    def require(self, ok: bool, where: str, rule: str) -> None:
        if not ok:
            self.found.append(Violation(where, rule))


def _security_context(check: _Check, where: str, context: Mapping[str, Any]) -> None:
    """Rules a pod and a container security context share."""
    check.require(
        context.get("runAsNonRoot", True) is not False,
        f"{where}.runAsNonRoot",
        "must stay true (the workers never run as root)",
    )
    check.require(context.get("runAsUser") != 0, f"{where}.runAsUser", "must not be 0 (root)")
    check.require(
        context.get("runAsGroup") != 0, f"{where}.runAsGroup", "must not be 0 (the root group)"
    )
    for profile in ("seccompProfile", "appArmorProfile"):
        kind = (context.get(profile) or {}).get("type")
        check.require(kind != "Unconfined", f"{where}.{profile}.type", "must not be Unconfined")
    check.require(
        "windowsOptions" not in context,
        f"{where}.windowsOptions",
        "is not allowed (Linux workers; hostProcess would run on the host)",
    )
    selinux = context.get("seLinuxOptions") or {}
    check.require(
        not selinux.get("user") and not selinux.get("role"),
        f"{where}.seLinuxOptions",
        "user and role must not be set (Pod Security baseline)",
    )
    check.require(
        selinux.get("type") in (None, "", *SELINUX_TYPES),
        f"{where}.seLinuxOptions.type",
        f"must be one of {', '.join(SELINUX_TYPES)}",
    )


def _pod_security_context(check: _Check, context: Mapping[str, Any]) -> None:
    where = f"{TEMPLATE}.securityContext"
    _security_context(check, where, context)
    check.require(context.get("fsGroup") != 0, f"{where}.fsGroup", "must not be 0 (the root group)")
    check.require(
        0 not in (context.get("supplementalGroups") or []),
        f"{where}.supplementalGroups",
        "must not hold 0 (the root group)",
    )
    check.require(
        not context.get("sysctls"),
        f"{where}.sysctls",
        "are not allowed (they change the node's kernel for every pod on it)",
    )


def _container_security_context(check: _Check, context: Mapping[str, Any]) -> None:
    where = f"{TEMPLATE}.containerSecurityContext"
    _security_context(check, where, context)
    check.require(
        not context.get("privileged"),
        f"{where}.privileged",
        "the worker container is never privileged",
    )
    check.require(
        not context.get("allowPrivilegeEscalation"),
        f"{where}.allowPrivilegeEscalation",
        "must stay false",
    )
    check.require(
        not (context.get("capabilities") or {}).get("add"),
        f"{where}.capabilities.add",
        "capabilities cannot be added (every capability is dropped)",
    )
    check.require(
        context.get("procMount") in (None, "Default"),
        f"{where}.procMount",
        "must be Default (an unmasked /proc exposes the host)",
    )


def _volumes(check: _Check, volumes: list[Mapping[str, Any]]) -> None:
    for i, volume in enumerate(volumes):
        for source in sorted(set(volume) - {"name"} - RESTRICTED_VOLUME_SOURCES):
            check.require(
                False,
                f"{TEMPLATE}.volumes[{i}].{source}",
                'is not a volume type Pod Security "restricted" allows (configMap, '
                "csi, downwardAPI, emptyDir, ephemeral, persistentVolumeClaim, "
                "projected, secret)",
            )
        sources = (volume.get("projected") or {}).get("sources") or []
        for j, projected in enumerate(sources):
            check.require(
                "serviceAccountToken" not in projected,
                f"{TEMPLATE}.volumes[{i}].projected.sources[{j}].serviceAccountToken",
                "is not allowed: worker pods get no Kubernetes API token",
            )


def _annotations(check: _Check, annotations: Mapping[str, Any]) -> None:
    for key in sorted(annotations):
        check.require(
            not key.startswith(PROFILE_ANNOTATION_PREFIXES),
            f"{TEMPLATE}.annotations[{key}]",
            "security profiles are set in securityContext, not by annotation",
        )


def _max_unavailable(check: _Check, spec: Mapping[str, Any]) -> None:
    value = disruption_of(spec)
    if value is None:
        return
    zero = value == 0 or (isinstance(value, str) and value.rstrip("%") in ("0", ""))
    check.require(
        not zero,
        "spec.disruption.maxUnavailable",
        "must be at least 1 (or 1%): 0 blocks every node drain on shared GPU nodes",
    )


def _admin_rules(
    check: _Check, spec: Mapping[str, Any], template: Mapping[str, Any], policy: PodPolicy
) -> None:
    def listed(value: Any, allowed: frozenset[str], where: str, what: str, flag: str) -> None:
        names = ", ".join(sorted(allowed)) or "none"
        check.require(
            value in allowed,
            where,
            f"{what} {value!r} is not one the admin allows ({flag}: {names})",
        )

    if template.get("serviceAccountName"):
        listed(
            template["serviceAccountName"],
            policy.service_accounts,
            f"{TEMPLATE}.serviceAccountName",
            "service account",
            "--allowed-service-account",
        )
    if template.get("priorityClassName"):
        listed(
            template["priorityClassName"],
            policy.priority_classes,
            f"{TEMPLATE}.priorityClassName",
            "priority class",
            "--allowed-priority-class",
        )
    for i, toleration in enumerate(template.get("tolerations") or []):
        where = f"{TEMPLATE}.tolerations[{i}]"
        if not toleration.get("key"):
            check.require(
                False,
                f"{where}.key",
                "must be set: a toleration without a key tolerates every taint",
            )
            continue
        listed(
            toleration["key"],
            policy.toleration_keys,
            f"{where}.key",
            "taint key",
            "--allowed-toleration-key",
        )
    grace = (spec.get("worker") or {}).get("drainGracePeriodSeconds")
    check.require(
        grace is None or int(grace) <= policy.max_drain_grace_s,
        "spec.worker.drainGracePeriodSeconds",
        f"must be at most {policy.max_drain_grace_s} (--max-drain-grace-seconds): "
        "a longer grace holds node drains",
    )


def violations(spec: Mapping[str, Any], policy: PodPolicy) -> list[Violation]:
    """Every field of a pool's spec that its pods may not have, in spec order.

    Args:
        spec: the pool's raw ``spec``.
        policy: what the admin allows beyond the fixed rules.

    Example:
        >>> spec = {"worker": {"podTemplate": {"volumes": [{"name": "n", "nfs": {}}]}}}
        >>> print(violations(spec, PodPolicy())[0].field)
        spec.worker.podTemplate.volumes[0].nfs
    """
    template = (spec.get("worker") or {}).get("podTemplate") or {}
    check = _Check()
    _volumes(check, template.get("volumes") or [])
    _pod_security_context(check, template.get("securityContext") or {})
    _container_security_context(check, template.get("containerSecurityContext") or {})
    _annotations(check, template.get("annotations") or {})
    _max_unavailable(check, spec)
    _admin_rules(check, spec, template, policy)
    return check.found


def first_violations(found: list[Violation], most: int = 3) -> Iterator[str]:
    """The first few, for a condition message of bounded size."""
    yield from (str(v) for v in found[:most])
    if len(found) > most:
        yield f"and {len(found) - most} more"
