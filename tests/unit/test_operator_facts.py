"""Facts read from pod bodies (``pgw_operator.facts``)."""

from __future__ import annotations

import pytest

from pgw_operator.facts import PodFacts

from builders import pod


def test_pod_facts_read_the_deletion_cost() -> None:
    meta = {"annotations": {"controller.kubernetes.io/pod-deletion-cost": "3"}}
    facts = PodFacts.from_pod("p", {"nodeName": "n"}, {"phase": "Running"}, meta)
    assert facts.deletion_cost == 3
    assert PodFacts.from_pod("p", {}, {}, {}).deletion_cost is None


@pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
def test_finished_pods_are_not_workers(phase: str) -> None:
    assert pod("a", phase=phase).finished
