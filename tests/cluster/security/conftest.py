"""Fixtures of the security tier: the dev cluster and Prefect of tests/cluster/k8s."""

from __future__ import annotations

from k8s.conftest import (  # noqa: F401  (the shared fixtures)
    dev_cluster,
    node_group,
)
