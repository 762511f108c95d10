"""A transformer encoder built in code, so the GPU step does real, sustained GPU work.

No weights are downloaded: the network is initialised from a fixed seed, so its
predictions for a given input are deterministic. Two sizes:

- ``encoder-base`` on CUDA: BERT-base-sized (12 layers, width 768, 12 heads,
  about 109 M parameters), bfloat16 (float16 where bfloat16 is not supported),
  batches of 64 sequences of 256 tokens, about 3 TFLOP per batch. The GPU step
  runs a fixed number of batches, calibrated once so that the work takes about
  ``gpu_s`` on an idle GPU: the step is timed by work done, so when too many
  steps share the GPU each one takes longer instead of sleeping less.
- ``encoder-tiny`` on the CPU: 2 layers, width 128, on one thread. On a machine
  without a GPU the step does at most :data:`CPU_WORK_CAP_S` of real work and
  the pipeline sleeps out the rest, so the demo stays light on a small box.

torch is imported inside functions only: importing it costs seconds of CPU in
every flow-run process, and simulated runs never need it. This module imports
neither Prefect nor the core, so ``hack/gpu-check`` runs it in a bare CUDA image.

Calibration (:func:`calibrate`) measures seconds per batch on the device after
a warm-up; ``python -m pgw_flows.model calibrate --seconds S`` does it in a
process of its own and prints JSON (the demo runs this once, before any flow
run and outside every slot, and passes the batch count to the runs).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# Tokens per downloaded item; the model tiles or cuts them to its sequence length.
INPUT_TOKENS = 64
CLASSES = 10
_SEED = 1234
# Synthetic token ids lie below this; each model takes them modulo its vocabulary.
TOKEN_SPACE = 2**15
# Without a GPU the step's real work stops here; the pipeline sleeps out the rest.
CPU_WORK_CAP_S = 0.5
CPU_THREADS = 1
CACHE_DIR_ENV = "PGW_CACHE_DIR"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of the encoder and of one batch."""

    name: str
    vocab: int
    width: int
    layers: int
    heads: int
    ffn: int
    seq_len: int
    batch_size: int

    @property
    def parameters(self) -> int:
        """Parameter count (embeddings, layers, head), for reports."""
        per_layer = 4 * self.width * self.width + 2 * self.width * self.ffn
        per_layer += 4 * self.width + self.ffn + self.width + 4 * self.width  # biases, norms
        embeddings = (self.vocab + self.seq_len) * self.width
        return embeddings + self.layers * per_layer + 2 * self.width + (self.width + 1) * CLASSES

    @property
    def flop_per_batch(self) -> float:
        """Forward FLOP of one batch (matmuls and attention, 2 per multiply-add)."""
        tokens = self.batch_size * self.seq_len
        dense = 2 * tokens * self.layers * (4 * self.width**2 + 2 * self.width * self.ffn)
        attention = 4 * self.batch_size * self.layers * self.seq_len**2 * self.width
        return float(dense + attention)


CUDA_CONFIG = EncoderConfig(
    "encoder-base", vocab=30522, width=768, layers=12, heads=12, ffn=3072, seq_len=256,
    batch_size=64,
)  # fmt: skip
CPU_CONFIG = EncoderConfig(
    "encoder-tiny", vocab=1024, width=128, layers=2, heads=4, ffn=256, seq_len=64, batch_size=8
)


@dataclass(frozen=True)
class Predictions:
    labels: list[int]
    device: str


@dataclass(frozen=True)
class WorkDone:
    """What one GPU step did on its device."""

    labels: list[int]
    device: str
    config: str
    batches: int
    seconds: float
    # From the device allocator since the step began; None on the CPU.
    peak_memory_mib: float | None
    # Bytes set aside for the step's working set (see ``memory_fraction``).
    reserved_mib: float


@dataclass(frozen=True)
class Calibration:
    """Seconds per batch measured on one device, and the batches that make a target."""

    config: str
    device: str
    device_name: str
    seconds_per_batch: float
    target_s: float
    batches: int
    tflops: float


