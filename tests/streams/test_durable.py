"""Durable topics end to end: publish, consumer groups, iterators, replay, stats, wire."""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import attrs
import pytest
import redis

from eventbus import (
    ClaimPolicy,
    Delivery,
    EventBus,
    GroupSubscription,
    RetryPolicy,
    Subscription,
    Topic,
    errors,
)
from tests.helpers import control_client, stored_event, wait_until

FAST_CLAIM = ClaimPolicy(idle=2.0, interval=0.5)


@attrs.frozen
class Order:
    id: int
    amount: int


def stream_key(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}:stream"


async def test_publish_returns_the_stream_id_and_a_group_handles_each_event_once(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", Order, durable=True)
    bus = bus_factory()
    seen: list[tuple[Order, Delivery]] = []

    @bus.on(orders, group="billing", concurrency=4, claim=FAST_CLAIM)
    async def bill(order: Order, delivery: Delivery) -> None:
        seen.append((order, delivery))

    async with bus:
        receipt = await bus.publish(orders, Order(1, 10), headers={"trace": "t1"})
        receipts = await bus.publish_many(orders, [Order(i, i) for i in range(2, 102)])
        await wait_until(lambda: len(seen) == 101)

        async def all_acked() -> bool:
            stats[:] = [await bus.stats(orders)]
            return stats[0].topic("orders").groups[0].pending == 0

        stats: list[Any] = []
        await wait_until(all_acked)

    assert receipt.stream_id is not None
    ids = [tuple(map(int, str(r.stream_id).split("-"))) for r in receipts]
    assert ids == sorted(ids)  # stored in order
    by_id = {d.id: (o, d) for o, d in seen}
    assert len(by_id) == 101
    order, delivery = by_id[receipt.id]
    assert order == Order(1, 10)
    assert delivery.stream_id == receipt.stream_id
    assert delivery.attempt == 1
    assert delivery.group == "billing"
    assert delivery.headers == {"trace": "t1"}
    topic = stats[0].topic("orders")
    assert topic.length == 101
    (group,) = topic.groups
    assert (group.name, group.pending, group.dead_letters) == ("billing", 0, 0)
    async with control_client(redis_url) as admin:
        assert await admin.xlen(stream_key(bus, "orders")) == 101


@pytest.mark.parametrize("protocol", [3, 2])
async def test_every_group_gets_every_event_and_members_share_one_group(
    bus_factory: Callable[..., EventBus], protocol: int
) -> None:
    orders = Topic("orders", durable=True)
    a = bus_factory(protocol=protocol)
    b = bus_factory(prefix=a.prefix, protocol=protocol)
    got: dict[str, list[int]] = {"billing-a": [], "billing-b": [], "audit": []}

    @a.on(orders, group="billing", consumer="a", claim=FAST_CLAIM)
    async def bill_a(n: int) -> None:
        got["billing-a"].append(n)

    @b.on(orders, group="billing", consumer="b", claim=FAST_CLAIM)
    async def bill_b(n: int) -> None:
        got["billing-b"].append(n)

    @b.on(orders, group="audit", claim=FAST_CLAIM)
    def audit(n: int) -> None:  # sync handlers work too
        got["audit"].append(n)

    async with a, b:
        for i in range(300):
            await a.publish(orders, i)
        await wait_until(
            lambda: (
                len(got["billing-a"]) + len(got["billing-b"]) == 300 and len(got["audit"]) == 300
            )
        )
    billing = got["billing-a"] + got["billing-b"]
    assert sorted(billing) == list(range(300))  # each event to one member
    assert got["billing-a"]  # both members took a share
    assert got["billing-b"]
    assert sorted(got["audit"]) == list(range(300))


async def test_concurrent_publishers_each_get_their_own_stored_event(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # 64 tasks share the coalescing writer (pipelined batches, measured in
    # bench/publish.py): each call still returns its own event's stream id.
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    receipts: list[Any] = []

    async def publisher(k: int) -> None:
        for i in range(50):
            receipt = await bus.publish(orders, {"k": k, "i": i})
            receipts.append((k, i, receipt))

    async with bus, control_client(redis_url) as admin:
        async with anyio.create_task_group() as tg:
            for k in range(64):
                tg.start_soon(publisher, k)
        entries = await admin.xrange(stream_key(bus, "orders"))
    assert len(entries) == 64 * 50
    stored = {entry_id: stored_event(fields) for entry_id, fields in entries}
    for k, i, receipt in receipts:
        env = stored[receipt.stream_id]
        assert env.id == receipt.id
        assert env.data == {"k": k, "i": i}


async def test_a_refused_xadd_fails_only_its_own_publish_in_a_shared_batch(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # Publishes to two topics share pipelines; Redis refuses the XADDs to one
    # (its key holds a string: WRONGTYPE). Those callers get a typed error naming
    # their topic; every other caller in the same batches gets its stream id, and
    # the writer's connection stays in step (replies are not shifted by one).
    good, bad = Topic("good", durable=True), Topic("bad", durable=True)
    bus = bus_factory()
    outcomes: dict[tuple[str, int], Any] = {}

    async def publisher(topic: Topic[Any], i: int) -> None:
        try:
            outcomes[topic.name, i] = await bus.publish(topic, {"i": i})
        except errors.BackendError as exc:
            outcomes[topic.name, i] = exc

    async with bus, control_client(redis_url) as admin:
        await admin.set(stream_key(bus, "bad"), "not a stream")
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(publisher, good if i % 3 else bad, i)
        after = await bus.publish(good, {"i": "after"})
        entries = await admin.xrange(stream_key(bus, "good"))

    refused = {key: v for key, v in outcomes.items() if isinstance(v, errors.BackendError)}
    assert set(refused) == {("bad", i) for i in range(0, 200, 3)}
    for exc in refused.values():
        assert exc.topic == "bad"
        assert "WRONGTYPE" in str(exc)
    stored = {entry_id: stored_event(fields).data for entry_id, fields in entries}
    assert len(stored) == 200 - len(refused) + 1
    for (name, i), receipt in outcomes.items():
        if name == "good":
            assert stored[receipt.stream_id] == {"i": i}
    assert stored[after.stream_id] == {"i": "after"}


@pytest.mark.parametrize("batch", [1, 100])
async def test_a_member_runs_exactly_concurrency_handlers_at_once(
    bus_factory: Callable[..., EventBus], batch: int
) -> None:
    # Idle workers are woken one at a time; handlers that suspend must still
    # fill all `concurrency` slots (and never more), whatever the batch size.
    jobs = Topic("jobs", durable=True)
    bus = bus_factory()
    running = 0
    peak = 0
    done = 0
    gate = anyio.Event()

    @bus.on(jobs, group="workers", concurrency=8, batch=batch, claim=FAST_CLAIM)
    async def work(n: int) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await gate.wait()
        running -= 1
        done += 1

    async with bus:
        await bus.publish_many(jobs, list(range(30)))
        await wait_until(lambda: running == 8)
        assert peak == 8
        gate.set()
        await wait_until(lambda: done == 30)
    assert peak == 8


async def test_the_next_batch_is_read_while_a_handler_that_never_suspends_works(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # Double buffering: Redis must already be serving batch k+1 while batch k is
    # handled, even by a handler that never yields the event loop (a sync one).
    # Watched from Redis: the group's last delivered entry, read by the handler.
    jobs = Topic("jobs", durable=True)
    total, batch = 50, 10
    async with bus_factory() as publisher:
        await publisher.publish_many(jobs, list(range(total)))
    consumer = bus_factory()
    key = stream_key(consumer, "jobs")
    watch = redis.Redis.from_url(redis_url, decode_responses=True)
    seen: list[tuple[str, str]] = []  # (entry handled, last entry Redis delivered by then)

    @consumer.on(jobs, group="g", concurrency=1, batch=batch, claim=FAST_CLAIM)
    def work(n: int, delivery: Delivery) -> None:
        (group,) = watch.xinfo_groups(key)
        seen.append((delivery.stream_id, group["last-delivered-id"]))

    try:
        async with consumer:
            await wait_until(lambda: len(seen) == total)
        order = [entry_id for entry_id, _ in watch.xrange(key)]
    finally:
        watch.close()
    for handled, delivered in seen:
        position = order.index(handled) + 1
        if position % batch == 1:
            continue  # the read may have been sent a moment before: it is enough later
        batch_end = -(-position // batch) * batch
        assert order.index(delivered) + 1 > batch_end or batch_end == total, (handled, delivered)


async def test_reads_grow_while_handlers_keep_up_unless_batch_is_given(
    bus_factory: Callable[..., EventBus],
) -> None:
    jobs = Topic("jobs", durable=True)
    total = 5000
    async with bus_factory() as publisher:
        await publisher.publish_many(jobs, list(range(total)))

    async def reads_to_drain(batch: int | None) -> int:
        consumer = bus_factory()
        done = 0

        def work(n: int) -> None:
            nonlocal done
            done += 1

        options: dict[str, Any] = {} if batch is None else {"batch": batch}
        # On the loop: a handler that keeps up (in a worker thread, each call costs
        # a thread hand-off, and the handlers fall behind the reads).
        consumer.on(jobs, group=f"g{batch}", claim=FAST_CLAIM, in_thread=False, **options)(work)
        async with consumer:
            await wait_until(lambda: done == total)
            (stats,) = consumer.consumer_statistics(work)
            return stats.reads

    reads = {batch: await reads_to_drain(batch) for batch in (None, 100)}
    assert reads[100] >= total // 100  # given: every read asks for 100
    assert reads[None] <= total // 1000 + 10  # 100, 200, 400, 800, then 1,000 a read


async def test_a_member_whose_handlers_fall_behind_keeps_its_first_read_size(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # Slow handlers: two reads of 100 (one handled, one waiting), then no more
    # until there is room; the reads do not grow, so other members can take the rest.
    jobs = Topic("jobs", durable=True)
    async with bus_factory() as publisher:
        await publisher.publish_many(jobs, list(range(3000)))
    consumer = bus_factory()
    key = stream_key(consumer, "jobs")
    gate = anyio.Event()
    running = 0

    @consumer.on(jobs, group="g", concurrency=10, claim=FAST_CLAIM)
    async def work(n: int) -> None:
        nonlocal running
        running += 1
        await gate.wait()

    async with consumer, control_client(redis_url) as admin:
        await wait_until(lambda: running == 10)

        async def delivered() -> int:
            return int((await admin.xpending(key, "g"))["pending"])

        await wait_until(lambda: _at_least(delivered, 200))
        assert await delivered() == 200
        gate.set()


async def _at_least(count: Callable[[], Awaitable[int]], want: int) -> bool:
    return await count() >= want


async def test_iterator_member_acks_when_the_next_event_is_requested(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", Order, durable=True)
    bus = bus_factory()
    async with bus, control_client(redis_url) as admin:
        await bus.publish_many(orders, [Order(i, i) for i in range(5)])
        key = stream_key(bus, "orders")
        sub = bus.subscribe(orders, group="iter", claim=FAST_CLAIM)
        assert isinstance(sub, GroupSubscription)
        async with sub as events:
            got = []
            async for order in events:
                got.append(order)
                assert events.delivery is not None
                assert events.delivery.attempt == 1
                # The event being processed is pending until the loop asks for more.
                pending = await admin.xpending(key, "iter")
                assert pending["pending"] >= 1
                if len(got) == 5:
                    break
        assert got == [Order(i, i) for i in range(5)]
        await wait_until(lambda: _pending(admin, key, "iter", 0))


async def _pending(admin: Any, key: str, group: str, want: int) -> bool:
    return int((await admin.xpending(key, group))["pending"]) == want


async def test_iterator_body_error_hands_the_event_back_for_redelivery(
    bus_factory: Callable[..., EventBus],
) -> None:
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    async with bus:
        await bus.publish(orders, "first")

        async def fail_on_first() -> None:
            async with bus.subscribe(orders, group="g", claim=FAST_CLAIM) as events:
                async for _event in events:
                    raise RuntimeError("body failed")

        with pytest.raises(RuntimeError):
            await fail_on_first()
        # Released: a new member gets it at once (next claim pass), as attempt 2.
        async with bus.subscribe(orders, group="g", claim=FAST_CLAIM) as events:
            with anyio.fail_after(5):
                async for event in events:
                    assert event == "first"
                    assert events.delivery is not None
                    assert events.delivery.attempt == 2
                    break


async def test_live_subscription_replays_from_earliest_a_time_and_an_id(
    bus_factory: Callable[..., EventBus],
) -> None:
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    async with bus:
        first = await bus.publish_many(orders, list(range(5)))
        await anyio.sleep(0.01)  # distinct milliseconds for the time seek
        middle = datetime.now(timezone.utc)
        await anyio.sleep(0.01)
        second = await bus.publish_many(orders, list(range(5, 10)))

        async def take(sub: Subscription[Any], n: int) -> list[Any]:
            out = []
            with anyio.fail_after(5):
                async with sub as events:
                    async for event in events:
                        out.append(event)
                        if len(out) == n:
                            return out
            return out

        assert await take(bus.subscribe(orders, from_="earliest"), 10) == list(range(10))
        assert await take(bus.subscribe(orders, from_=middle), 5) == list(range(5, 10))
        assert second[0].stream_id is not None
        assert await take(bus.subscribe(orders, from_=second[0].stream_id), 5) == list(range(5, 10))
        assert await take(bus.subscribe(orders, from_=first[3].id), 7) == list(range(3, 10))
        with pytest.raises(errors.ConfigurationError):
            async with bus.subscribe(orders, from_="no-such-event"):
                pass

        async with bus.subscribe(orders) as latest:  # "latest": only what follows
            await bus.publish(orders, 99)
            with anyio.fail_after(5):
                assert await latest.receive() == 99


async def test_live_handler_on_a_durable_topic_and_decorator_replay(
    bus_factory: Callable[..., EventBus],
) -> None:
    orders = Topic("orders", durable=True)
    seed = bus_factory()
    async with seed:
        await seed.publish_many(orders, [1, 2, 3])
    bus = bus_factory(prefix=seed.prefix)
    replayed: list[int] = []
    live: list[int] = []

    @bus.on(orders, from_="earliest")
    def replay(n: int) -> None:
        replayed.append(n)

    @bus.on(orders)
    def tail(n: int) -> None:
        live.append(n)

    async with bus:
        await bus.publish(orders, 4)
        await wait_until(lambda: replayed == [1, 2, 3, 4] and live == [4])


async def test_raw_redis_clients_interoperate_both_ways(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", Order, durable=True)
    bus = bus_factory()
    got: list[tuple[Order, Delivery]] = []

    # One at a time: the order of the two entries is asserted (a sync handler runs
    # in worker threads, and ten at once could end in any order).
    @bus.on(orders, group="g", claim=FAST_CLAIM, concurrency=1)
    def handle(order: Order, delivery: Delivery) -> None:
        got.append((order, delivery))

    async with bus, control_client(redis_url) as admin:
        key = stream_key(bus, "orders")
        # Another client writes a bare payload (field "data"), and a full envelope.
        await admin.xadd(key, {"data": json.dumps({"id": 7, "amount": 70})})
        envelope = {
            "eventbus": 1,
            "id": "ext-1",
            "pub": "other-service",
            "seq": 1,
            "ts": 1700000000000,
            "ct": "application/json",
            "data": {"id": 8, "amount": 80},
        }
        await admin.xadd(key, {"id": "ext-1", "env": json.dumps(envelope)})
        await wait_until(lambda: len(got) == 2)
        assert [o for o, _ in got] == [Order(7, 70), Order(8, 80)]
        assert got[1][1].id == "ext-1"
        assert got[1][1].publisher == "other-service"

        # And eventbus output is readable by a raw XREAD + json.loads, as the wire
        # page says: the payload in 'd', the id's 16 bytes in 'i' (base64url).
        receipt = await bus.publish(orders, Order(9, 90))
        entries = await admin.xrange(key, min=receipt.stream_id, max=receipt.stream_id)
        ((_entry_id, fields),) = entries
        assert list(fields) == ["i", "p", "s", "d"]
        assert json.loads(fields["d"]) == {"id": 9, "amount": 90}
        assert base64.urlsafe_b64decode(fields["i"] + "==").hex() == receipt.id
        assert int(fields["s"]) >= 1


async def test_shutdown_hands_prefetched_events_back_without_charging_a_delivery(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", durable=True)
    slow = bus_factory(shutdown_grace=5)
    started = anyio.Event()
    release = anyio.Event()
    handled_slow: list[int] = []

    @slow.on(orders, group="g", consumer="slow", concurrency=1, batch=20, claim=FAST_CLAIM)
    async def one_at_a_time(n: int) -> None:
        started.set()
        await release.wait()
        handled_slow.append(n)

    async def finish_once_closing() -> None:
        await wait_until(lambda: "closing" in repr(slow) or "closed" in repr(slow))
        release.set()

    async with control_client(redis_url) as admin, anyio.create_task_group() as tg:
        async with slow:
            await slow.publish_many(orders, list(range(20)))
            with anyio.fail_after(5):
                await started.wait()
            key = stream_key(slow, "orders")
            await wait_until(lambda: _pending(admin, key, "g", 20))
            # Leave while one handler runs and 19 are prefetched: the running one
            # finishes (within the grace), the 19 go back to the group.
            tg.start_soon(finish_once_closing)
        stats = slow.consumer_statistics(one_at_a_time)[0]
        assert handled_slow == [0]
        assert stats.released == 19
        assert stats.reads >= 1
        assert await _pending(admin, key, "g", 19)

        other = bus_factory(prefix=slow.prefix)
        attempts: dict[int, int] = {}

        @other.on(orders, group="g", consumer="other", claim=FAST_CLAIM)
        def take(n: int, delivery: Delivery) -> None:
            attempts[n] = delivery.attempt

        async with other:
            elapsed = await wait_until(lambda: len(attempts) == 19, timeout=5)
        print(f"released entries taken over in {elapsed:.2f}s")
        assert elapsed <= FAST_CLAIM.interval + 1.0
        assert sorted(attempts) == list(range(1, 20))
        assert set(attempts.values()) == {1}  # no delivery charged for the release
        assert await _pending(admin, key, "g", 0)


async def test_a_restarted_member_finishes_its_own_pending_entries_first(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    async with control_client(redis_url) as admin:
        key = stream_key(bus, "orders")
        async with bus:
            await bus.publish_many(orders, [1, 2, 3])
        # A member that crashed holding three entries (read, never acked).
        await admin.xgroup_create(key, "g", id="0")
        await admin.xreadgroup("g", "worker-1", {key: ">"}, count=3)
        restarted = bus_factory(prefix=bus.prefix)
        seen: list[tuple[int, int]] = []

        # One at a time, so the calls follow the order the entries were taken back
        # (a sync handler runs in worker threads: ten at once could end in any order).
        @restarted.on(
            orders, group="g", consumer="worker-1", claim=ClaimPolicy(idle=60), concurrency=1
        )
        def handle(n: int, delivery: Delivery) -> None:
            seen.append((n, delivery.attempt))

        async with restarted:
            elapsed = await wait_until(lambda: len(seen) == 3, timeout=5)
        assert elapsed < 1.0  # long before claim_idle (60 s)
        assert seen == [(1, 2), (2, 2), (3, 2)]  # Redis counted the second delivery
        assert await _pending(admin, key, "g", 0)


async def test_retry_policy_and_max_attempts_reach_the_dead_letter_stream(
    bus_factory: Callable[..., EventBus],
) -> None:
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    attempts: list[int] = []

    @bus.on(
        orders,
        group="g",
        max_attempts=3,
        retry=RetryPolicy(backoff=0.05, jitter=0),
        claim=FAST_CLAIM,
    )
    def always_fails(n: int, delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError(f"bad {n}")

    async with bus:
        receipt = await bus.publish(orders, 1)
        await wait_until(lambda: len(attempts) == 3)
        letters: list[Any] = []

        async def dead_lettered() -> bool:
            letters[:] = await bus.dead_letters(orders)
            return len(letters) == 1

        await wait_until(dead_lettered)
    assert attempts == [1, 2, 3]
    (letter,) = letters
    assert letter.event_id == receipt.id
    assert letter.original_id == receipt.stream_id
    assert (letter.group, letter.attempts, letter.reason) == ("g", 3, "handler_error")
    assert (letter.error_type, letter.error_message) == ("ValueError", "bad 1")


def test_durable_options_are_validated_before_any_io(
    bus_factory: Callable[..., EventBus],
) -> None:
    with pytest.raises(errors.ConfigurationError):
        Topic("x", maxlen=10)  # maxlen needs durable
    with pytest.raises(errors.ConfigurationError):
        Topic("x", durable=True, local=True)
    with pytest.raises(errors.ConfigurationError):
        Topic("x", durable=True, maxlen=0)
    with pytest.raises(errors.ConfigurationError):
        Topic("x", durable=True, trim="sometimes")  # type: ignore[arg-type]
    assert Topic("x", durable=True, retention=timedelta(hours=1)).retention == 3600.0
    bus = bus_factory()
    with pytest.raises(errors.ConfigurationError):
        bus.on(Topic("live"), group="g")  # groups need a durable topic
    with pytest.raises(errors.ConfigurationError):
        bus.subscribe(Topic("live"), from_="earliest")  # a live topic keeps no history
    with pytest.raises(errors.ConfigurationError):
        bus.on(Topic("d", durable=True), group="g", concurrency=0)
    with pytest.raises(errors.ConfigurationError):
        bus.on(Topic("d", durable=True), group="has space")
    with pytest.raises(errors.ConfigurationError):
        bus.on(Topic("d", durable=True), publish_to=Topic("e", durable=True))


async def test_a_live_member_keeps_its_slow_handler_s_entry_from_being_claimed(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # F3c: a handler running 3x claim_idle on a live member is not handed to
    # another member (the member heartbeats what it holds), and Redis's delivery
    # count is not raised by it.
    orders = Topic("orders", durable=True)
    claim = ClaimPolicy(idle=1.0, interval=0.2)
    slow_bus, other_bus = bus_factory(), bus_factory()
    other_bus = bus_factory(prefix=slow_bus.prefix)
    calls: list[tuple[str, int, int]] = []

    @slow_bus.on(orders, group="g", consumer="slow", concurrency=1, claim=claim)
    async def slow(n: int, delivery: Delivery) -> None:
        calls.append(("slow", n, delivery.attempt))
        await anyio.sleep(3 * claim.idle)

    @other_bus.on(orders, group="g", consumer="other", claim=claim)
    def other(n: int, delivery: Delivery) -> None:
        calls.append(("other", n, delivery.attempt))

    async with slow_bus, control_client(redis_url) as admin:
        await slow_bus.publish(orders, 1)
        await wait_until(lambda: len(calls) == 1)
        key = stream_key(slow_bus, "orders")
        async with other_bus:
            await anyio.sleep(2.5 * claim.idle)  # the point: time passing, not ordering
            (held,) = await admin.xpending_range(key, "g", min="-", max="+", count=10)
            await wait_until(lambda: _pending(admin, key, "g", 0), timeout=10)
        stats = other_bus.consumer_statistics(other)[0]
    assert calls == [("slow", 1, 1)]
    assert stats.claimed == 0
    assert held["consumer"] == "slow"
    assert held["times_delivered"] == 1  # not re-counted while it ran


async def test_a_dead_lettered_bare_payload_replays_as_an_event(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # Another client wrote a bare, non-JSON payload; the handler gives up on it.
    orders = Topic("orders", durable=True)
    bus = bus_factory()
    seen: list[tuple[Any, int]] = []
    fail = True

    @bus.on(orders, group="g", max_attempts=1, claim=FAST_CLAIM)
    def handle(payload: bytes, delivery: Delivery) -> None:
        seen.append((payload, delivery.attempt))
        if fail:
            raise ValueError("not yet")

    async with bus, control_client(redis_url) as admin:
        await admin.xadd(stream_key(bus, "orders"), {"data": b"\xff raw bytes"})
        letters: list[Any] = []

        async def dead_lettered() -> bool:
            letters[:] = await bus.dead_letters(orders)
            return len(letters) == 1

        await wait_until(dead_lettered)
        assert letters[0].envelope is not None
        fail = False
        assert await bus.replay_dead_letters(orders) == 1
        await wait_until(lambda: len(seen) == 2)
    assert seen == [(b"\xff raw bytes", 1), (b"\xff raw bytes", 1)]


async def test_replays_and_iterator_members_give_their_connections_back(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    orders = Topic("orders", durable=True)
    bus = bus_factory(client_name="conn-check")
    async with control_client(redis_url) as admin:

        async def connections() -> int:
            return sum(1 for c in await admin.client_list() if c["name"] == "conn-check")

        async with bus:
            await bus.publish(orders, 1)
            baseline = -1
            for i in range(6):
                if i == 1:  # after one round, the bus's own connections are all open
                    baseline = await connections()
                async with bus.subscribe(orders, from_="earliest") as replay:
                    with anyio.fail_after(5):
                        assert await replay.receive() == 1
                async with bus.subscribe(orders, group=f"g{i}", claim=FAST_CLAIM) as member:
                    with anyio.fail_after(5):
                        async for event in member:
                            assert event == 1
                            break

            async def back_to_baseline() -> bool:
                return await connections() <= baseline

            await wait_until(back_to_baseline)
        assert await connections() == 0
