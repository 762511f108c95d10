"""The slot broker on the virtual clock: one scenario each, against the model of
Prefect (``tests/slot_simulation``), in milliseconds of real time."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from slot_simulation import loop as virtual
from slot_simulation.prefect_model import FaultRates, ModelTransport, PrefectModel, seeded_ids
from slot_simulation.simulate import LIMIT, broker_on_model, connect

from prefect_gpu_workers.slots import broker as broker_module
from prefect_gpu_workers.slots.broker import FIRST_MESSAGE_S, SlotBroker
from prefect_gpu_workers.slots.wire import decode, encode

T = TypeVar("T")


def with_broker(
    body: Callable[[SlotBroker, PrefectModel], Awaitable[T]], capacity: int = 2, **options: Any
) -> T:
    async def main() -> T:
        rng = random.Random(0)
        model = PrefectModel(asyncio.get_running_loop().time, seeded_ids(rng))
        model.create_limit(LIMIT, capacity)
        async with broker_on_model(ModelTransport(model, rng, FaultRates()), **options) as broker:
            return await body(broker, model)

    return virtual.run(main())


def test_a_connection_that_says_nothing_is_told_why_and_closed() -> None:
    async def body(broker: SlotBroker, model: PrefectModel) -> tuple[dict[str, Any], float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        reader, _writer, serving = connect(broker)
        line = await reader.readline()
        await serving
        return decode(line), loop.time() - start

    message, waited = with_broker(body)
    assert message["event"] == "error"
    assert message["kind"] == "bad_request"
    assert message["message"] == f"no request within {FIRST_MESSAGE_S:g} s"
    assert waited == pytest.approx(FIRST_MESSAGE_S)


def test_connections_beyond_the_cap_are_refused_as_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "MAX_CONNECTIONS", 2)

    async def body(broker: SlotBroker, model: PrefectModel) -> list[dict[str, Any]]:
        answers = []
        for _ in range(2):  # two steps that hold a slot each: the cap
            reader, writer, _ = connect(broker)
            writer.write(encode({"op": "acquire", "limit": LIMIT, "occupy": 1}))
            answers.append(decode(await reader.readline()))
        reader, writer, serving = connect(broker)
        answers.append(decode(await reader.readline()))
        await serving
        return answers

    granted, also, refused = with_broker(body)
    assert granted["event"] == also["event"] == "granted"
    assert refused["event"] == "error"
    assert refused["kind"] == "busy"
    assert "2 connections at most" in refused["message"]
