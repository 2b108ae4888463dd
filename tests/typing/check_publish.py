"""Type-level tests, checked by mypy in CI (not run by pytest)."""

from __future__ import annotations

from typing import Any

import attrs
from typing_extensions import assert_type

from eventbus import EventBus, Receipt, Subscription, Topic


@attrs.frozen
class PriceTick:
    symbol: str
    price: float


prices = Topic("prices", PriceTick)
assert_type(prices, Topic[PriceTick])
assert_type(Topic("raw"), Topic[Any])


async def publish_checks(bus: EventBus) -> None:
    assert_type(await bus.publish(prices, PriceTick("A", 1.0)), Receipt)
    await bus.publish("untyped", {"any": "json"})
    await bus.publish(prices, 42)  # type: ignore[misc]  # rejected: not a PriceTick
    await bus.publish(prices, "not a tick")  # type: ignore[misc]  # rejected: not a PriceTick


async def subscribe_checks(bus: EventBus) -> None:
    sub = bus.subscribe(prices)
    assert_type(sub, Subscription[PriceTick])
    async with sub as ticks:
        async for tick in ticks:
            assert_type(tick, PriceTick)
        assert_type(await ticks.receive(), PriceTick)
