"""The flow's parameters are defined once: the signature agrees with ``PipelineParams``."""

from __future__ import annotations

import dataclasses
import inspect

from pgw_flows.params import PipelineParams
from pgw_flows.pipeline import gpu_pipeline


def test_flow_signature_is_pipeline_params() -> None:
    signature = inspect.signature(gpu_pipeline.fn)
    fields = {f.name: f.default for f in dataclasses.fields(PipelineParams)}
    assert {name: p.default for name, p in signature.parameters.items()} == fields
    hints = inspect.get_annotations(gpu_pipeline.fn)
    assert {f.name: f.type for f in dataclasses.fields(PipelineParams)} == {
        name: hints[name] for name in fields
    }


def test_parameters_leave_out_none_so_the_flow_falls_back() -> None:
    params = PipelineParams(items=2, simulate=True)
    parameters = params.as_parameters()
    assert "limit_prefix" not in parameters
    assert "record_dir" not in parameters
    assert "artifacts" not in parameters  # the worker's PGW_ARTIFACTS decides, else on
    assert parameters["items"] == 2
    assert parameters["simulate"] is True
    named = PipelineParams(limit_prefix="infer", record_dir="/r").as_parameters()
    assert (named["limit_prefix"], named["record_dir"]) == ("infer", "/r")
    # Every parameter the flow takes can be given, and no other.
    every = dataclasses.replace(
        params, limit_prefix="x", record_dir="/r", gpu_batches=3, gpu_memory="8GiB",
        gpu_also={"licence:x": 1}, artifacts=False,
    )  # fmt: skip
    assert set(every.as_parameters()) == set(inspect.signature(gpu_pipeline.fn).parameters)
