"""Replay that ends: ``subscribe(topic, from_=..., until=...)`` reads a window of history
and then ends its iteration, so a script can read it and exit."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Receipt, Topic
from eventbus.errors import ConfigurationError
from tests.helpers import control_client

orders = Topic("orders", durable=True)


async def read_all(bus: EventBus, *topics: Topic[Any], **window: Any) -> list[Any]:
    """Everything the subscription yields until its iteration ends (bounded)."""
    with anyio.fail_after(10):
        async with bus.subscribe(*topics, **window) as sub:
            return [event async for event in sub]


def entry_ms(receipt: Receipt) -> int:
    assert receipt.stream_id is not None
    return int(receipt.stream_id.split("-")[0])


async def test_until_latest_reads_the_stream_as_it_was_and_ends(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    async with bus:
        await bus.publish_many(orders, list(range(5)))
        with anyio.fail_after(10):
            async with bus.subscribe(orders, from_="earliest", until="latest") as sub:
                await bus.publish(orders, 99)  # after it subscribed: outside the window
                seen = [event async for event in sub]
        assert seen == [0, 1, 2, 3, 4]
        # The same window from the middle, by stream id.
        receipts = await bus.publish_many(orders, [5, 6, 7])
        assert await read_all(bus, orders, from_=receipts[0].stream_id, until="latest") == [
            5,
            6,
            7,
        ]


async def test_until_a_stream_id_an_event_id_or_a_time(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    async with bus:
        receipts = await bus.publish_many(orders, list(range(6)))
        by_stream_id = await read_all(bus, orders, from_="earliest", until=receipts[2].stream_id)
        assert by_stream_id == [0, 1, 2]
        by_event_id = await read_all(bus, orders, from_="earliest", until=receipts[3].id)
        assert by_event_id == [0, 1, 2, 3]
        # A time: every entry of that millisecond and before it (stream ids are the
        # Redis clock's milliseconds).
        ms = entry_ms(receipts[1])
        moment = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
        expected = [n for n, r in enumerate(receipts) if entry_ms(r) <= ms]
        assert await read_all(bus, orders, from_="earliest", until=moment) == expected
        # A bound past the end stops at the end as it was.
        future = datetime.fromtimestamp(ms / 1000 + 3600, tz=timezone.utc)
        assert await read_all(bus, orders, from_="earliest", until=future) == list(range(6))


async def test_an_empty_window_ends_at_once(bus_factory: Callable[..., EventBus]) -> None:
    bus = bus_factory()
    async with bus:
        assert await read_all(bus, orders, until="latest") == []  # from "latest": nothing
        assert await read_all(bus, Topic("never-written", durable=True), until="latest") == []
        receipts = await bus.publish_many(orders, [1, 2])
        assert await read_all(bus, orders, from_=receipts[1].stream_id, until=receipts[0].id) == []


async def test_a_window_over_several_topics_ends_when_each_is_read(
    bus_factory: Callable[..., EventBus],
) -> None:
    other = Topic("invoices", durable=True)
    bus = bus_factory()
    async with bus:
        await bus.publish_many(orders, [1, 2, 3])
        await bus.publish_many(other, [10, 20])
        seen = await read_all(bus, orders, other, from_="earliest", until="latest")
        assert sorted(seen) == [1, 2, 3, 10, 20]


async def test_a_deleted_end_entry_still_ends_the_window(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    bus = bus_factory()
    async with bus, control_client(redis_url) as ctl:
        receipts = await bus.publish_many(orders, [1, 2, 3])
        assert receipts[2].stream_id is not None
        await ctl.xdel(f"{bus.prefix}:{{orders}}:stream", receipts[2].stream_id)
        assert await read_all(bus, orders, from_="earliest", until=receipts[2].stream_id) == [1, 2]


async def test_until_is_refused_where_it_cannot_hold(bus_factory: Callable[..., EventBus]) -> None:
    bus = bus_factory()
    with pytest.raises(ConfigurationError, match="until needs durable topics"):
        bus.subscribe("live", until="latest")
    async with bus:
        with pytest.raises(ConfigurationError, match="until must be"):
            await read_all(bus, orders, until=42)
        with pytest.raises(ConfigurationError, match="no event with id"):
            await read_all(bus, orders, from_="earliest", until="no-such-event")
