"""RELIABILITY.md F4, F5, F28: Redis itself fails under durable topics.

* F4: redis-server is SIGKILLed mid-load and restarted from its AOF (or, as the
  negative control, from an RDB snapshot); consumers are ``tests.streams.worker``
  subprocesses, checked against their out-of-Redis oracle as in ``test_crash``.
* F5: a graceful ``SHUTDOWN`` and a restart that spends time in ``LOADING``.
* F28: Redis fills up (``maxmemory``, ``noeviction``), or runs an eviction policy.

Every scenario prints the figures it measured (lost, dup, recovery_s, ...) before
asserting them. Fault config (§6): claim_idle=2 s, claim interval=0.5 s, batch=10,
concurrency=4, block=1 s.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
import pytest

from eventbus import ClaimPolicy, Delivery, EventBus, Receipt, Topic, errors
from eventbus._keys import topic_keys

from ..helpers import control_client, wait_until

pytestmark = [pytest.mark.fault]

CLAIM_IDLE = 2.0
FAULT_GROUP: dict[str, Any] = {
    "claim_idle": CLAIM_IDLE,
    "claim": ClaimPolicy(idle=CLAIM_IDLE, interval=0.5),
    "batch": 10,
    "concurrency": 4,
    "block": 1.0,
}


def _event(n: int) -> dict[str, Any]:
    return {"n": n, "pad": "x" * 200}


# -- F28: out of memory, and eviction policies -------------------------------------------


async def test_f28a_out_of_memory_refuses_publishes_and_consumers_keep_draining(
    redis_server_factory: Any,
) -> None:
    # maxmemory is set just above what a backlog of 2,000 events uses, then a
    # publish_many of 2,000 more crosses it mid-batch. Redis accepts or refuses each
    # XADD of the pipeline on its own, so the batch is cut in two: the error says
    # which events were stored (BackendError.receipts). Then the member, gated
    # until now, drains everything stored while Redis stays full: XREADGROUP and
    # XACK are not refused under OOM (the dedupe marks and the cursor write are).
    server = redis_server_factory()
    topic = Topic("orders", durable=True)
    live = Topic("alerts")
    stream = topic_keys("f28", "orders").stream
    gate = anyio.Event()
    handled: dict[str, dict[str, Any]] = {}
    calls = 0

    consumer_bus = EventBus(server.url, prefix="f28")

    @consumer_bus.on(topic, group="billing", dedupe=60, **FAULT_GROUP)
    async def bill(event: dict[str, Any], d: Delivery) -> None:
        nonlocal calls
        await gate.wait()
        calls += 1
        handled[d.id] = event

    publisher = EventBus(server.url, prefix="f28")
    async with control_client(server.url) as ctl, consumer_bus, publisher:
        backlog = await publisher.publish_many(topic, [_event(n) for n in range(2000)])
        used = int((await ctl.info("memory"))["used_memory"])
        await ctl.config_set("maxmemory", used + 64 * 1024)
        batch = [_event(n) for n in range(2000, 4000)]
        with pytest.raises(errors.BackendOOM) as info:
            await publisher.publish_many(topic, batch)
        refused = info.value
        stored = [r for r in refused.receipts if r is not None]
        first_none = [r is None for r in refused.receipts].index(True)
        print(
            f"F28a: used_memory={used} maxmemory={used + 64 * 1024}: publish_many of"
            f" {len(batch)} stored {len(stored)} (the first {first_none} in order),"
            f" refused {len(batch) - len(stored)}"
        )
        assert len(refused.receipts) == len(batch)
        assert 0 < len(stored) < len(batch)
        assert refused.topic == "orders"
        assert "maxmemory" in str(refused)
        assert "noeviction" in str(refused)
        assert isinstance(refused, errors.BackendError)
        assert not isinstance(refused, errors.RedisUnavailable)  # not retried: it lasts
        # Nothing half-written: exactly the stored events are in the stream.
        entries = await ctl.xrange(stream, min=backlog[-1].stream_id)
        assert [e[0] for e in entries[1:]] == [r.stream_id for r in stored]
        assert await ctl.xlen(stream) == len(backlog) + len(stored)

        with pytest.raises(errors.BackendOOM):
            await publisher.publish(topic, _event(-1))

        # Live topics still work: PUBLISH is not refused under OOM.
        async with consumer_bus.subscribe(live) as sub:
            await publisher.publish(live, {"still": "live"})
            with anyio.fail_after(5):
                assert await sub.receive() == {"still": "live"}

        # The member drains everything stored, while Redis stays full.
        gate.set()
        published: dict[str, Receipt] = {r.id: r for r in (*backlog, *stored)}

        async def drained() -> bool:
            summary = await ctl.xpending(stream, "billing")
            return handled.keys() == published.keys() and summary["pending"] == 0

        drain_s = await wait_until(drained, timeout=30)
        with pytest.raises(errors.BackendOOM):  # still full: nothing was freed
            await publisher.publish(topic, _event(-2))
        (stats,) = consumer_bus.consumer_statistics(bill)
        memory = await ctl.info("memory")
        print(
            f"F28a: drained {len(handled)} events in {drain_s:.2f}s under OOM"
            f" (used_memory={memory['used_memory']} > maxmemory={memory['maxmemory']}):"
            f" acked={stats.acked} handled={stats.handled} dup={calls - len(handled)}"
        )
        assert int(memory["used_memory"]) > int(memory["maxmemory"])
        assert stats.acked == stats.handled == calls == len(published)
        assert stats.ack_lost_ownership == 0
        assert stats.dead_lettered == 0
        for event_id, event in handled.items():  # every stored event whole
            assert event == _event(event["n"])
            assert published[event_id].id == event_id

        # Memory raised: publishing works again, the refused events can be retried.
        await ctl.config_set("maxmemory", 0)
        retried = await publisher.publish_many(
            topic, [e for e, r in zip(batch, refused.receipts, strict=True) if r is None]
        )
        assert len(retried) == len(batch) - len(stored)


@pytest.mark.parametrize(
    ("policy", "warned"),
    [("allkeys-lru", "whole streams"), ("volatile-lru", "dedupe="), ("noeviction", None)],
)
async def test_f28b_an_eviction_policy_is_logged_as_a_warning_on_entry(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture, policy: str, warned: str | None
) -> None:
    # Like BullMQ's check: one INFO memory when a bus with a durable topic opens.
    server = redis_server_factory(extra_args=["--maxmemory", "64mb", "--maxmemory-policy", policy])
    caplog.set_level(logging.WARNING, logger="eventbus")
    bus = EventBus(server.url, prefix="f28b")

    @bus.on(Topic("orders", durable=True), group="billing")
    async def bill(event: Any) -> None:
        pass

    async with bus:
        warnings = [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    if warned is None:
        assert warnings == []
        return
    (record,) = warnings
    print(f"F28b: {record.levelname}: {record.getMessage()}")
    assert record.levelno == logging.WARNING
    assert repr(policy) in record.getMessage()
    assert warned in record.getMessage()
    assert "noeviction" in record.getMessage()


async def test_f28b_a_publish_only_bus_checks_on_its_first_durable_topic(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(extra_args=["--maxmemory-policy", "allkeys-lfu"])
    caplog.set_level(logging.WARNING, logger="eventbus")

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "maxmemory-policy" in r.getMessage()]

    async with control_client(server.url) as ctl, EventBus(server.url, prefix="f28b") as bus:
        before = int((await ctl.info("commandstats")).get("cmdstat_info", {}).get("calls", 0))
        await bus.publish("live-only", 1)  # a live topic: no check
        assert warnings() == []
        await bus.publish(Topic("orders", durable=True), 1)
        await bus.publish(Topic("audit", durable=True), 1)
        await wait_until(lambda: bool(warnings()), timeout=5)
        await bus.publish(Topic("more", durable=True), 1)
        stats = await ctl.info("commandstats")
    # One INFO for the bus (the control client's own two INFO calls aside).
    assert int(stats["cmdstat_info"]["calls"]) - before == 1 + 1
    assert len(warnings()) == 1


async def test_f28b_an_acl_that_refuses_info_skips_the_check_silently(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    server = redis_server_factory(extra_args=["--maxmemory-policy", "allkeys-lru"])
    async with control_client(server.url) as ctl:
        await ctl.execute_command(
            "ACL", "SETUSER", "app", "on", ">secret", "~*", "&*", "+@all", "-info"
        )
    caplog.set_level(logging.DEBUG, logger="eventbus")
    url = f"redis://app:secret@127.0.0.1:{server.port}/0"
    bus = EventBus(url, prefix="f28b")

    @bus.on(Topic("orders", durable=True), group="billing")
    async def bill(event: Any) -> None:
        pass

    async with bus:
        await bus.publish(Topic("orders", durable=True), 1)
    messages = [r.getMessage() for r in caplog.records if "maxmemory-policy" in r.getMessage()]
    assert len(messages) == 1
    assert "not checked" in messages[0]
    assert all(r.levelno < logging.WARNING for r in caplog.records if "INFO" in r.getMessage())
