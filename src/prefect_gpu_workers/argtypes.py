"""argparse types shared by every command line of the project (standard library only).

Each turns a bad value into ``argparse.ArgumentTypeError``, which argparse
reports as a usage error naming the option, before anything starts.
"""

from __future__ import annotations

import argparse

from prefect_gpu_workers.naming import parse_memory_mib, validate_limit_prefix


def positive_int(text: str) -> int:
    """An integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A number above 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A number of at least 0."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def limit_prefix(text: str) -> str:
    """A valid limit prefix (the part before the colon of a limit name)."""
    try:
        return validate_limit_prefix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def memory_size(text: str) -> str:
    """A memory size ("80GiB", "80Gi", "80GB"; a bare number is GiB), kept as written."""
    try:
        parse_memory_mib(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text
