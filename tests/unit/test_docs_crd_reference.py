"""The pool reference hook (docs/hooks/crd_reference.py): every CRD field, with its facts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD = REPO_ROOT / "crds" / "gpuworkerpools.gpuworkers.dev.yaml"


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    """The hook module, loaded from its file as MkDocs loads it."""
    path = REPO_ROOT / "docs" / "hooks" / "crd_reference.py"
    spec = importlib.util.spec_from_file_location("pgw_docs_crd_reference", path)
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def all_paths(node: dict[str, Any], path: str = "") -> set[str]:
    """Every field path of a schema, written independently of the hook's walk."""
    found = {path} if path else set()
    for name, child in node.get("properties", {}).items():
        found |= all_paths(child, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        found |= all_paths(node["items"], f"{path}[]") - {f"{path}[]"}
    if isinstance(node.get("additionalProperties"), dict):
        found |= all_paths(node["additionalProperties"], f"{path}.<key>") - {f"{path}.<key>"}
    return found


def test_every_field_of_the_crd_has_a_row(hook: ModuleType) -> None:
    schema = hook.crd_schema(CRD)
    markdown = hook.reference_markdown(schema)
    # The top-level fields are sections (a heading each), everything below them a row.
    expected = {p for p in all_paths(schema) if "." in p or "[" in p}
    expected = {p for p in expected if p.split(".")[0] not in ("apiVersion", "kind", "metadata")}
    rows = {line.split("`")[1] for line in markdown.splitlines() if line.startswith("| `")}
    assert expected - rows == set()
    assert "## `spec`" in markdown
    assert "## `status`" in markdown
    assert "spec.replicas" in rows
    assert "status.conditions[].type" in rows


def test_a_row_gives_type_default_bounds_required_description_and_rules(
    hook: ModuleType,
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "required": ["mode"],
                "properties": {
                    "mode": {
                        "type": "string",
                        "enum": ["a", "b"],
                        "default": "a",
                        "description": "Which | one.",
                        "x-kubernetes-validations": [{"rule": "true", "message": "never b"}],
                    },
                    "size": {"x-kubernetes-int-or-string": True, "minimum": 1, "maximum": 9},
                    "tags": {"type": "array", "maxItems": 3, "items": {"type": "string"}},
                },
            }
        },
    }
    lines = hook.reference_markdown(schema).splitlines()
    assert (
        '| `spec.mode` | string | `"a"` | one of `"a"`, `"b"` | yes '
        "| Which \\| one. Refused: never b |"
    ) in lines
    assert "| `spec.size` | int or string |  | >= 1; <= 9 |  |  |" in lines
    assert "| `spec.tags` | array of string |  | items <= 3 |  |  |" in lines
    assert "### `spec.mode`" in lines


def test_the_marker_is_replaced_and_other_text_kept(hook: ModuleType) -> None:
    page = "# Pool reference\n\n<!-- crd-reference: crds/gpuworkerpools.gpuworkers.dev.yaml -->\n"
    out = hook.expand(page, REPO_ROOT)
    assert out.startswith("# Pool reference\n\n## `spec`")
    assert "crd-reference" not in out


def test_a_crd_without_a_served_schema_is_an_error(hook: ModuleType, tmp_path: Path) -> None:
    crd = tmp_path / "crd.yaml"
    crd.write_text("spec:\n  versions:\n    - {name: v1, served: false}\n")
    with pytest.raises(ValueError, match="no served version"):
        hook.crd_schema(crd)
