"""The pipeline's pure parts: synthetic inputs, the tiny model, the deployment's entrypoint."""

from __future__ import annotations

from pgw_flows.deploy import ENTRYPOINT, deployment_ref
from pgw_flows.model import IMAGE_SHAPE, classify, synthetic_image
from pgw_flows.pipeline import gpu_pipeline


def test_synthetic_images_are_deterministic_and_in_range() -> None:
    first = synthetic_image(3)
    assert first == synthetic_image(3)
    assert first != synthetic_image(4)
    assert len(first) == IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    assert all(0.0 <= value < 1.0 for value in first)


def test_tiny_model_classifies_deterministically() -> None:
    images = [synthetic_image(i) for i in range(5)]
    predictions = classify(images)
    assert len(predictions.labels) == 5
    assert all(0 <= label < 10 for label in predictions.labels)
    assert predictions.device in ("cpu", "cuda", "cuda:0")
    assert classify(images).labels == predictions.labels
    assert classify([]).labels == []


def test_entrypoint_names_the_flow_function() -> None:
    module, _, name = ENTRYPOINT.rpartition(".")
    assert module == gpu_pipeline.fn.__module__
    assert name == gpu_pipeline.fn.__name__
    assert deployment_ref() == "gpu-pipeline/gpu-pipeline"
