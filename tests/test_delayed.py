"""Delayed events (issue 11): ``publish(..., delay=)`` / ``at=``, ``cancel``, the scheduler.

Against real redis-server processes. Due times are judged by the server's clock:
"not early" is checked against the stream entry id, which Redis stamps with its
own clock when the scheduler's script writes the entry.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest

from eventbus import Delivery, EventBus, Topic
from eventbus._feature import Minter
from eventbus._keys import NUDGE, delayed_index, live_channel, schedule_target, topic_keys
from eventbus._scripts import DELAYED_RELEASE
from eventbus.errors import ConfigurationError

from .helpers import control_client, wait_until

ORDERS = Topic("orders", durable=True)
PRICES = Topic("prices")


def entry_ms(stream_id: str) -> int:
    return int(stream_id.partition("-")[0])


async def test_delay_holds_a_durable_event_until_due_by_the_server_clock(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    seen: list[tuple[dict[str, int], Delivery]] = []

    @bus.on(ORDERS, group="g")
    async def handle(event: dict[str, int], delivery: Delivery) -> None:
        seen.append((event, delivery))

    async with bus:
        receipt = await bus.publish(ORDERS, {"n": 1}, delay=0.3, headers={"k": "v"})
        assert receipt.due is not None
        assert receipt.stream_id is None
        assert receipt.due - receipt.published_at == pytest.approx(
            timedelta(seconds=0.3), abs=timedelta(seconds=0.2)
        )
        ctl = control_client(bus._url)
        try:
            # Held in Redis, not in the stream.
            keys = topic_keys(bus._prefix, ORDERS.name)
            assert await ctl.zcard(keys.delayed) == 1
            assert await ctl.xlen(keys.stream) == 0
            await wait_until(lambda: len(seen) == 1, timeout=5)
            event, delivery = seen[0]
            assert event == {"n": 1}
            assert delivery.id == receipt.id
            assert delivery.headers == {"k": "v"}
            assert delivery.due == receipt.due
            # Not early by the server's clock: the entry was written at or after due.
            assert entry_ms(delivery.stream_id) >= int(receipt.due.timestamp() * 1000)
            # Nothing left behind in the schedule.
            assert await ctl.zcard(keys.delayed) == 0
            assert await ctl.hlen(keys.delayed_data) == 0
            assert await ctl.zcard(delayed_index(bus._prefix)) == 0
        finally:
            await ctl.aclose()


async def test_delay_on_a_live_topic_publishes_at_release(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    seen: list[Delivery] = []

    @bus.on(PRICES)
    async def watch(event: dict[str, int], delivery: Delivery) -> None:
        seen.append(delivery)

    async with bus:
        receipt = await bus.publish(PRICES, {"p": 7}, delay=timedelta(milliseconds=200))
        assert receipt.receivers == 0  # nobody was reached yet: it is held
        await wait_until(lambda: len(seen) == 1, timeout=5)
        assert seen[0].id == receipt.id
        assert seen[0].due == receipt.due
        assert seen[0].seq == 0  # released out of publish order: no sequence, no false gap
        assert bus.handler_statistics(watch)[0].gaps == 0


async def test_at_in_the_past_publishes_at_once(bus_factory: Callable[..., EventBus]) -> None:
    bus = bus_factory(scheduler=False)  # nobody releases: it must not need to
    async with bus:
        at = datetime.now(timezone.utc) - timedelta(minutes=5)
        receipt = await bus.publish(ORDERS, {"n": 1}, at=at)
        assert receipt.stream_id is not None
        assert receipt.due == datetime.fromtimestamp(
            int(at.timestamp() * 1000) / 1000, timezone.utc
        )
        async with bus.subscribe(ORDERS, from_="earliest", until="latest") as replay:
            got = [(e, d) async for e, d in replay.deliveries()]
        assert [e for e, _ in got] == [{"n": 1}]
        assert got[0][1].due == receipt.due


async def test_bad_schedules_are_refused_before_redis(bus_factory: Callable[..., EventBus]) -> None:
    local = Topic("here", local=True)
    async with bus_factory() as bus:
        naive = datetime.now() + timedelta(seconds=5)  # naive: the point of the test
        cases: list[tuple[Any, dict[str, Any], str]] = [
            (ORDERS, {"at": naive}, "timezone-aware"),
            (ORDERS, {"delay": 1, "at": datetime.now(timezone.utc)}, "not both"),
            (ORDERS, {"delay": -1}, "negative"),
            (ORDERS, {"delay": "5"}, "seconds or a timedelta"),
            (ORDERS, {"delay": float("inf")}, "zero or more"),
            (local, {"delay": 1}, "local topic cannot be delayed"),
        ]
        for topic, kwargs, words in cases:
            with pytest.raises(ConfigurationError, match=words):
                await bus.publish(topic, {"n": 1}, **kwargs)
            with pytest.raises(ConfigurationError, match=words):
                await bus.publish_many(topic, [{"n": 1}], **kwargs)
        ctl = control_client(bus._url)
        try:
            assert await ctl.keys(f"{bus._prefix}:*") == []
        finally:
            await ctl.aclose()


async def test_cancel_removes_a_pending_event_and_says_whether_it_was(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    seen: list[int] = []

    @bus.on(ORDERS, group="g")
    async def handle(event: dict[str, int]) -> None:
        seen.append(event["n"])

    async with bus:
        keep = await bus.publish(ORDERS, {"n": 1}, delay=0.3)
        drop = await bus.publish(ORDERS, {"n": 2}, delay=0.3)
        by_id = await bus.publish(ORDERS, {"n": 3}, delay=0.3)
        by_topic = await bus.publish(PRICES, {"n": 4}, delay=0.3)
        assert await bus.cancel(drop) is True
        assert await bus.cancel(drop) is False  # no longer pending
        assert await bus.cancel(by_id.id) is True  # found by searching the topics
        assert await bus.cancel(by_topic.id, topic=PRICES) is True
        assert await bus.cancel("no-such-event") is False
        await wait_until(lambda: seen == [1], timeout=5)
        assert await bus.cancel(keep) is False  # released: a cancel never takes it back
        stats = bus.delayed_statistics()
        assert stats.cancelled == 3
        assert stats.scheduled == 4
        ctl = control_client(bus._url)
        try:
            assert await ctl.zcard(delayed_index(bus._prefix)) == 0
        finally:
            await ctl.aclose()
        with pytest.raises(ConfigurationError):
            await bus.cancel("")


async def test_publish_many_schedules_a_batch_in_one_round_trip(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    seen: list[int] = []

    @bus.on(ORDERS, group="g")
    async def handle(event: dict[str, int]) -> None:
        seen.append(event["n"])

    async with bus:
        # 1,200 events: three script calls (500 a call), one due time for all.
        receipts = await bus.publish_many(ORDERS, [{"n": i} for i in range(1200)], delay=0.3)
        assert len({r.id for r in receipts}) == 1200
        assert len({r.due for r in receipts}) == 1
        await wait_until(lambda: sorted(seen) == list(range(1200)), timeout=10)


async def test_events_due_in_the_same_millisecond_are_released_in_publish_order(
    bus_factory: Callable[..., EventBus],
) -> None:
    # One due time for a batch of 1,200 (three script calls), then 50 single
    # publishes at one `at`: each set is released (stored) in the order it was
    # published. One member with concurrency=1 reads in stream order.
    bus = bus_factory()
    seen: list[str] = []

    @bus.on(ORDERS, group="g", concurrency=1)
    async def handle(event: dict[str, int], d: Delivery) -> None:
        seen.append(d.id)

    async with bus:
        batch = await bus.publish_many(ORDERS, [{"n": i} for i in range(1200)], delay=0.3)
        at = datetime.now(timezone.utc) + timedelta(seconds=0.3)
        singles = [await bus.publish(ORDERS, {"n": i}, at=at) for i in range(50)]
        await wait_until(lambda: len(seen) == 1250, timeout=10)
    assert [d for d in seen if d in {r.id for r in batch}] == [r.id for r in batch]
    assert [d for d in seen if d in {r.id for r in singles}] == [r.id for r in singles]


def test_event_ids_rise_within_a_process_and_differ_in_a_forked_child() -> None:
    first, second = Minter.event_id(), Minter.event_id()
    assert len(first) == 32
    assert int(first, 16) < int(second, 16)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first id, then out without running anything else
        os.write(write, Minter.event_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child) == 32
    assert child[:16] != second[:16]  # its own random half: no id of the parent's


async def test_an_earlier_event_wakes_a_sleeping_scheduler(
    bus_factory: Callable[..., EventBus],
) -> None:
    """The scheduler sleeps until the earliest due time; an earlier event scheduled
    by another process wakes it (no tick): released on time, not at the next look."""
    scheduler = bus_factory(scheduler=True)
    publisher = bus_factory(scheduler=False)
    consumer = bus_factory(scheduler=False)
    seen: dict[int, float] = {}

    @consumer.on(ORDERS, group="g")
    async def handle(event: dict[str, int], delivery: Delivery) -> None:
        assert delivery.due is not None
        seen[event["n"]] = time.time() - delivery.due.timestamp()

    async with scheduler, publisher, consumer:
        await publisher.publish(ORDERS, {"n": 1}, delay=60)  # the scheduler sleeps for this
        await anyio.sleep(0.2)  # a gap in time: the scheduler has gone to sleep
        await publisher.publish(ORDERS, {"n": 2}, delay=0.2)
        await wait_until(lambda: 2 in seen, timeout=3)
        assert seen[2] < 0.5, f"released {seen[2]:.3f}s late"
        assert 1 not in seen


async def test_a_bus_that_schedules_releases_by_default(
    bus_factory: Callable[..., EventBus],
) -> None:
    async with bus_factory() as bus:  # no handlers: the scheduler starts with the first delay
        assert bus.delayed_statistics().scheduler_running is False
        await bus.publish(ORDERS, {"n": 1}, delay=0.05)
        assert bus.delayed_statistics().scheduler_running is True
        await wait_until(lambda: bus.delayed_statistics().released == 1, timeout=5)


async def test_a_bus_with_the_scheduler_off_never_releases(
    bus_factory: Callable[..., EventBus],
) -> None:
    off = bus_factory(scheduler=False)

    @off.on(ORDERS, group="g")
    async def handle(event: Any) -> None:
        raise AssertionError("released by a bus whose scheduler is off")

    async with off:
        receipt = await off.publish(ORDERS, {"n": 1}, delay=0.05)
        assert off.delayed_statistics().scheduler_running is False
        ctl = control_client(off._url)
        try:
            keys = topic_keys(off._prefix, ORDERS.name)
            await anyio.sleep(0.5)  # well past due: still held
            assert await ctl.zscore(keys.delayed, receipt.id) is not None
        finally:
            await ctl.aclose()
        async with bus_factory(scheduler=True):  # another process's scheduler releases it
            await wait_until(lambda: off.delayed_statistics().released == 0, timeout=1)
            ctl = control_client(off._url)
            try:
                await wait_until(_released(ctl, keys.delayed), timeout=5)
            finally:
                await ctl.aclose()


def _released(ctl: Any, key: str) -> Callable[[], Any]:
    async def check() -> bool:
        return int(await ctl.zcard(key)) == 0

    return check


async def test_a_key_of_the_wrong_type_keeps_the_event_scheduled(
    redis_server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """RELIABILITY.md F19, second part: the stream key is a string. The release
    fails, the event stays scheduled, the error is logged and counted; once the key
    is fixed the event is delivered."""
    server = redis_server_factory()
    bus = EventBus(server.url, prefix="f19", scheduler=True)
    seen: list[int] = []

    @bus.on(ORDERS, group="g")
    async def handle(event: dict[str, int]) -> None:
        seen.append(event["n"])

    async with bus:
        keys = topic_keys("f19", ORDERS.name)
        ctl = control_client(server.url)
        try:
            await bus.publish(ORDERS, {"n": 0}, delay=0.05)  # the group exists; now break it
            await wait_until(lambda: seen == [0], timeout=5)
            await ctl.delete(keys.stream)
            await ctl.set(keys.stream, "not a stream")
            receipt = await bus.publish(ORDERS, {"n": 1}, delay=0.05)
            await wait_until(lambda: bus.delayed_statistics().release_errors >= 1, timeout=5)
            assert await ctl.zscore(keys.delayed, receipt.id) is not None
            assert await ctl.hexists(keys.delayed_data, receipt.id)
            assert "could not be released" in caplog.text
            await ctl.delete(keys.stream)
            await ctl.xgroup_create(keys.stream, "g", id="0", mkstream=True)
            await wait_until(lambda: seen == [0, 1], timeout=10)
        finally:
            await ctl.aclose()


async def test_another_client_can_schedule_as_the_wire_format_page_shows(
    bus_factory: Callable[..., EventBus],
) -> None:
    """docs/wire-format.md, "Delayed and recurring events": HSET the event, ZADD its
    due time, lower the index, PUBLISH the wake channel; a scheduler releases it."""
    bus = bus_factory(scheduler=True)
    seen: list[tuple[Any, Delivery]] = []

    @bus.on(ORDERS, group="g")
    async def handle(event: Any, delivery: Delivery) -> None:
        seen.append((event, delivery))

    async with bus:
        ctl = control_client(bus._url)
        try:
            prefix = bus._prefix
            seconds, micros = await ctl.time()
            due = seconds * 1000 + micros // 1000 + 300
            payload = '{"order_id":"o-9","amount":90}'
            blob = f"d0:1:d{len(payload)}:{payload}"
            await ctl.hset(f"{prefix}:{{orders}}:delayed-data", "ext-1", blob)
            await ctl.zadd(f"{prefix}:{{orders}}:delayed", {"ext-1": due})
            await ctl.zadd(f"{prefix}:delayed", {"orders": due}, lt=True)
            await ctl.publish(f"{prefix}:delayed:wake", due)
        finally:
            await ctl.aclose()
        await wait_until(lambda: len(seen) == 1, timeout=5)
        event, delivery = seen[0]
        assert event == {"order_id": "o-9", "amount": 90}
        assert delivery.due is not None
        assert int(delivery.due.timestamp() * 1000) == due
        assert int(delivery.stream_id.partition("-")[0]) >= due


async def test_a_scheduler_refused_the_wake_channel_still_releases(
    redis_server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL that grants the keys but not the wake channel: the scheduler says so
    once and looks for newly scheduled events every few seconds; nothing is lost."""
    from .security_helpers import admin_client

    server = redis_server_factory()
    async with admin_client(server) as admin:
        await admin.execute_command(
            "ACL",
            "SETUSER",
            "app",
            "reset",
            "on",
            ">pw",
            "~dw:*",
            "resetchannels",
            "&dw:{*}",
            "+@all",
        )
    seen: list[int] = []
    bus = EventBus(f"redis://app:pw@127.0.0.1:{server.port}/0", prefix="dw", scheduler=True)

    @bus.on(ORDERS, group="g")
    async def handle(event: dict[str, int]) -> None:
        seen.append(event["n"])

    async with bus:
        await bus.publish(ORDERS, {"n": 1}, delay=0.1)
        await wait_until(lambda: seen == [1], timeout=8)
    assert "cannot subscribe to dw:delayed:wake" in caplog.text


