"""Tests against the dev control plane (hack/dev-cluster); all marked ``cluster``."""
