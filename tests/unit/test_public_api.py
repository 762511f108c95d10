"""The package top exports the public API lazily: names resolve, Prefect loads only on use."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import prefect_gpu_workers

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


def test_all_lists_exactly_the_lazy_exports() -> None:
    assert set(prefect_gpu_workers.__all__) == {"__version__", *prefect_gpu_workers._EXPORTS}
    assert len(prefect_gpu_workers.__all__) == len(set(prefect_gpu_workers.__all__))


@pytest.mark.parametrize("name", sorted(prefect_gpu_workers._EXPORTS))
def test_public_name_is_the_object_its_module_defines(name: str) -> None:
    module = importlib.import_module(f"prefect_gpu_workers.{prefect_gpu_workers._EXPORTS[name]}")
    assert getattr(prefect_gpu_workers, name) is getattr(module, name)
    assert name in dir(prefect_gpu_workers)


def test_documented_import_line_works() -> None:
    from prefect_gpu_workers import GpuLimitUnavailable, agpu_slot, gpu_slot, limit_name

    assert limit_name("pool-abc-123") == "gpu:pool-abc-123"
    assert issubclass(GpuLimitUnavailable, RuntimeError)
    assert callable(gpu_slot)
    assert callable(agpu_slot)


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'gpu_slots'"):
        _ = prefect_gpu_workers.gpu_slots


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
