"""The broker's wire protocol: malformed acquire messages get one line naming the field."""

from __future__ import annotations

import doctest
from typing import Any

import pytest

from prefect_gpu_workers.slots import grants, leases, wire
from prefect_gpu_workers.slots.wire import AcquireRequest, parse_acquire


@pytest.mark.parametrize("module", [grants, leases, wire], ids=lambda m: m.__name__)
def test_the_pure_modules_examples_hold(module: Any) -> None:
    assert doctest.testmod(module).failed == 0


def test_a_well_formed_acquire_is_read_as_it_is() -> None:
    holder = {"type": "flow_run", "id": "0b0f1c52-1f6b-4b0c-9a55-2f0f7e0f3d11"}
    message = {"op": "acquire", "limit": "gpu:w-1", "occupy": 2, "holder": holder}
    assert parse_acquire(message) == AcquireRequest("gpu:w-1", 2, holder)


def test_occupy_defaults_to_one_slot() -> None:
    assert parse_acquire({"limit": "gpu:w-1"}).occupy == 1


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"occupy": None}, "occupy must be a whole number of slots >= 1, got null"),
        ({"occupy": 1.5}, "occupy must be a whole number of slots >= 1, got 1.5"),
        ({"occupy": True}, "occupy must be a whole number of slots >= 1, got true"),
        ({"occupy": "2"}, 'occupy must be a whole number of slots >= 1, got "2"'),
        ({"occupy": 0}, "occupy must be a whole number of slots >= 1, got 0"),
        ({"limit": None}, "limit must be a limit's name, got null"),
        ({"limit": 7}, "limit must be a limit's name, got 7"),
        ({"limit": ""}, 'limit must be a limit\'s name, got ""'),
        ({"holder": "me"}, 'holder must be an object or null, got "me"'),
    ],
)
def test_a_malformed_field_is_named_in_one_line(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(") + "$") as raised:
        parse_acquire({"op": "acquire", "limit": "gpu:w-1", "occupy": 1, **fields})
    assert "\n" not in str(raised.value)
