"""Recurring events (issue 11): ``schedule``, ``schedules``, ``unschedule``, catch-up.

The occurrence arithmetic is checked alone; the rest against real redis-server
processes, with several schedulers racing for each occurrence.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import pytest

from eventbus import Delivery, EventBus, Topic
from eventbus._delayed._recurring import Recurrence, build, occurrence_id
from eventbus.errors import ConfigurationError

from .helpers import wait_until

TICKS = Topic("ticks", durable=True)
PINGS = Topic("pings")


def recurrence(**overrides: Any) -> Recurrence:
    args: dict[str, Any] = {
        "name": "r",
        "topic": "t",
        "durable": True,
        "maxlen": None,
        "every": None,
        "cron": None,
        "tz": "UTC",
        "catch_up": "once",
        "max_catch_up": 100,
        "content_type": "application/json",
        "data": {"x": 1},
        "headers": {},
    }
    args.update(overrides)
    return build(**args)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# -- occurrences, alone ------------------------------------------------------------


def test_every_is_aligned_to_the_epoch() -> None:
    rec = recurrence(every=timedelta(minutes=5))
    assert rec.next_after(ms("2026-12-01T10:03:00+00:00")) == ms("2026-12-01T10:05:00+00:00")
    assert rec.next_after(ms("2026-12-01T10:05:00+00:00")) == ms("2026-12-01T10:10:00+00:00")
    assert rec.prev_before(ms("2026-12-01T10:05:00+00:00")) == ms("2026-12-01T10:00:00+00:00")


def test_cron_is_read_in_its_time_zone() -> None:
    rec = recurrence(cron="0 2 * * *", tz="Europe/Paris")  # 02:00 in Paris: 01:00 UTC in winter
    assert rec.next_after(ms("2026-12-01T00:00:00+00:00")) == ms("2026-12-01T01:00:00+00:00")
    summer = rec.next_after(ms("2026-07-01T00:00:00+00:00"))
    assert summer == ms("2026-07-01T00:00:00+00:00") + 0 or summer == ms(
        "2026-07-02T00:00:00+00:00"
    )


@pytest.mark.parametrize(
    ("policy", "released"),
    [("skip", []), ("once", [40]), ("all", [20, 30, 40])],
)
def test_catch_up_after_downtime(policy: str, released: list[int]) -> None:
    rec = recurrence(every=0.01, catch_up=policy, max_catch_up=3)  # every 10 ms
    # Due at 0 ms; the scheduler comes back at 45 ms: 0..40 all fell due.
    fire, following = rec.to_fire(0, 45)
    assert fire == released
    assert following == 50


def test_a_single_late_occurrence_is_released_whatever_the_policy() -> None:
    for policy in ("skip", "once", "all"):
        rec = recurrence(every=0.01, catch_up=policy)
        assert rec.to_fire(10, 19) == ([10], 20)


def test_definitions_are_canonical_and_ids_deterministic() -> None:
    assert recurrence(every=5).to_json() == recurrence(every=5.0).to_json()
    assert recurrence(every=5).digest() != recurrence(every=6).digest()
    assert occurrence_id("r", 1000) == occurrence_id("r", 1000)
    assert len({occurrence_id("r", 1000), occurrence_id("r", 2000), occurrence_id("s", 1000)}) == 3


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({}, "every= or cron="),
        ({"every": 1, "cron": "* * * * *"}, "every= or cron="),
        ({"cron": "every day"}, "not a cron expression"),
        ({"every": 1, "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"every": 1, "catch_up": "some"}, "catch_up must be one of"),
        ({"every": 1, "max_catch_up": 0}, "max_catch_up"),
        ({"every": 0}, "at least 1 ms"),
        ({"every": 1, "name": ""}, "schedule name"),
    ],
)
def test_bad_definitions_are_refused(overrides: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigurationError, match=words):
        recurrence(**overrides)


# -- against Redis -----------------------------------------------------------------


async def test_each_occurrence_is_released_once_by_racing_schedulers(
    bus_factory: Callable[..., EventBus],
) -> None:
    schedulers = [bus_factory(scheduler=True) for _ in range(3)]
    consumer = bus_factory(scheduler=False)
    seen: list[Delivery] = []

    @consumer.on(TICKS, group="g")
    async def tick(event: dict[str, Any], delivery: Delivery) -> None:
        seen.append(delivery)

    async with schedulers[0], schedulers[1], schedulers[2], consumer:
        assert await consumer.schedule("tick", TICKS, {"k": 1}, every=0.1) is True
        await wait_until(lambda: len(seen) >= 10, timeout=10)
        assert await consumer.unschedule("tick") is True
        count = len(seen)
    ids = [d.id for d in seen]
    assert len(set(ids)) == len(ids), "an occurrence was released twice"
    for delivery in seen[:count]:
        assert delivery.due is not None
        due_ms = round(delivery.due.timestamp() * 1000)
        assert due_ms % 100 == 0  # aligned to the epoch
        assert delivery.id == occurrence_id("tick", due_ms)
        assert int(delivery.stream_id.partition("-")[0]) >= due_ms  # not early (server clock)
    dues = sorted(round(d.due.timestamp() * 1000) for d in seen if d.due)
    assert all(b - a == 100 for a, b in itertools.pairwise(dues)), "an occurrence missing"


async def test_declaring_again_changes_nothing_and_other_arguments_replace(
    bus_factory: Callable[..., EventBus],
) -> None:
    async with bus_factory(scheduler=False) as bus:
        assert await bus.schedule("report", PINGS, {"v": 1}, cron="0 2 * * *", tz="UTC") is True
        (before,) = await bus.schedules()
        assert await bus.schedule("report", PINGS, {"v": 1}, cron="0 2 * * *", tz="UTC") is False
        assert await bus.schedules() == [before]
        assert before.next_due is not None
        assert before.next_due.hour == 2
        assert before.last_release is None
        assert await bus.schedule("report", PINGS, {"v": 1}, cron="30 3 * * *", tz="UTC") is True
        (after,) = await bus.schedules()
        assert after.cron == "30 3 * * *"
        assert after.next_due is not None
        assert (after.next_due.hour, after.next_due.minute) == (3, 30)
        assert await bus.unschedule("report") is True
        assert await bus.unschedule("report") is False
        assert await bus.schedules() == []


async def test_schedules_lists_the_last_release(bus_factory: Callable[..., EventBus]) -> None:
    async with bus_factory(scheduler=True) as bus:
        await bus.schedule("beat", PINGS, {"v": 1}, every=timedelta(milliseconds=100))
        started = datetime.now(timezone.utc)

        async def released() -> bool:
            (info,) = await bus.schedules()
            return info.last_release is not None

        await wait_until(released, timeout=5)
        (info,) = await bus.schedules()
        assert info.every == timedelta(milliseconds=100)
        assert info.last_release is not None
        assert info.next_due is not None
        assert info.next_due > info.last_release
        assert info.last_release > started - timedelta(seconds=1)


@pytest.mark.parametrize(("policy", "caught_up"), [("skip", []), ("once", [4]), ("all", [2, 3, 4])])
async def test_catch_up_policy_after_the_schedulers_were_down(
    bus_factory: Callable[..., EventBus], policy: str, caught_up: list[int]
) -> None:
    """Every 0.4 s from occurrence B; no scheduler until B + 4.5 periods (B .. B+4
    fell due meanwhile), then one starts: it catches up by the policy, then
    releases B+5, B+6 on time."""
    period = 0.4
    declarer = bus_factory(scheduler=False)
    consumer = bus_factory(scheduler=False)
    seen: list[Delivery] = []

    @consumer.on(TICKS, group="g")
    async def tick(event: dict[str, Any], delivery: Delivery) -> None:
        seen.append(delivery)

    async with declarer, consumer:
        await declarer.schedule(
            "job", TICKS, {"k": 1}, every=period, catch_up=policy, max_catch_up=3
        )
        (info,) = await declarer.schedules()
        assert info.next_due is not None
        first = info.next_due.timestamp()
        await anyio.sleep(first + 4.5 * period - time.time())  # downtime: B .. B+4 fall due
        assert seen == []
        async with bus_factory(scheduler=True):
            await wait_until(lambda: len(seen) >= len(caught_up) + 2, timeout=5)
        index = [round((d.due.timestamp() - first) / period) for d in seen if d.due]
        assert index[: len(caught_up) + 2] == [*caught_up, 5, 6]


async def test_recurring_refusals_happen_before_redis(bus_factory: Callable[..., EventBus]) -> None:
    async with bus_factory() as bus:
        with pytest.raises(ConfigurationError, match="local topic"):
            await bus.schedule("x", Topic("here", local=True), {"v": 1}, every=1)
        with pytest.raises(ConfigurationError, match="cron expression"):
            await bus.schedule("x", PINGS, {"v": 1}, cron="*/61 * * *")
        assert await bus.schedules() == []
