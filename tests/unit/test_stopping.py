"""A stop's waits and the signals that hurry them (prefect_gpu_workers.stopping)."""

from __future__ import annotations

import doctest
import signal
import threading

import pytest

from prefect_gpu_workers import stopping
from prefect_gpu_workers.stopping import StopSignals, installed_hurry, wait_until


def test_the_module_s_examples_hold() -> None:
    assert doctest.testmod(stopping).failed == 0


def test_a_wait_ends_when_its_condition_holds() -> None:
    answers = iter([False, False, True])
    assert wait_until(lambda: next(answers), 3600.0, poll_s=0.001)


def test_a_wait_ends_false_at_its_grace() -> None:
    assert not wait_until(lambda: False, 0.0)


def test_a_hurry_set_from_another_thread_ends_a_long_wait() -> None:
    hurry = threading.Event()
    timer = threading.Timer(0.05, hurry.set)
    timer.start()
    try:
        # An hour's grace: only the hurry can end it before pytest's timeout.
        assert not wait_until(lambda: False, 3600.0, hurry)
    finally:
        timer.cancel()


def test_only_the_first_signal_interrupts() -> None:
    signals = StopSignals()
    with pytest.raises(KeyboardInterrupt):
        signals(signal.SIGINT, None)
    assert not signals.hurry.is_set()
    signals(signal.SIGTERM, None)
    signals(signal.SIGINT, None)
    assert signals.hurry.is_set()
    assert signals.received == 3


def test_installed_hurry_is_the_handler_s_or_a_fresh_event() -> None:
    signals = StopSignals()
    previous = signal.signal(signal.SIGINT, signals)
    try:
        assert installed_hurry() is signals.hurry
    finally:
        signal.signal(signal.SIGINT, previous)
    fresh = installed_hurry()
    assert fresh is not signals.hurry
    assert not fresh.is_set()