def batches_for(target_s: float, seconds_per_batch: float) -> int:
    """The fewest whole batches whose work takes at least ``target_s`` (at least one).

    Example:
        >>> batches_for(3.0, 0.02)
        150
    """
    if seconds_per_batch <= 0:
        raise ValueError(f"seconds per batch must be positive, got {seconds_per_batch}")
    if target_s <= 0:
        return 1
    # The small epsilon keeps 3.0 / 0.02 = 150.00000000000003 at 150 batches.
    return max(1, math.ceil(target_s / seconds_per_batch - 1e-9))


def work_target_s(gpu_s: float, device_type: str) -> float:
    """Seconds of real work a GPU step does: all of ``gpu_s`` on CUDA, capped on the CPU."""
    return gpu_s if device_type == "cuda" else min(gpu_s, CPU_WORK_CAP_S)


def synthetic_tokens(item: int, length: int = INPUT_TOKENS) -> list[int]:
    """Deterministic token ids in ``[0, TOKEN_SPACE)`` for ``item`` (stands in for a download)."""
    # A linear congruential sequence: cheap, reproducible, no numpy needed.
    state = (item * 2654435761 + 1) % 2**32
    tokens = []
    for _ in range(length):
        state = (1664525 * state + 1013904223) % 2**32
        tokens.append(state >> 17)  # the top 15 bits
    return tokens


def _torch() -> Any:
    with warnings.catch_warnings():
        # torch warns once when numpy is absent; the model never touches numpy.
        warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
        import torch
    return torch


def cuda_available() -> bool:
    """Whether torch sees a CUDA device (loads the driver, creates no context)."""
    return bool(_torch().cuda.is_available())


def default_device() -> str:
    return "cuda" if cuda_available() else "cpu"


def config_for(device: str) -> EncoderConfig:
    """``encoder-base`` on CUDA, ``encoder-tiny`` elsewhere."""
    return CUDA_CONFIG if device.startswith("cuda") else CPU_CONFIG


