"""Delayed events under faults: RELIABILITY.md F18, F18b, F19, F20, a scheduler
SIGKILLed mid-run, and Redis restarted with AOF between scheduling and due time.

Schedulers are separate processes (``tests.delayed_worker``); the consumer (a
consumer group) and the publisher run in the test process with their schedulers
off. Counts are asserted: lost = 0, duplicates = 0, and no event early by the
Redis server's clock (the stream entry id, stamped by the server when the
release script writes the entry, is at or after the due time).
"""

from __future__ import annotations

import contextlib
import hashlib
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventbus import Delivery, EventBus, Topic
from eventbus._keys import delayed_index, topic_keys
from eventbus._scripts import DELAYED_CANCEL
from eventbus.testing import FaultProxy

from .helpers import control_client, wait_until
from .streams.test_crash import Worker

pytestmark = [pytest.mark.fault]

TOPIC = Topic("jobs", durable=True)


class Schedulers:
    """Scheduler processes on one server, stopped (or killed) at the end."""

    def __init__(self, tmp: Path, prefix: str) -> None:
        self.tmp = tmp
        self.prefix = prefix
        self.workers: list[Worker] = []

    async def spawn(
        self, url: str, *, skew: float = 0.0, standby_lag: float | None = None
    ) -> Worker:
        name = f"scheduler-{len(self.workers)}"
        extra = [] if standby_lag is None else ["--standby-lag", str(standby_lag)]
        worker = Worker(
            name,
            [
                "--url",
                url,
                "--prefix",
                self.prefix,
                "--max-seconds",
                "120",
                "--clock-skew",
                str(skew),
                *extra,
            ],
            self.tmp / f"{name}.oracle",
            self.tmp / f"{name}.stderr",
            module="tests.delayed_worker",
        )
        self.workers.append(worker)
        await worker.wait_event("ready", timeout=20)
        return worker

    async def stop(self) -> dict[str, int]:
        released = {}
        for worker in self.workers:
            if worker.alive:
                worker.send(signal.SIGTERM)
        for worker in self.workers:
            await worker.wait_exit(timeout=15)
            exit_event = worker.event("exit")
            if exit_event is not None:
                released[worker.name] = int(exit_event["released"])
        return released

    def close(self) -> None:
        for worker in self.workers:
            worker.cleanup()


@contextlib.contextmanager
def schedulers(tmp: Path, prefix: str) -> Iterator[Schedulers]:
    fleet = Schedulers(tmp, prefix)
    try:
        yield fleet
    finally:
        fleet.close()


class Received:
    """What the consumer group saw: per event id, every (entry ms, due ms, lateness s)."""

    def __init__(self) -> None:
        self.by_id: dict[str, list[tuple[int, int, float]]] = {}

    def handler(self) -> Callable[..., Any]:
        async def handle(event: dict[str, Any], delivery: Delivery) -> None:
            assert delivery.due is not None
            due_ms = int(delivery.due.timestamp() * 1000)
            entry_ms = int(delivery.stream_id.partition("-")[0])
            late = time.time() - delivery.due.timestamp()
            self.by_id.setdefault(delivery.id, []).append((entry_ms, due_ms, late))

        return handle

    @property
    def count(self) -> int:
        return len(self.by_id)

    def check(self, expected: set[str]) -> list[float]:
        """lost = 0, duplicates = 0, none early; returns the lateness of each."""
        lost = expected - self.by_id.keys()
        assert not lost, f"{len(lost)} lost"
        assert self.by_id.keys() == expected
        # A consumer group may hand an entry twice (a redelivery): count entries.
        entries = {id_: {entry for entry, _due, _late in seen} for id_, seen in self.by_id.items()}
        duplicates = {id_ for id_, e in entries.items() if len(e) > 1}
        assert not duplicates, f"{len(duplicates)} released twice"
        early = [(i, s[0]) for i, s in self.by_id.items() if s[0][0] < s[0][1]]
        assert not early, f"{len(early)} released before due by the server clock: {early[:3]}"
        return sorted(s[0][2] for s in self.by_id.values())


async def schedule_spread(
    bus: EventBus, n: int, *, lead: float, span: float, chunk: int = 200
) -> tuple[set[str], float]:
    """``n`` events due uniformly over ``span`` seconds, the first ``lead`` from now:
    their ids, and the first due time (``time.time()``)."""
    base = time.time() + lead
    ids: set[str] = set()

    async def one(i: int) -> None:
        at = datetime.fromtimestamp(base + span * i / n, tz=timezone.utc)
        receipt = await bus.publish(TOPIC, {"n": i}, at=at)
        assert receipt.stream_id is None, "scheduled too late: released at once"
        ids.add(receipt.id)

    for start in range(0, n, chunk):
        async with anyio.create_task_group() as tg:
            for i in range(start, min(start + chunk, n)):
                tg.start_soon(one, i)
    assert time.time() < base, "scheduling took longer than the lead time"
    return ids, base


