"""A typed topic refuses, at publish time and before any I/O, what does not fit its type."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import attrs
import pytest

from eventbus import EventBus, Topic
from eventbus.errors import EncodeError

from .helpers import command_calls, control_client, wait_until


@attrs.frozen
class PriceTick:
    symbol: str
    price: float


@dataclasses.dataclass(frozen=True)
class Unrelated:
    symbol: str
    price: float


BAD: list[Any] = [
    {"symbol": "ACME", "price": 1.0},
    Unrelated("ACME", 1.0),
    "hello",
    None,
    PriceTick("ACME", "not-a-float"),  # type: ignore[arg-type]
]

KINDS = {
    "live": {},
    "durable": {"durable": True},
    "local": {"local": True},
}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_a_typed_topic_refuses_what_is_not_its_type_before_any_io(
    bus_factory: Callable[..., EventBus], redis_url: str, kind: str
) -> None:
    topic = Topic("p", PriceTick, **KINDS[kind])
    bus = bus_factory()
    received: list[PriceTick] = []

    @bus.on(topic)
    def record(tick: PriceTick) -> None:
        received.append(tick)

    async with control_client(redis_url) as ctl, bus:
        before = {c: await command_calls(ctl, c) for c in ("publish", "xadd")}
        for bad in BAD:
            with pytest.raises(EncodeError) as info:
                await bus.publish(topic, bad)
            message = str(info.value)
            assert info.value.topic == "p"
            assert "PriceTick" in message, message
        with pytest.raises(EncodeError, match=r"\$\.price"):  # the field that is wrong
            await bus.publish(topic, PriceTick("ACME", "not-a-float"))  # type: ignore[arg-type]
        # A batch with one bad event is refused whole, before anything is sent.
        with pytest.raises(EncodeError):
            await bus.publish_many(topic, [PriceTick("ACME", 1.0), "hello"])  # type: ignore[list-item]
        assert {c: await command_calls(ctl, c) for c in ("publish", "xadd")} == before
        if kind == "durable":
            assert await ctl.xlen(f"{bus.prefix}:{{p}}:stream") == 0
        assert received == []
        # What fits is published: an instance, and an int where a float is declared.
        await bus.publish(topic, PriceTick("ACME", 10.5))
        await bus.publish_many(topic, [PriceTick("ACME", 11)])
        await wait_until(lambda: len(received) == 2)
    assert received == [PriceTick("ACME", 10.5), PriceTick("ACME", 11)]


async def test_untyped_and_generic_topics(bus_factory: Callable[..., EventBus]) -> None:
    bus = bus_factory()
    numbers = Topic("numbers", list[int])
    async with bus:
        for value in ({"any": ["json"]}, b"\x00bytes", "text", 3, None):
            await bus.publish("plain", value)  # a string topic takes any JSON value or bytes
        await bus.publish(numbers, [1, 2, 3])
        with pytest.raises(EncodeError, match="list"):
            await bus.publish(numbers, [1, "two"])
        with pytest.raises(EncodeError, match="expected a float, got a bool"):
            await bus.publish(Topic("f", float), True)
