"""Price-feed fan-out: one publisher, several local subscribers, four overflow policies.

Run it with nothing but the package installed::

    python examples/price_feed.py                                        # private redis-server
    EVENTBUS_URL=redis://127.0.0.1:6379/0 python examples/price_feed.py  # your Redis

One bus publishes ``TICKS`` price ticks on the live topic ``prices`` as fast as
Redis accepts them. The same bus holds ONE push connection that reads each
tick once and hands it to every subscriber's own bounded buffer:

* ``fast``:        a handler that keeps up (default buffer of 1000);
* ``careful``:     a slow handler with ``overflow="block"``: it loses nothing, but
                   while its buffer is full the shared push connection waits for it,
                   which paces every other subscriber of this bus;
* ``latest``:      a slow iterator with ``overflow="drop_oldest"``: when full, the
                   oldest buffered tick goes, so it always ends on the newest price;
* ``earliest``:    a slow iterator with ``overflow="drop_newest"``: when full,
                   incoming ticks go, so it may never see the final price.

At the end it prints what each one received, delivered and dropped, from
``Subscription.statistics()`` and ``bus.handler_statistics(fn)``. It exits by
itself within about 10 seconds.
"""

from __future__ import annotations

import logging
import os
import random
import time

import anyio
import attrs

from eventbus import Delivery, EventBus, Subscription, SubscriptionStatistics, Topic

TICKS = 2_000
SYMBOLS = ("ACME", "GLOBX", "INITech")


@attrs.frozen
class PriceTick:
    symbol: str
    price: float


prices = Topic("prices", PriceTick)


@attrs.define
class Seen:
    """What one subscriber saw, counted by the subscriber itself."""

    last_seq: int = 0
    last_tick: PriceTick | None = None

    def record(self, tick: PriceTick, delivery: Delivery) -> None:
        self.last_seq = delivery.seq  # per-publisher sequence number, 1..TICKS
        self.last_tick = tick


def make_bus() -> EventBus:
    url = os.environ.get("EVENTBUS_URL")
    return EventBus(url) if url else EventBus.embedded()


async def consume(sub: Subscription[PriceTick], seen: Seen, pause: float) -> None:
    """A slow iterator consumer: it sleeps ``pause`` seconds per tick."""
    async for tick, delivery in sub.deliveries():
        seen.record(tick, delivery)
        await anyio.sleep(pause)


def all_arrived(stats: dict[str, SubscriptionStatistics]) -> bool:
    """True once every subscriber was offered every tick and has an empty buffer.

    ``received`` counts every tick that reached a subscriber, dropped or not, so
    ``received == TICKS`` means the push connection delivered the whole feed.
    """
    return all(s.received == TICKS and s.buffered == 0 for s in stats.values())


def report(name: str, stats: SubscriptionStatistics, seen: Seen) -> None:
    last = seen.last_tick
    ending = f"last #{seen.last_seq} {last.symbol} {last.price:.2f}" if last else "nothing"
    print(
        f"{name:<9} {stats.overflow:<12} {stats.buffer_size:>6} {stats.received:>9} "
        f"{stats.delivered:>9} {stats.dropped:>8} {stats.gaps:>5}   {ending}"
    )


async def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bus = make_bus()
    seen = {name: Seen() for name in ("fast", "careful", "latest", "earliest")}

    @bus.on(prices)
    async def fast(tick: PriceTick, delivery: Delivery) -> None:
        seen["fast"].record(tick, delivery)

    @bus.on(prices, buffer=50, overflow="block")
    async def careful(tick: PriceTick, delivery: Delivery) -> None:
        seen["careful"].record(tick, delivery)
        await anyio.sleep(0.001)  # slow, but it must see every tick

    async with (
        bus,  # returns once Redis confirmed the handlers' subscription
        bus.subscribe(prices, buffer=20, overflow="drop_oldest") as latest,
        bus.subscribe(prices, buffer=20, overflow="drop_newest") as earliest,
        anyio.create_task_group() as tg,
    ):
        print(f"bus on {bus.url}, publishing {TICKS} ticks on {prices!r}", flush=True)
        tg.start_soon(consume, latest, seen["latest"], 0.05)
        tg.start_soon(consume, earliest, seen["earliest"], 0.05)

        rng = random.Random(42)
        book = dict.fromkeys(SYMBOLS, 100.0)
        started = time.perf_counter()
        receivers = 0
        for _ in range(TICKS):
            symbol = rng.choice(SYMBOLS)
            book[symbol] = round(book[symbol] * (1 + rng.gauss(0, 0.001)), 2)
            receipt = await bus.publish(prices, PriceTick(symbol, book[symbol]))
            receivers = receipt.receivers
        elapsed = time.perf_counter() - started
        print(
            f"published {TICKS} ticks in {elapsed:.2f}s; each reached {receivers} "
            "push connection(s): this process's one, shared by all four subscribers",
            flush=True,
        )

        # Live delivery is asynchronous: wait (bounded) until every subscriber was
        # offered every tick and has drained its buffer, then stop the consumers.
        def snapshot() -> dict[str, SubscriptionStatistics]:
            return {
                "fast": bus.handler_statistics(fast)[0],
                "careful": bus.handler_statistics(careful)[0],
                "latest": latest.statistics(),
                "earliest": earliest.statistics(),
            }

        with anyio.move_on_after(8) as waiting:
            # Statistics are snapshots with no change event: poll them, bounded.
            while not all_arrived(snapshot()):  # noqa: ASYNC110
                await anyio.sleep(0.05)

        if waiting.cancelled_caught:
            print("some ticks had not arrived after 8s (live delivery is at most once)")
        tg.cancel_scope.cancel()
        stats = snapshot()

    print()
    print(
        f"{'name':<9} {'overflow':<12} {'buffer':>6} {'received':>9} "
        f"{'delivered':>9} {'dropped':>8} {'gaps':>5}   final tick seen"
    )
    for name, s in stats.items():
        report(name, s, seen[name])

    print()
    print("received = delivered + dropped + buffered. 'block' dropped nothing, and the")
    print("others waited for it. When full, 'drop_oldest' discards what it has not read")
    print("yet, so it always ends on the final tick; 'drop_newest' discards what arrives,")
    print("so it keeps older ticks and usually misses the final one.")


if __name__ == "__main__":
    anyio.run(main)
