"""The pipeline's pure parts: synthetic inputs, the model, the deployment's entrypoint."""

from __future__ import annotations

from pgw_flows.deploy import ENTRYPOINT, deployment_ref
from pgw_flows.model import INPUT_TOKENS, TOKEN_SPACE, synthetic_tokens
from pgw_flows.pipeline import gpu_pipeline


def test_synthetic_tokens_are_deterministic_and_in_range() -> None:
    first = synthetic_tokens(3)
    assert first == synthetic_tokens(3)
    assert first != synthetic_tokens(4)
    assert len(first) == INPUT_TOKENS
    assert all(0 <= token < TOKEN_SPACE for token in first)


def test_entrypoint_names_the_flow_function() -> None:
    module, _, name = ENTRYPOINT.rpartition(".")
    assert module == gpu_pipeline.fn.__module__
    assert name == gpu_pipeline.fn.__name__
    assert deployment_ref() == "gpu-pipeline/gpu-pipeline"