def p99(values: list[float]) -> float:
    return values[min(len(values) - 1, int(len(values) * 0.99))]


async def assert_schedule_empty(url: str, prefix: str) -> None:
    ctl = control_client(url)
    try:
        keys = topic_keys(prefix, TOPIC.name)
        assert await ctl.zcard(keys.delayed) == 0
        assert await ctl.hlen(keys.delayed_data) == 0
        assert await ctl.zcard(delayed_index(prefix)) == 0
    finally:
        await ctl.aclose()


@pytest.mark.slow
async def test_f18_three_schedulers_race_one_killed_one_losing_replies(
    redis_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """F18: 3 scheduler processes, 10,000 events due over 5 s; one scheduler's
    EVALSHA replies are dropped now and then (it retries a call Redis ran), one is
    SIGKILLed 2 s in. Exactly once, none early, on time."""
    server = redis_server_factory()
    prefix = "f18"
    received = Received()
    consumer = EventBus(server.url, prefix=prefix, scheduler=False)
    consumer.on(TOPIC, group="g", concurrency=16)(received.handler())
    publisher = EventBus(server.url, prefix=prefix, scheduler=False)
    n = 10_000
    with schedulers(tmp_path, prefix) as fleet:
        async with FaultProxy(("127.0.0.1", server.port)) as proxy:
            # The victim, direct, is the fastest until it dies; the two others go
            # through the proxy, whose dropped replies they then meet.
            victim = await fleet.spawn(server.url)
            await fleet.spawn(f"redis://127.0.0.1:{proxy.port}/0")
            await fleet.spawn(f"redis://127.0.0.1:{proxy.port}/0")
            async with consumer, publisher:
                ids, first_due = await schedule_spread(publisher, n, lead=3.0, span=5.0)
                drops = 0
                armed = False
                killed = False
                with anyio.fail_after(30):
                    while received.count < n:
                        if not killed and time.time() - first_due > 2.0:
                            victim.send(signal.SIGKILL)
                            killed = True
                        if proxy.armed_drops == 0:
                            if armed:
                                drops += 1  # the last one met its EVALSHA
                            proxy.drop_next_reply(b"EVALSHA")
                            armed = True
                        await anyio.sleep(0.05)  # pacing the fault injection, not ordering
                proxy.cancel_drops()
                late = received.check(ids)
        released = await fleet.stop()
    await assert_schedule_empty(server.url, prefix)
    print(
        f"F18: {n} events, lateness p50 {statistics.median(late) * 1000:.1f} ms, p99"
        f" {p99(late) * 1000:.1f} ms, max {late[-1] * 1000:.1f} ms; {drops} replies dropped;"
        f" released per surviving scheduler {released}"
    )
    assert killed
    assert drops >= 3, "the lost-reply path was not exercised"
    assert p99(late) <= 0.25
    assert late[-1] <= 1.5


async def test_f18b_client_clocks_hours_off_change_nothing(
    redis_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """F18b: schedulers whose wall clocks are 30 s ahead and 30 s behind release
    on time by the server's clock, never early; delays are judged by the server."""
    server = redis_server_factory()
    prefix = "f18b"
    received = Received()
    consumer = EventBus(server.url, prefix=prefix, scheduler=False)
    consumer.on(TOPIC, group="g", concurrency=8)(received.handler())
    publisher = EventBus(server.url, prefix=prefix, scheduler=False)
    with schedulers(tmp_path, prefix) as fleet:
        await fleet.spawn(server.url, skew=30.0)
        await fleet.spawn(server.url, skew=-30.0)
        async with consumer, publisher:
            ids: set[str] = set()
            for i in range(200):
                receipt = await publisher.publish(TOPIC, {"n": i}, delay=0.5 + i / 200)
                ids.add(receipt.id)
            await wait_until(lambda: received.count == 200, timeout=15)
            late = received.check(ids)
        await fleet.stop()
    assert p99(late) <= 0.25, f"p99 lateness {p99(late):.3f}s"


@pytest.mark.slow
async def test_f19_a_backlog_drains_in_short_script_calls(
    redis_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """F19: 50,000 events already due when the first scheduler starts: drained in
    at most 10 s, no script call over 50 ms in SLOWLOG, no BUSY."""
    server = redis_server_factory()
    prefix = "f19"
    ctl = control_client(server.url)
    await ctl.config_set("slowlog-log-slower-than", 50_000)
    await ctl.slowlog_reset()
    publisher = EventBus(server.url, prefix=prefix, scheduler=False)
    n = 50_000
    keys = topic_keys(prefix, TOPIC.name)
    try:
        async with publisher:
            for start in range(0, n, 5_000):
                await publisher.publish_many(
                    TOPIC, [{"n": i} for i in range(start, start + 5_000)], delay=0.5
                )
            assert await ctl.zcard(keys.delayed) == n
            await anyio.sleep(0.6)  # a gap in time: all due before any scheduler runs
        with schedulers(tmp_path, prefix) as fleet:
            started = time.monotonic()
            await fleet.spawn(server.url)

            async def drained() -> bool:
                return int(await ctl.xlen(keys.stream)) == n

            await wait_until(drained, timeout=30, interval=0.05)
            took = time.monotonic() - started
            await fleet.stop()
        slow = await ctl.slowlog_get(128)
        scripts = [e for e in slow if b"EVALSHA" in bytes(e.get("command", b"")).upper()]
        print(
            f"F19: {n} due events drained in {took:.2f}s (incl. process start); slowlog {slow[:3]}"
        )
        assert took <= 10 + 3, took  # 10 s, plus the scheduler process's own start
        assert scripts == [], scripts
        await assert_schedule_empty(server.url, prefix)
    finally:
        await ctl.aclose()


@pytest.mark.slow
async def test_f20_script_flush_and_an_aof_restart_lose_nothing(
    redis_server_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """F20: SCRIPT FLUSH while schedulers release (NOSCRIPT reloads transparently),
    then Redis SIGKILLed and restarted with AOF between scheduling and due time:
    every event released once, none early, nothing reaches user code as an error."""
    server = redis_server_factory(appendonly=True)
    prefix = "f20"
    received = Received()
    consumer = EventBus(server.url, prefix=prefix, scheduler=False)
    consumer.on(TOPIC, group="g", concurrency=8)(received.handler())
    publisher = EventBus(server.url, prefix=prefix, scheduler=False)
    with schedulers(tmp_path, prefix) as fleet:
        await fleet.spawn(server.url)
        await fleet.spawn(server.url)
        async with consumer, publisher:
            ids, _ = await schedule_spread(publisher, 2_000, lead=1.0, span=3.0)
            ctl = control_client(server.url)
            try:
                await wait_until(lambda: received.count >= 500, timeout=10)
                await ctl.script_flush()
                await wait_until(lambda: received.count >= 1_000, timeout=10)
                # Scheduled, not yet due: then Redis dies and comes back from its AOF.
                more, _ = await schedule_spread(publisher, 500, lead=2.0, span=1.0)
            finally:
                await ctl.aclose()
            server.restart()
            await wait_until(lambda: received.count == 2_500, timeout=30)
            late = received.check(ids | more)
        await fleet.stop()
    await assert_schedule_empty(server.url, prefix)
    print(f"F20: lateness p99 {p99(late) * 1000:.1f} ms, max {late[-1] * 1000:.1f} ms")


async def test_a_cancel_whose_reply_is_lost_still_answers_true(
    redis_server_factory: Callable[..., Any],
) -> None:
    """The cancel script runs, its reply is lost with the connection, and redis-py
    sends it again: that run finds the event gone, and answers from the tombstone
    the first run left (True: this call cancelled it). The event is never
    released; another cancel of it answers False (cancelled before), as does a
    cancel of an event already released."""
    server = redis_server_factory()
    prefix = "lostcancel"
    seen: list[int] = []
    consumer = EventBus(server.url, prefix=prefix, scheduler=True)

    @consumer.on(TOPIC, group="g")
    async def handle(event: dict[str, int]) -> None:
        seen.append(event["n"])

    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        # Its scheduler off: the only script this bus runs after scheduling is the cancel.
        canceller = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix=prefix, scheduler=False)
        async with consumer, canceller:
            warm = await canceller.publish(TOPIC, {"n": 0}, delay=0.5)
            doomed = await canceller.publish(TOPIC, {"n": 1}, delay=0.5)
            marker = await canceller.publish(TOPIC, {"n": 2}, delay=0.6)
            # A first cancel loads the script: the reply lost next is the script's
            # answer, not a NOSCRIPT error.
            assert await canceller.cancel(warm) is True
            proxy.drop_next_reply(b"EVALSHA")
            assert await canceller.cancel(doomed) is True
            assert len(proxy.dropped) == 1, "the cancel's reply was not lost"
            assert proxy.dropped[0].reply == b":1\r\n"  # it removed the event
            assert (
                proxy.dropped[0].command[1]
                == hashlib.sha1(DELAYED_CANCEL.encode()).hexdigest().encode()
            )
            assert canceller.delayed_statistics().cancelled == 2
            assert await canceller.cancel(doomed) is False  # another call: cancelled before
            await wait_until(lambda: seen == [2], timeout=5)  # released after doomed's due time
            assert await canceller.cancel(marker) is False  # released: never taken back
    ctl = control_client(server.url)
    try:
        keys = topic_keys(prefix, TOPIC.name)
        assert await ctl.xlen(keys.stream) == 1
        ttl = await ctl.pttl(keys.delayed_cancelled + doomed.id)
        assert 0 < ttl <= 600_000  # the tombstone expires
    finally:
        await ctl.aclose()
    await assert_schedule_empty(server.url, prefix)
