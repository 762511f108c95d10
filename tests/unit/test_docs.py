"""The README stays short and the docs site stays whole: commands, nav, moved blocks.

Pure reads of README.md, mkdocs.yml and docs/ (no MkDocs build: `hack/docs`
builds the site strictly, which also fails on broken links and anchors).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCS = REPO_ROOT / "docs"
README = REPO_ROOT / "README.md"
GETTING_STARTED = DOCS / "index.md"
MAX_README_LINES = 250


class _Loader(yaml.SafeLoader):
    """A safe loader that reads mkdocs.yml's `!!python/name:` tags as plain text."""


_Loader.add_multi_constructor(
    "tag:yaml.org,2002:python/name:", lambda loader, suffix, node: f"python/name:{suffix}"
)


def mkdocs_config() -> dict[str, Any]:
    return dict(yaml.load((REPO_ROOT / "mkdocs.yml").read_text(), Loader=_Loader))


def nav_pages(nav: Any) -> list[str]:
    """Every page path in a MkDocs nav (nested lists of {title: path or list})."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


def first_bash_block(text: str) -> list[str]:
    """The command lines of the first fenced bash block."""
    match = re.search(r"```bash\n(.*?)\n```", text, re.S)
    assert match, "no bash block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def test_readme_is_under_250_lines() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, f"README.md has {len(lines)} lines"


def test_readme_two_commands_are_in_getting_started_as_written() -> None:
    commands = first_bash_block(README.read_text())
    assert [line.split()[0] for line in commands] == ["./hack/demo", "./hack/test"]
    assert first_bash_block(GETTING_STARTED.read_text()) == commands


def test_every_doc_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    pages = nav_pages(mkdocs_config()["nav"])
    on_disk = sorted(
        str(path.relative_to(DOCS)) for path in DOCS.rglob("*.md") if "hooks" not in path.parts
    )
    assert sorted(pages) == on_disk
    assert len(pages) == len(set(pages)), "a page is in the nav twice"


def test_the_pool_reference_is_generated_by_the_configured_hook() -> None:
    config = mkdocs_config()
    assert "docs/hooks/crd_reference.py" in config["hooks"]
    assert config["strict"] is True
    page = (DOCS / "kubernetes" / "pool-reference.md").read_text()
    assert "<!-- crd-reference: crds/gpuworkerpools.gpuworkers.dev.yaml -->" in page


def test_readme_links_point_at_doc_pages_that_exist() -> None:
    links = re.findall(r"\]\((docs/[^)#]+)", README.read_text())
    assert links, "README links into no doc page"
    assert [link for link in links if not (REPO_ROOT / link).is_file()] == []


def test_the_dev_cluster_walkthrough_block_is_in_the_docs() -> None:
    """tests/cluster/chart/test_readme.py runs the block after this marker."""
    page = (DOCS / "kubernetes" / "try-it.md").read_text()
    start = page.index("<!-- dev-cluster walkthrough")
    block = re.compile(r"```bash\n(.*?)\n```", re.S).search(page, start)
    assert block
    assert re.search(r"^RELEASE=\S+", block.group(1), re.M)
    assert re.search(r"^NS=\S+", block.group(1), re.M)


def test_every_worker_and_operator_metric_family_is_documented() -> None:
    from prometheus_client import REGISTRY

    from pgw_operator import metrics as operator_metrics
    from prefect_gpu_workers.slots.metrics import EXPORTED

    operations = (DOCS / "operations.md").read_text()
    operator_families = {
        metric.name.removesuffix("_total") if metric.type == "counter" else metric.name
        for metric in REGISTRY.collect()
        if metric.name.startswith("pgw_")
    }
    assert operator_metrics.LEADER is not None  # imported for its registrations
    documented = set(re.findall(r"`(pgw_[a-z_]+)`", operations))
    missing = {
        name
        for name in set(EXPORTED) | operator_families
        if name not in documented and f"{name}_total" not in documented
    }
    assert missing == set()
