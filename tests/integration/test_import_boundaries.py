"""What a fresh interpreter imports: the names and the operator's pure modules without
Prefect, the public API loading Prefect only on use, the operator on an install
without Prefect. Each test starts a Python process, so they live in this tier."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# The modules a Prefect-free install (the operator image) imports.
PREFECT_FREE_MODULES = (
    "prefect_gpu_workers",
    "prefect_gpu_workers.naming",
    "pgw_operator.plan",
    "pgw_operator.desired",
    "pgw_operator.sizing",
)

# Makes `import prefect` (and any submodule) fail in a subprocess, as on an
# install without Prefect.
_BLOCK_PREFECT = """
import importlib.abc, sys

class _NoPrefect(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "prefect" or name.startswith("prefect."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoPrefect())
"""


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_names_and_pure_operator_modules_do_not_import_prefect() -> None:
    imports = "".join(f"import {module}\n" for module in PREFECT_FREE_MODULES)
    result = _run_python(
        imports
        + "import sys\n"
        + 'print(sorted(m for m in sys.modules if m.partition(".")[0] == "prefect"))\n'
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_api_imports_prefect_only_when_a_prefect_name_is_used() -> None:
    result = _run_python(
        """
        import sys
        from prefect_gpu_workers import limit_name
        before = "prefect" in sys.modules
        from prefect_gpu_workers import gpu_slot
        print(before, "prefect" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("module", ["pgw_operator.handlers", "pgw_operator.__main__"])
def test_operator_imports_without_prefect_installed(module: str) -> None:
    result = _run_python(
        _BLOCK_PREFECT
        + f"""
import {module}
import prefect_gpu_workers
print(prefect_gpu_workers.limit_name("w1"))
"""
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "gpu:w1"