async def test_an_event_that_cannot_be_written_stops_the_release_at_it(
    redis_server_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The release writes a batch, then removes it from the schedule: if one write
    fails (here a raw producer's MAXLEN that is not a number), the events before it
    are released once and removed, it and those after it stay scheduled, and the
    retries duplicate nothing."""
    server = redis_server_factory()
    prefix = "stop"
    keys = topic_keys(prefix, ORDERS.name)
    ctl = control_client(server.url)
    try:
        seconds, micros = await ctl.time()
        now = seconds * 1000 + micros // 1000
        blobs = {"a": 'd0:1:d7:{"n":1}', "b": 'd3:abc1:d7:{"n":2}', "c": 'd0:1:d7:{"n":3}'}
        await ctl.hset(keys.delayed_data, mapping=blobs)
        await ctl.zadd(keys.delayed, {"a": now - 30, "b": now - 20, "c": now - 10})
        await ctl.zadd(delayed_index(prefix), {ORDERS.name: now - 30})
        bus = EventBus(server.url, prefix=prefix, scheduler=True)
        async with bus:
            await wait_until(lambda: bus.delayed_statistics().release_errors >= 1, timeout=5)
            assert [f["d"] for _id, f in await ctl.xrange(keys.stream)] == ['{"n":1}']
            assert await ctl.zrange(keys.delayed, 0, -1) == ["b", "c"]
            assert sorted(await ctl.hkeys(keys.delayed_data)) == ["b", "c"]
            assert "could not be released" in caplog.text
            # Retried after its back-off (at the scheduler's next look, within 5 s):
            # refused again, and nothing released twice.
            await wait_until(lambda: bus.delayed_statistics().release_errors >= 2, timeout=12)
            assert await ctl.xlen(keys.stream) == 1
            await ctl.hset(keys.delayed_data, "b", 'd0:1:d7:{"n":2}')  # repaired

            async def all_out() -> bool:
                return int(await ctl.xlen(keys.stream)) == 3

            await wait_until(all_out, timeout=15)
            entries = [f["d"] for _id, f in await ctl.xrange(keys.stream)]
            assert entries == ['{"n":1}', '{"n":2}', '{"n":3}']
        assert await ctl.zcard(keys.delayed) == 0
        assert await ctl.hlen(keys.delayed_data) == 0
    finally:
        await ctl.aclose()


async def test_one_release_call_past_a_thousand_events(
    redis_server_factory: Callable[..., Any],
) -> None:
    """The release script reads, and removes, a batch in chunks of 1,000 ids (Lua
    unpacks at most about 8,000 values): 2,600 due events, 5 without data, released
    2,500 per call; counted, written once each, removed, the index cleared at the end."""
    server = redis_server_factory()
    prefix = "chunks"
    target = schedule_target(prefix, ORDERS.name)
    index = delayed_index(prefix)
    ctl = control_client(server.url)
    try:
        seconds, micros = await ctl.time()
        now = seconds * 1000 + micros // 1000
        ids = [f"e{i:05d}" for i in range(2_600)]
        without = {ids[7], ids[999], ids[1000], ids[2001], ids[2550]}
        async with ctl.pipeline(transaction=False) as pipe:
            for i, eid in enumerate(ids):
                if eid not in without:
                    body = f'{{"n":{i}}}'
                    pipe.hset(target.delayed_data, eid, f"d0:1:d{len(body)}:{body}")
                pipe.zadd(target.delayed, {eid: now - 2_600 + i})
            pipe.zadd(index, {ORDERS.name: now - 2_600})
            await pipe.execute()
        release = ctl.register_script(DELAYED_RELEASE)
        args = [ORDERS.name, live_channel(prefix, ORDERS.name), 2_500, "stream", NUDGE]
        keys = [target.delayed, target.delayed_data, target.destination, index, target.nudge]
        released, _now, next_due, missing = await release(keys=keys, args=args)
        assert (released, missing) == (2_496, 4)
        assert int(next_due) == now - 100
        assert await ctl.zcard(target.delayed) == 100
        assert await ctl.hlen(target.delayed_data) == 99
        assert await ctl.zscore(index, ORDERS.name) == now - 100
        released, _now, next_due, missing = await release(keys=keys, args=args)
        assert (released, next_due, missing) == (99, -1, 1)
        assert await ctl.exists(target.delayed, target.delayed_data, index) == 0
        entries = await ctl.xrange(target.destination)
        expected = [f'{{"n":{i}}}' for i, eid in enumerate(ids) if eid not in without]
        assert [f["d"] for _id, f in entries] == expected
        assert all(f["t"] == str(now - 2_600 + int(f["d"][5:-1])) for _id, f in entries)
    finally:
        await ctl.aclose()
