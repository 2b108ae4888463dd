"""RELIABILITY.md F12 (slow in-process subscriber) and F13 (subscriber errors, lifetimes)."""

from __future__ import annotations

import gc
import logging
import time
import tracemalloc

import anyio
import pytest

from eventbus import Delivery, EventBus, Topic, signals

from .helpers import control_client, wait_until

N = 20_000
RATE = 2_000  # messages per second
BUFFER = 1_000


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(len(ordered) * 0.99) - 1]


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_f12_slow_subscriber_drops_only_its_own(redis_server_factory, policy: str) -> None:
    server = redis_server_factory()
    sub_bus = EventBus(server.url, prefix="f12")
    pub_bus = EventBus(server.url, prefix="f12")
    topic = Topic("feed", int)
    overflow_signals: list[int] = []
    sub_bus.connect_signal(
        signals.overflowed, lambda s, **kw: overflow_signals.append(kw["dropped"])
    )
    slow_mode = True
    latencies: list[list[float]] = [[], [], []]
    counts = [0, 0, 0]

    async def fast(sub, i: int) -> None:
        async for _value, delivery in sub.deliveries():
            assert delivery.published_at is not None
            latencies[i].append(time.time() - delivery.published_at.timestamp())
            counts[i] += 1

    async def slow(sub) -> None:
        async for _value in sub:
            if slow_mode:
                await anyio.sleep(0.01)

    omem_max = 0
    tracemalloc.start()
    try:
        async with (
            control_client(server.url) as ctl,
            sub_bus,
            pub_bus,
            anyio.create_task_group() as tg,
        ):
            slow_sub = sub_bus.subscribe(topic, buffer=BUFFER, overflow=policy)  # type: ignore[arg-type]
            fast_subs = [
                sub_bus.subscribe(topic, buffer=BUFFER, overflow=policy)  # type: ignore[arg-type]
                for _ in range(3)
            ]
            for sub in (slow_sub, *fast_subs):
                await sub.__aenter__()
            tg.start_soon(slow, slow_sub)
            for i, sub in enumerate(fast_subs):
                tg.start_soon(fast, sub, i)
            push_id = sub_bus.push_client_id
            tracemalloc.reset_peak()
            base, _ = tracemalloc.get_traced_memory()
            start = anyio.current_time()
            for n in range(N):
                await pub_bus.publish(topic, n)
                if n % 100 == 99:
                    await anyio.sleep_until(start + (n + 1) / RATE)
                    if n % 2000 == 1999:
                        for client in await ctl.client_list(_type="pubsub"):
                            omem_max = max(omem_max, int(client["omem"]))
            await wait_until(lambda: counts == [N, N, N], timeout=10)
            slow_mode = False  # let the slow one drain what it buffered
            await wait_until(lambda: slow_sub.statistics().buffered == 0, timeout=10)
            _, peak = tracemalloc.get_traced_memory()
            clients = await ctl.client_list(_type="pubsub")
            tg.cancel_scope.cancel()
    finally:
        tracemalloc.stop()

    stats = slow_sub.statistics()
    assert stats.delivered + stats.dropped == N
    assert stats.dropped > 0
    assert overflow_signals[-1] == stats.dropped
    assert len(overflow_signals) == stats.dropped
    for sub in fast_subs:
        assert sub.statistics().dropped == 0
        assert sub.statistics().delivered == N
    p99 = max(_p99(lat) for lat in latencies)
    assert p99 <= 0.050, p99
    # Memory: bounded by the buffers, not by the backlog.
    max_msg = 200
    assert peak - base <= BUFFER * max_msg * 2 + 10 * 1024 * 1024
    # The shared push connection was never killed nor backed up in Redis.
    assert [int(c["id"]) for c in clients] == [push_id]
    assert omem_max < 1024 * 1024
    print(
        f"F12 {policy}: slow delivered={stats.delivered} dropped={stats.dropped}"
        f" fast_p99_ms={p99 * 1000:.1f}"
    )


async def test_f12_error_policy_detaches_only_the_slow_one(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("strict", int)
    async with bus:
        strict = bus.subscribe(topic, buffer=10, overflow="error")
        relaxed = bus.subscribe(topic, buffer=1000)
        await strict.__aenter__()
        await relaxed.__aenter__()
        for n in range(200):
            await bus.publish(topic, n)
        with anyio.fail_after(5):
            got = [await relaxed.receive() for _ in range(200)]
        assert got == list(range(200))
        from eventbus.errors import SubscriberOverflow

        assert [await strict.receive() for _ in range(10)] == list(range(10))
        with pytest.raises(SubscriberOverflow):
            await strict.receive()
        await strict.aclose()
        await relaxed.aclose()


async def test_f12_block_policy_warns_that_it_stalls_the_shared_connection(
    bus_factory, caplog
) -> None:
    caplog.set_level(logging.WARNING, logger="eventbus")
    bus = bus_factory()
    topic = Topic("blocky", int)
    async with bus, bus.subscribe(topic, buffer=5, overflow="block") as sub:
        for n in range(20):
            await bus.publish(topic, n)
        with anyio.fail_after(5):
            got = [await sub.receive() for _ in range(20)]
        assert got == list(range(20))  # nothing lost: the reader waited
        assert sub.statistics().dropped == 0
    assert any(
        "stalls" in r.getMessage() or "waits for it" in r.getMessage() for r in caplog.records
    )


async def test_f13_raising_subscriber_does_not_disturb_neighbours(bus_factory, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="eventbus")
    bus = bus_factory()
    topic = Topic("f13", int)
    received: list[list[int]] = [[] for _ in range(4)]
    raised: list[int] = []

    def make(i: int):
        async def ok(value: int) -> None:
            received[i].append(value)

        return ok

    for i in range(4):
        bus.on(topic)(make(i))

    @bus.on(topic)
    async def bad(value: int) -> None:
        raised.append(value)
        raise ValueError(f"bad {value}")

    async with bus:
        for n in range(300):
            await bus.publish(topic, n)
        await wait_until(lambda: len(raised) == 300 and all(len(r) == 300 for r in received))
        stats = bus.handler_statistics(bad)[0]
    assert all(r == list(range(300)) for r in received)
    assert raised == list(range(300))  # kept receiving
    assert stats.errors == 300
    logged = [r for r in caplog.records if "bad" in r.getMessage() or "failed" in r.getMessage()]
    assert len(logged) == 4  # errors #1, #100, #200, #300: rate limited


async def test_f13_lambda_and_closure_subscribers_survive_gc(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("gc", int)
    got: list[int] = []
    seen_by_signal: list[str] = []

    def register() -> None:
        bus.on(topic)(lambda value: got.append(value))
        bus.connect_signal(signals.published, lambda s, **kw: seen_by_signal.append(kw["event_id"]))

    register()
    gc.collect()
    async with bus:
        gc.collect()
        for n in range(10):
            await bus.publish(topic, n)
        await wait_until(lambda: got == list(range(10)))
    assert len(seen_by_signal) == 10


async def test_f13_off_during_delivery_stops_further_calls(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("off", int)
    calls: list[int] = []
    others: list[int] = []

    @bus.on(topic, buffer=1000)
    async def quitter(value: int, delivery: Delivery) -> None:
        calls.append(value)
        if value == 5:
            await bus.off(quitter)

    @bus.on(topic, buffer=1000)
    def stayer(value: int) -> None:
        others.append(value)

    async with bus:
        for n in range(50):
            await bus.publish(topic, n)
        await wait_until(lambda: len(others) == 50)
    assert calls == list(range(6))
