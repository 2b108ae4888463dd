from __future__ import annotations

import anyio
import attrs

from eventbus import Delivery, Topic


@attrs.frozen
class Tick:
    symbol: str
    price: float


prices = Topic("prices", Tick)


async def test_publish_reaches_handler_and_iterator(bus_factory) -> None:
    bus = bus_factory()
    got: list[tuple[Tick, Delivery]] = []
    done = anyio.Event()

    @bus.on(prices)
    async def handler(tick: Tick, delivery: Delivery) -> None:
        got.append((tick, delivery))
        done.set()

    async with bus, bus.subscribe(prices) as sub:
        receipt = await bus.publish(prices, Tick("ACME", 10.5), headers={"trace": "x"})
        with anyio.fail_after(5):
            tick = await sub.receive()
            await done.wait()
    assert tick == Tick("ACME", 10.5)
    assert got[0][0] == tick
    assert got[0][1].id == receipt.id
    assert got[0][1].headers == {"trace": "x"}
    assert receipt.receivers == 1  # one push connection for both subscribers
