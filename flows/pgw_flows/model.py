"""A tiny image classifier built in code, so the GPU step does real tensor work.

No weights are downloaded: the network is initialised from a fixed seed, which
makes its predictions deterministic for a given input. torch is imported here
only, and only when the real model runs, because importing it costs seconds of
CPU in every flow-run process.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Shape of one synthetic image: channels, height, width.
IMAGE_SHAPE = (3, 16, 16)
CLASSES = 10
_SEED = 1234


@dataclass(frozen=True)
class Predictions:
    labels: list[int]
    device: str


def synthetic_image(item: int) -> list[float]:
    """Deterministic pixel values in [0, 1) for item ``item`` (stands in for a download)."""
    size = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * IMAGE_SHAPE[2]
    # A linear congruential sequence: cheap, reproducible, no numpy needed.
    state = (item * 2654435761 + 1) % 2**32
    pixels = []
    for _ in range(size):
        state = (1664525 * state + 1013904223) % 2**32
        pixels.append(state / 2**32)
    return pixels


def _torch() -> Any:
    with warnings.catch_warnings():
        # torch warns once when numpy is absent; the model never touches numpy.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch
    return torch


def build_model() -> Any:
    """The tiny CNN on the CPU, same weights every time.

    Building it needs no GPU: callers do this before taking a GPU slot, so the
    slot covers only the work that uses the device.
    """
    torch = _torch()
    nn = torch.nn
    torch.manual_seed(_SEED)
    model = nn.Sequential(
        nn.Conv2d(IMAGE_SHAPE[0], 8, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    )
    model.eval()
    return model


def classify(images: Sequence[Sequence[float]], model: Any = None) -> Predictions:
    """Run the model on ``images``, on CUDA when available, else on the CPU.

    Everything that touches the device (CUDA context, weights, batch) happens
    here, inside the caller's GPU slot.
    """
    torch = _torch()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_device = (model if model is not None else build_model()).to(device)
    if not images:
        return Predictions(labels=[], device=str(device))
    batch = torch.tensor(list(images), dtype=torch.float32, device=device)
    batch = batch.reshape(len(images), *IMAGE_SHAPE)
    with torch.inference_mode():
        labels = on_device(batch).argmax(dim=1).tolist()
    return Predictions(labels=[int(label) for label in labels], device=str(device))
