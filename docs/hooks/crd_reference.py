"""MkDocs hook: the GpuWorkerPool reference, generated from the CRD at build time.

A page that contains the marker line ``<!-- crd-reference: PATH -->`` (PATH
relative to the repository root) gets, in its place, one table per top-level
section of the CRD's OpenAPI schema: every field with its path, type, default,
bounds or allowed values, whether it is required, its description and the
CEL rules checked on it. The CRD is read on every build, so the page cannot
drift from ``crds/`` (it changes as fields are added; nothing is committed
that could go stale). ``mkdocs serve`` watches the CRD too.

The rendering (``reference_markdown``) is pure and tested in
``tests/unit/test_docs_crd_reference.py``; only the hook functions read files.

Example:
    >>> schema = {"type": "object", "properties": {"spec": {"type": "object",
    ...     "properties": {"replicas": {"type": "integer", "minimum": 0, "default": 1}}}}}
    >>> print(reference_markdown(schema).splitlines()[-1])
    | `spec.replicas` | integer | `1` | >= 0 |  |  |
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MARKER = re.compile(r"^<!-- crd-reference: (?P<path>\S+) -->$", re.M)
REPO_ROOT = Path(__file__).resolve().parents[2]
# The fields of every Kubernetes object, documented by Kubernetes, not here.
SKIPPED_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata"})
HEADER = (
    "| field | type | default | bounds / values | required | description |\n"
    "|---|---|---|---|---|---|"
)


@dataclass(frozen=True)
class Field:
    """One field of the schema, flattened: its dotted path and its schema node."""

    path: str
    node: dict[str, Any]
    required: bool


def fields(node: dict[str, Any], path: str = "", required: bool = False) -> Iterator[Field]:
    """Every field under ``node``, depth first, in the schema's own order.

    Array items are written ``path[]`` and map values ``path.<key>``, as
    ``kubectl explain`` reads them.

    Args:
        node: an OpenAPI v3 schema node (a dict as the CRD's YAML gives it).
        path: the dotted path of ``node`` itself ("" for the root).
        required: whether ``node`` is required by its parent.
    """
    if path:
        yield Field(path, node, required)
    needed = set(node.get("required", ()))
    for name, child in node.get("properties", {}).items():
        yield from fields(child, f"{path}.{name}" if path else name, name in needed)
    items = node.get("items")
    if isinstance(items, dict) and (items.get("properties") or items.get("items")):
        yield from fields_below(items, f"{path}[]")
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and (extra.get("properties") or extra.get("items")):
        yield from fields_below(extra, f"{path}.<key>")


def fields_below(node: dict[str, Any], path: str) -> Iterator[Field]:
    """The fields of an array item or map value, without a row for the item itself."""
    for child in fields(node, path):
        if child.path != path:
            yield child


def type_of(node: dict[str, Any]) -> str:
    """The field's type as a reader says it: ``array of string``, ``int or string``, ..."""
    if node.get("x-kubernetes-int-or-string"):
        return "int or string"
    kind = str(node.get("type", "any"))
    if kind == "array" and isinstance(node.get("items"), dict):
        return f"array of {type_of(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {type_of(node['additionalProperties'])}"
    if kind == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
        return "object (any fields)"
    if fmt := node.get("format"):
        return f"{kind} ({fmt})"
    return kind


def bounds_of(node: dict[str, Any]) -> str:
    """Enum values, numeric and length bounds and patterns, as one cell."""
    parts: list[str] = []
    if "enum" in node:
        parts.append("one of " + ", ".join(f"`{json.dumps(v)}`" for v in node["enum"]))
    for key, word in (("minimum", ">="), ("maximum", "<=")):
        if key in node:
            parts.append(f"{word} {node[key]}")
    for key, word in (
        ("minLength", "length >="),
        ("maxLength", "length <="),
        ("maxItems", "items <="),
        ("maxProperties", "keys <="),
    ):
        if key in node:
            parts.append(f"{word} {node[key]}")
    if "pattern" in node:
        parts.append(f"pattern `{node['pattern']}`")
    if keys := node.get("x-kubernetes-list-map-keys"):
        parts.append("unique by " + ", ".join(f"`{k}`" for k in keys))
    return "; ".join(parts)


def default_of(node: dict[str, Any]) -> str:
    """The schema default as JSON in a code span, or empty."""
    return f"`{json.dumps(node['default'])}`" if "default" in node else ""


def cell(text: str) -> str:
    """One table cell: one line, pipes escaped (Markdown tables split on them)."""
    return " ".join(text.split()).replace("|", "\\|")


def rules_of(node: dict[str, Any]) -> str:
    """The CEL rules' messages: what the API server refuses, in its own words."""
    messages = [
        str(rule.get("message") or f"`{rule['rule']}`")
        for rule in node.get("x-kubernetes-validations", ())
    ]
    return " ".join(f"Refused: {m}" for m in messages)


def row(field: Field) -> str:
    """The table row of one field."""
    description = " ".join(
        part for part in (str(field.node.get("description", "")), rules_of(field.node)) if part
    )
    cells = (
        f"`{field.path}`",
        type_of(field.node),
        default_of(field.node),
        bounds_of(field.node),
        "yes" if field.required else "",
        description,
    )
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def reference_markdown(schema: dict[str, Any]) -> str:
    """The reference of an ``openAPIV3Schema``: a section per top-level field, a table per child.

    Args:
        schema: the version's ``openAPIV3Schema``.

    Returns:
        Markdown: for ``spec`` and ``status``, a heading and the section's
        description, then for each of its fields a heading and a table of
        that field and every field below it.
    """
    sections: list[str] = []
    needed = set(schema.get("required", ()))
    for name, node in schema.get("properties", {}).items():
        if name in SKIPPED_TOP_LEVEL:
            continue
        required = "Required. " if name in needed else ""
        parts = [f"## `{name}`\n\n{required}{cell(str(node.get('description', '')))}"]
        below = set(node.get("required", ()))
        for child, child_node in node.get("properties", {}).items():
            path = f"{name}.{child}"
            rows = "\n".join(row(f) for f in fields(child_node, path, child in below))
            parts.append(f"### `{path}`\n\n{HEADER}\n{rows}")
        sections.append("\n\n".join(parts))
    return "\n\n".join(sections)


def crd_schema(path: Path) -> dict[str, Any]:
    """The served version's ``openAPIV3Schema`` of the CRD in ``path``.

    Raises:
        ValueError: the file holds no served version with a schema.
    """
    crd = yaml.safe_load(path.read_text(encoding="utf-8"))
    for version in crd["spec"]["versions"]:
        if version.get("served") and "schema" in version:
            return dict(version["schema"]["openAPIV3Schema"])
    raise ValueError(f"{path}: no served version with a schema")


def expand(markdown: str, root: Path = REPO_ROOT) -> str:
    """``markdown`` with every CRD marker replaced by that CRD's reference."""

    def reference(match: re.Match[str]) -> str:
        return reference_markdown(crd_schema(root / match.group("path")))

    return MARKER.sub(reference, markdown)


# MkDocs hook entry points (configured in mkdocs.yml `hooks:`).


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Generate the reference where a page asks for it."""
    return expand(markdown)


def on_serve(server: Any, **_: Any) -> Any:
    """``mkdocs serve`` rebuilds when the CRDs change."""
    server.watch(str(REPO_ROOT / "crds"))
    return server
