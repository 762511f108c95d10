"""The chart README is generated from values.yaml's `# --` comments and is current.

Needs only the pinned helm-docs (``hack/build-tools helm-docs``), no cluster.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from typing import Any

import yaml
from k8s.cluster import REPO_ROOT

from .conftest import CHART, tool_bin

ROW = re.compile(r"^\| (?P<key>[^ |]+) \| (?P<type>\w+) \| .* \| (?P<description>.*) \|$")


def readme_rows() -> dict[str, str]:
    """Key -> description, from the README's values table."""
    rows = {}
    for line in (CHART / "README.md").read_text().splitlines():
        match = ROW.match(line)
        if match and match["key"] != "Key":
            rows[match["key"]] = match["description"]
    return rows


def leaf_paths(values: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, f"{path}.")
        else:
            yield path


def schema_has(schema: dict[str, Any], path: str) -> bool:
    node = schema
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return False
    return True


def test_readme_is_what_helm_docs_generates_from_values() -> None:
    tool_bin("helm-docs")  # build the pinned generator once (cached)
    proc = subprocess.run(
        [str(REPO_ROOT / "hack" / "chart-docs"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"run hack/chart-docs:\n{proc.stderr}"


def test_every_value_is_documented_and_in_the_schema() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    rows = readme_rows()
    assert rows, "README.md has no values table"
    for key, description in rows.items():
        assert description.strip(), f"{key} has no `# --` description in values.yaml"
        assert schema_has(schema, key), f"{key} is documented but not in values.schema.json"
    # Every leaf value is in the table, itself or under a documented parent.
    for path in leaf_paths(values):
        parents = [".".join(path.split(".")[:i]) for i in range(1, path.count(".") + 2)]
        assert any(p in rows for p in parents), f"{path} is not documented in README.md"