@functools.cache
def _encoder_class() -> Any:
    torch = _torch()
    nn = torch.nn

    class Encoder(nn.Module):  # type: ignore[name-defined,misc]
        """Token + position embeddings, a pre-norm encoder stack, mean-pooled class head."""

        def __init__(self, config: EncoderConfig) -> None:
            super().__init__()
            self.tokens = nn.Embedding(config.vocab, config.width)
            self.positions = nn.Embedding(config.seq_len, config.width)
            layer = nn.TransformerEncoderLayer(
                config.width,
                config.heads,
                config.ffn,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(config.width)
            self.head = nn.Linear(config.width, CLASSES)

        def forward(self, ids: Any) -> Any:
            positions = torch.arange(ids.shape[1], device=ids.device)
            hidden = self.encoder(self.tokens(ids) + self.positions(positions))
            return self.head(self.norm(hidden).mean(dim=1))

    return Encoder


def build_model(config: EncoderConfig | None = None) -> Any:
    """The encoder on the CPU in float32, same weights every time.

    Building it needs no GPU: callers do this before taking a GPU slot, so the
    slot covers only the work that uses the device.
    """
    torch = _torch()
    config = config or config_for(default_device())
    with _seeded(torch):
        model = _encoder_class()(config)
    model.eval()
    return model


@contextlib.contextmanager
def _seeded(torch: Any) -> Iterator[None]:
    # fork_rng: the fixed seed must not leak into the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def _dtype(torch: Any, device: str) -> Any:
    if not device.startswith("cuda"):
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Engine:
    """The model on one device with its input generator: runs batches, measures them.

    Everything that touches the device (CUDA context, weights, batches, the
    memory set aside) happens from the constructor on, so callers create it
    inside their GPU slot.
    """

    def __init__(
        self,
        model: Any,
        config: EncoderConfig,
        device: str,
        *,
        float32: bool = False,
    ) -> None:
        torch = self._torch = _torch()
        self.config = config
        self.device = torch.device(device)
        if self.device.type == "cpu":
            # One thread: two concurrent steps must not fight over a small box's cores.
            torch.set_num_threads(CPU_THREADS)
        dtype = torch.float32 if float32 else _dtype(torch, device)
        self.model = model.to(device=self.device, dtype=dtype)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(_SEED)
        self._reserved: Any = None

    @property
    def name(self) -> str:
        return str(self.device)

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return str(self._torch.cuda.get_device_name(self.device))
        return "cpu"

    def _inputs(self, items: Sequence[Sequence[int]]) -> Any:
        """One batch: ``items`` (tiled to the sequence length) first, random ids after."""
        torch, config = self._torch, self.config
        ids = torch.randint(
            0,
            config.vocab,
            (config.batch_size, config.seq_len),
            device=self.device,
            generator=self._generator,
        )
        if items:
            rows = [_fit(tokens, config.seq_len, config.vocab) for tokens in items]
            ids[: len(rows)] = torch.tensor(rows, dtype=ids.dtype, device=self.device)
        return ids

    def _forward(self, ids: Any) -> Any:
        with self._torch.inference_mode():
            return self.model(ids)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._torch.cuda.synchronize(self.device)

    def reserve(self, memory_fraction: float) -> float:
        """Set memory aside so that the step holds ``memory_fraction`` of the device.

        Stands for the working set a real step sizes to its share of the GPU
        (as inference servers pre-allocate their KV cache): the allocator peak
        so far counts toward it. Returns the MiB set aside; 0 on the CPU. Too
        many steps on one GPU then fail here with ``torch.OutOfMemoryError``.
        """
        if memory_fraction <= 0 or self.device.type != "cuda":
            return 0.0
        torch = self._torch
        total = torch.cuda.get_device_properties(self.device).total_memory
        wanted = int(memory_fraction * total) - int(torch.cuda.max_memory_allocated(self.device))
        if wanted <= 0:
            return 0.0
        self._reserved = torch.empty(wanted, dtype=torch.uint8, device=self.device)
        return wanted / _MIB

    def release(self) -> None:
        self._reserved = None

    def close(self) -> None:
        """Give the device memory back before the slot is released.

        torch's caching allocator keeps freed blocks for the process, and a
        flow run's process lives on through its save stage: without this, the
        memory the step set aside would still be held when the next step gets
        the slot. The weights go back to the CPU; the CUDA context stays
        until the process exits.
        """
        self.release()
        if self.device.type == "cuda":
            self.model.to("cpu")
            self._torch.cuda.empty_cache()

    def run(
        self, batches: int, items: Sequence[Sequence[int]] = (), memory_fraction: float = 0.0
    ) -> WorkDone:
        """Run ``batches`` batches (more if ``items`` fill more), labels for ``items``.

        Batches are queued without waiting for each other, so the device never
        idles between them; one synchronisation at the end.
        """
        start = time.perf_counter()
        per_batch = self.config.batch_size
        chunks = [list(items[i : i + per_batch]) for i in range(0, len(items), per_batch)]
        total = max(batches, len(chunks), 1)
        labels: list[Any] = []
        reserved = 0.0
        try:
            for index in range(total):
                chunk = chunks[index] if index < len(chunks) else []
                logits = self._forward(self._inputs(chunk))
                if chunk:
                    labels.append(logits[: len(chunk)].argmax(dim=1))
                if index == 0:
                    # After the first batch, whose activations count toward the share.
                    reserved = self.reserve(memory_fraction)
            self.synchronize()
            values = [int(label) for part in labels for label in part.tolist()]
        finally:
            self.release()
        return WorkDone(
            labels=values,
            device=self.name,
            config=self.config.name,
            batches=total,
            seconds=time.perf_counter() - start,
            peak_memory_mib=peak_memory_mib(self.name),
            reserved_mib=reserved,
        )

    def seconds_per_batch(self, probe_s: float) -> float:
        """Seconds one batch takes here, after a warm-up, measured over at least ``probe_s``."""
        for _ in range(2):  # kernel loading, allocator, autotuning
            self._forward(self._inputs([]))
        self.synchronize()
        count = 1
        while True:
            start = time.perf_counter()
            for _ in range(count):
                self._forward(self._inputs([]))
            self.synchronize()
            elapsed = time.perf_counter() - start
            if elapsed >= probe_s or count >= 4096:
                return elapsed / count
            count *= 2


def _fit(tokens: Sequence[int], length: int, vocab: int) -> list[int]:
    if not tokens:
        return [0] * length
    repeats = -(-length // len(tokens))
    return [token % vocab for token in (list(tokens) * repeats)[:length]]


def peak_memory_mib(device: str) -> float | None:
    """The device allocator's peak since the last reset, in MiB; None off CUDA."""
    if not device.startswith("cuda"):
        return None
    torch = _torch()
    return float(torch.cuda.max_memory_allocated(torch.device(device))) / _MIB


def device_uuid(device: str) -> str | None:
    """The CUDA device's UUID as NVML writes it ("GPU-..."); None off CUDA or where
    torch cannot say (its ``uuid`` property is recent)."""
    if not device.startswith("cuda"):
        return None
    torch = _torch()
    with contextlib.suppress(Exception):
        return f"GPU-{torch.cuda.get_device_properties(torch.device(device)).uuid}"
    return None


def reset_peak_memory(device: str) -> None:
    """Start a new peak (``torch.cuda.reset_peak_memory_stats``); nothing off CUDA."""
    if device.startswith("cuda"):
        torch = _torch()
        torch.cuda.reset_peak_memory_stats(torch.device(device))


def classify(
    items: Sequence[Sequence[int]],
    model: Any = None,
    *,
    config: EncoderConfig | None = None,
    device: str | None = None,
    float32: bool = False,
) -> Predictions:
    """Labels for ``items`` (token ids) in one pass, on CUDA when available, else the CPU."""
    device = device or default_device()
    config = config or config_for(device)
    if not items:
        return Predictions(labels=[], device=device)
    engine = Engine(model if model is not None else build_model(config), config, device,
                    float32=float32)  # fmt: skip
    done = engine.run(1, items)
    return Predictions(labels=done.labels, device=done.device)


def calibrate(
    target_s: float,
    *,
    device: str | None = None,
    config: EncoderConfig | None = None,
    model: Any = None,
    probe_s: float | None = None,
) -> Calibration:
    """Measure this device and pick the batches whose work takes ``work_target_s(target_s)``.

    The probe runs at least ``probe_s`` of batches (default: a tenth of the
    target, between 0.1 and 1 s) after two warm-up batches.
    """
    device = device or default_device()
    config = config or config_for(device)
    target = work_target_s(target_s, "cuda" if device.startswith("cuda") else "cpu")
    engine = Engine(model if model is not None else build_model(config), config, device)
    probe = probe_s if probe_s is not None else min(1.0, max(0.1, target / 10))
    seconds = engine.seconds_per_batch(probe)
    return Calibration(
        config=config.name,
        device=engine.name,
        device_name=engine.device_name(),
        seconds_per_batch=seconds,
        target_s=target,
        batches=batches_for(target, seconds),
        tflops=config.flop_per_batch / seconds / 1e12,
    )


def cache_dir() -> Path:
    """Where calibrations are kept: ``$PGW_CACHE_DIR``, else ``~/.cache/prefect-gpu-workers``."""
    value = os.environ.get(CACHE_DIR_ENV)
    if value:
        return Path(value)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prefect-gpu-workers"


def cached_seconds_per_batch(engine: Engine, probe_s: float, directory: Path) -> float:
    """Seconds per batch for this device and model, measured once and kept in ``directory``.

    For flow runs that were given no batch count: each flow run is a process
    of its own, so the cache is a file (written atomically; two first runs may
    both measure, and either result is fine).
    """
    key = f"{engine.config.name}-{engine.device_name()}-torch{engine._torch.__version__}"
    path = directory / "calibration" / (_safe(key) + ".json")
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return float(json.loads(path.read_text(encoding="utf-8"))["seconds_per_batch"])
    seconds = engine.seconds_per_batch(probe_s)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "seconds_per_batch": seconds}), "utf-8")
        partial.replace(path)
    return seconds


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pgw_flows.model")
    commands = parser.add_subparsers(dest="command", required=True)
    cal = commands.add_parser("calibrate", help="measure batches per second; print JSON")
    cal.add_argument("--seconds", type=float, required=True, help="work target per GPU step")
    cal.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    args = parser.parse_args(argv)
    result = calibrate(args.seconds, device=args.device)
    print(json.dumps(asdict(result), sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
