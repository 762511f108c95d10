"""The package top exports the public API lazily: names resolve, Prefect loads only on use."""

from __future__ import annotations

import importlib

import pytest

import prefect_gpu_workers


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
