"""The Example sections of the packages' docstrings run as written (doctest):
the core's and the operator's.

An example that no longer matches its code misleads the reader who copies it;
examples that need a live server or a GPU say ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import pgw_operator
import prefect_gpu_workers

MODULES = sorted(
    info.name
    for package in (prefect_gpu_workers, pgw_operator)
    for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_the_examples_in_a_module_hold(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False, report=False)
    assert result.failed == 0, (
        f"{result.failed} example(s) in {name} fail: run pytest --doctest-modules on it"
    )
