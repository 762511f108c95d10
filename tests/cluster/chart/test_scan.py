"""checkov, the scanner security teams run on manifests, finds nothing in what this
project deploys (``hack/scan``): every finding is fixed, or skipped in the manifest
itself with a one-line reason."""

from __future__ import annotations

import re

from k8s.cluster import REPO_ROOT, run

from pgw_operator.desired import SCANNER_NOTES

from .conftest import CHART


def test_checkov_finds_nothing_that_is_neither_fixed_nor_skipped_with_a_reason() -> None:
    proc = run([str(REPO_ROOT / "hack" / "scan")], timeout=900)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert re.search(r"Failed checks: 0\b", output), output
    passed = int(re.search(r"Passed checks: (\d+)", output).group(1))  # type: ignore[union-attr]
    assert passed > 150, output  # it scanned both manifests, not nothing


def test_each_skip_names_its_check_and_a_reason() -> None:
    template = (CHART / "templates" / "deployment.yaml").read_text()
    chart_skips = re.findall(r"checkov\.io/skip\d+: (.*)", template)
    assert len(chart_skips) == 3
    for note in [*chart_skips, *SCANNER_NOTES.values()]:
        check, _, reason = note.partition("=")
        assert re.fullmatch(r"CKV2?_K8S_\d+", check), note
        assert len(reason.split()) >= 5, f"a skip needs a reason: {note}"
