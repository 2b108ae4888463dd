"""EventBus lifecycle, publish/subscribe semantics, refcounting, patterns, local topics."""

from __future__ import annotations

import gc
import logging

import anyio
import attrs
import pytest

from eventbus import Delivery, EventBus, Limits, LivePolicy, Topic, errors, signals
from eventbus.errors import (
    BusStateError,
    ConfigurationError,
    InvalidTopic,
    PayloadTooLarge,
    RedisUnavailable,
    SubscriberOverflow,
)

from .helpers import command_calls, control_client, wait_until


@attrs.frozen
class Tick:
    symbol: str
    price: float


prices = Topic("prices", Tick)


async def test_enter_returns_after_handler_subscriptions_confirmed(bus_factory, redis_url) -> None:
    bus = bus_factory()
    seen: list[Tick] = []

    @bus.on(prices)
    def handler(tick: Tick) -> None:
        seen.append(tick)

    async with control_client(redis_url) as ctl, bus:
        channel = f"{bus.prefix}:{{prices}}"
        # Confirmed before __aenter__ returned: no wait needed.
        assert dict(await ctl.pubsub_numsub(channel)) == {channel: 1}
        # A publish right after entry reaches the handler.
        assert (await ctl.publish(channel, b'{"symbol": "A", "price": 1.5}')) == 1
        await wait_until(lambda: len(seen) == 1)
    assert seen == [Tick("A", 1.5)]


async def test_lifecycle_misuse_raises_typed_errors(bus_factory) -> None:
    bus = bus_factory()
    with pytest.raises(BusStateError, match="before the EventBus is started"):
        await bus.publish(prices, Tick("A", 1))
    async with bus:
        with pytest.raises(BusStateError, match="already started"):
            await bus.__aenter__()
    with pytest.raises(BusStateError, match="cannot publish on a closed EventBus"):
        await bus.publish(prices, Tick("A", 1))
    with pytest.raises(BusStateError, match="cannot reopen"):
        async with bus:
            pass


async def test_user_exception_propagates_unwrapped(bus_factory) -> None:
    bus = bus_factory()
    with pytest.raises(KeyError, match="mine"):
        async with bus, bus.subscribe(prices):
            raise KeyError("mine")


async def test_unreachable_redis_fails_fast_and_clearly() -> None:
    from eventbus.testing import free_port

    bus = EventBus(f"redis://127.0.0.1:{free_port()}/0")
    with anyio.fail_after(5), pytest.raises(RedisUnavailable, match="unavailable"):
        async with bus:
            pass


async def test_exit_closes_every_connection(bus_factory, redis_url) -> None:
    async with control_client(redis_url) as ctl:
        before = {c["id"] for c in await ctl.client_list()}
        bus = bus_factory(client_name="closing-check")
        async with bus, bus.subscribe(prices):

            async def mine() -> list[dict[str, str]]:
                return [c for c in await ctl.client_list() if c["name"] == "closing-check"]

            # Subscribing only: ONE connection, the push connection.
            assert [c["flags"] for c in await mine()] == ["P"]
            await bus.publish(prices, Tick("A", 1))
            assert len(await mine()) == 2  # plus the command connection, once publishing

        # The server reaps a closed connection a moment after the client closed it:
        # wait (bounded) for that, never for a connection still open.
        async def all_closed() -> bool:
            return {c["id"] for c in await ctl.client_list()} - before == set()

        await wait_until(all_closed, timeout=5)


async def test_hundred_subscribers_share_one_subscribe(bus_factory, redis_url) -> None:
    bus = bus_factory()
    async with control_client(redis_url) as ctl, bus:
        channel = f"{bus.prefix}:{{prices}}"
        sub_before = await command_calls(ctl, "subscribe")
        unsub_before = await command_calls(ctl, "unsubscribe")
        subs = [bus.subscribe(prices, buffer=10) for _ in range(100)]
        for sub in subs:
            await sub.__aenter__()
        assert await command_calls(ctl, "subscribe") == sub_before + 1
        assert dict(await ctl.pubsub_numsub(channel)) == {channel: 1}
        assert len(await ctl.client_list(_type="pubsub")) >= 1
        await bus.publish(prices, Tick("A", 2))
        with anyio.fail_after(5):
            for sub in subs:
                assert await sub.receive() == Tick("A", 2)
        for sub in subs[:-1]:
            await sub.aclose()
        assert await command_calls(ctl, "unsubscribe") == unsub_before  # still one left
        await subs[-1].aclose()

        async def unsubscribed_once() -> bool:
            return await command_calls(ctl, "unsubscribe") == unsub_before + 1

        await wait_until(unsubscribed_once)
        await wait_until(
            lambda: _numsub_is(ctl, channel, 0),
        )


async def _numsub_is(ctl, channel: str, n: int) -> bool:
    return dict(await ctl.pubsub_numsub(channel)) == {channel: n}


async def test_pattern_and_channel_each_subscriber_exactly_once(bus_factory) -> None:
    bus = bus_factory()
    eu = Topic("prices.eu", Tick)
    all_prices = Topic("prices.*", Tick, pattern=True)
    async with (
        bus,
        bus.subscribe(eu) as exact,
        bus.subscribe(all_prices) as by_pattern,
        bus.subscribe(eu, all_prices) as both,
    ):
        for i in range(20):
            await bus.publish(eu, Tick("A", i))
        await bus.publish(Topic("prices.us", Tick), Tick("B", 0))
        with anyio.fail_after(5):
            got_exact = [await exact.receive() for _ in range(20)]
            got_pattern = [await by_pattern.receive() for _ in range(21)]
            got_both = [await both.receive() for _ in range(21)]
        assert [t.price for t in got_exact] == list(range(20))
        assert got_pattern[-1] == Tick("B", 0)
        # The subscriber on both the channel and a matching pattern gets each once.
        assert [t.price for t in got_both[:20]] == list(range(20))
        assert got_both[20] == Tick("B", 0)
        assert both.statistics().received == 21
        assert exact.statistics().buffered == 0


async def test_delivery_context_and_typed_payload(bus_factory) -> None:
    bus = bus_factory()
    async with bus, bus.subscribe(prices) as sub:
        receipt = await bus.publish(prices, Tick("X", 3.0), headers={"trace": "t-1"})
        with anyio.fail_after(5):
            tick, delivery = await sub.receive_delivery()
    assert tick == Tick("X", 3.0)
    assert isinstance(delivery, Delivery)
    assert delivery.id == receipt.id
    assert delivery.topic == "prices"
    assert delivery.headers == {"trace": "t-1"}
    assert delivery.publisher == bus.publisher_id
    assert delivery.seq == 1
    assert delivery.published_at is not None
    assert abs((delivery.published_at - receipt.published_at).total_seconds()) < 0.01


async def test_untyped_string_topic_carries_json_and_bytes(bus_factory) -> None:
    bus = bus_factory()
    async with bus, bus.subscribe("raw") as sub:
        await bus.publish("raw", {"a": [1, 2]})
        await bus.publish("raw", b"\x00\xffbinary")
        await bus.publish("raw", 42)
        with anyio.fail_after(5):
            assert await sub.receive() == {"a": [1, 2]}
            assert await sub.receive() == b"\x00\xffbinary"
            assert await sub.receive() == 42


async def test_raw_publish_without_envelope_is_accepted(bus_factory, redis_url) -> None:
    bus = bus_factory()
    async with control_client(redis_url) as ctl, bus, bus.subscribe(prices) as sub:
        await ctl.publish(f"{bus.prefix}:{{prices}}", '{"symbol": "R", "price": 9}')
        with anyio.fail_after(5):
            tick, delivery = await sub.receive_delivery()
    assert tick == Tick("R", 9.0)
    assert delivery.seq == 0
    assert delivery.published_at is None


async def test_undecodable_payload_is_counted_and_skipped(bus_factory, redis_url, caplog) -> None:
    bus = bus_factory()
    failures: list[object] = []
    async with control_client(redis_url) as ctl, bus, bus.subscribe(prices) as sub:
        bus.connect_signal(signals.failed, lambda sender, **kw: failures.append(kw["error"]))
        channel = f"{bus.prefix}:{{prices}}"
        await ctl.publish(channel, '{"symbol": "R", "price": "not a number"}')
        await bus.publish(prices, Tick("OK", 1))
        with anyio.fail_after(5):
            assert await sub.receive() == Tick("OK", 1)
    stats = sub.statistics()
    assert stats.errors == 1
    assert stats.received == 2
    assert len(failures) == 1
    assert "$.price" in str(failures[0])


async def test_payload_too_large_is_refused_before_io(bus_factory, redis_url) -> None:
    bus = bus_factory(limits=Limits(max_payload_bytes=1024))
    async with control_client(redis_url) as ctl, bus:
        before = await command_calls(ctl, "publish")
        with pytest.raises(PayloadTooLarge) as info:
            await bus.publish("big", "x" * 2000)
        assert await command_calls(ctl, "publish") == before
    assert info.value.topic == "big"
    assert info.value.limit == 1024
    assert "big" in str(info.value)
    assert info.value.size > 2000


async def test_payload_at_the_limit_is_accepted(bus_factory) -> None:
    # The limit applies to the encoded envelope: find the largest body that fits.
    bus = bus_factory(limits=Limits(max_payload_bytes=1024))
    async with bus, bus.subscribe("big") as sub:
        size = 1024
        while True:
            try:
                await bus.publish("big", "x" * size)
                break
            except PayloadTooLarge as exc:
                size -= exc.size - exc.limit
        with anyio.fail_after(5):
            assert len(await sub.receive()) == size
        with pytest.raises(PayloadTooLarge):
            await bus.publish("big", "x" * (size + 1))


@pytest.mark.parametrize(
    "name", ["", "a*", "a?", "[a]", "x{y}z", "a:b", "../x", "a\r\nFLUSHALL", "é", "\x00"]
)
async def test_invalid_topic_names_are_refused(bus_factory, name: str) -> None:
    with pytest.raises(InvalidTopic):
        Topic(name)
    bus = bus_factory()
    async with bus:
        with pytest.raises(InvalidTopic):
            await bus.publish(name, 1)


async def test_pattern_topics_cannot_be_published(bus_factory) -> None:
    bus = bus_factory()
    async with bus:
        with pytest.raises(ConfigurationError, match="pattern"):
            await bus.publish(Topic("p.*", pattern=True), 1)


async def test_bad_subscription_config_is_refused(bus_factory) -> None:
    bus = bus_factory()
    with pytest.raises(ConfigurationError, match="overflow"):
        bus.subscribe(prices, overflow="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="buffer"):
        bus.subscribe(prices, buffer=0)
    with pytest.raises(ConfigurationError, match="same event type"):
        bus.subscribe(prices, Topic("other", int))


async def test_local_topic_never_touches_redis(bus_factory, redis_url) -> None:
    bus = bus_factory()
    audit = Topic("audit", Tick, local=True)
    got: list[Tick] = []

    @bus.on(audit)
    def handler(tick: Tick) -> None:
        got.append(tick)

    async with control_client(redis_url) as ctl, bus, bus.subscribe(audit) as sub:
        before = await command_calls(ctl, "publish")
        event = Tick("L", 1)
        receipt = await bus.publish(audit, event)
        with anyio.fail_after(5):
            assert await sub.receive() is event  # same-type subscribers get the object
        await wait_until(lambda: got == [event])
        assert receipt.receivers == 2
        assert await command_calls(ctl, "publish") == before


async def test_local_pattern_subscription(bus_factory) -> None:
    bus = bus_factory()
    async with bus, bus.subscribe(Topic("jobs.*", local=True, pattern=True)) as sub:
        await bus.publish(Topic("jobs.a", local=True), 1)
        await bus.publish(Topic("other", local=True), 2)
        await bus.publish(Topic("jobs.b", local=True), 3)
        with anyio.fail_after(5):
            assert [await sub.receive(), await sub.receive()] == [1, 3]


async def test_local_block_policy_backpressures_the_publisher(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("bp", int, local=True)
    async with bus, bus.subscribe(topic, buffer=2, overflow="block") as sub:
        await bus.publish(topic, 1)
        await bus.publish(topic, 2)
        blocked = anyio.Event()
        done = anyio.Event()

        async def publish_third() -> None:
            blocked.set()
            await bus.publish(topic, 3)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish_third)
            await blocked.wait()
            await anyio.wait_all_tasks_blocked()
            assert not done.is_set()  # waiting for room
            with anyio.fail_after(5):
                assert await sub.receive() == 1
                assert await sub.receive() == 2
                await done.wait()
                assert await sub.receive() == 3
        assert sub.statistics().dropped == 0


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_newest"])
async def test_drop_policies_keep_the_right_events(bus_factory, policy: str) -> None:
    bus = bus_factory()
    topic = Topic("dp", int, local=True)
    overflowed: list[int] = []
    async with bus, bus.subscribe(topic, buffer=3, overflow=policy) as sub:  # type: ignore[arg-type]
        bus.connect_signal(signals.overflowed, lambda s, **kw: overflowed.append(kw["dropped"]))
        for i in range(10):
            await bus.publish(topic, i)
        stats = sub.statistics()
        assert (stats.received, stats.dropped, stats.buffered) == (10, 7, 3)
        kept = [await sub.receive() for _ in range(3)]
    assert kept == ([7, 8, 9] if policy == "drop_oldest" else [0, 1, 2])
    assert overflowed == list(range(1, 8))


async def test_error_policy_ends_only_that_subscription(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("ep", int, local=True)
    async with (
        bus,
        bus.subscribe(topic, buffer=2, overflow="error") as strict,
        bus.subscribe(topic, buffer=100) as relaxed,
    ):
        for i in range(5):
            await bus.publish(topic, i)
        assert [await strict.receive(), await strict.receive()] == [0, 1]
        with pytest.raises(SubscriberOverflow) as info:
            await strict.receive()
        assert info.value.buffer == 2
        assert [await relaxed.receive() for _ in range(5)] == [0, 1, 2, 3, 4]


async def test_iteration_ends_when_bus_closes_after_buffered_events(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("end", int, local=True)
    async with bus:
        sub = bus.subscribe(topic)
        await sub.__aenter__()
        await bus.publish(topic, 1)
        await bus.publish(topic, 2)
    received = [value async for value in sub]
    await sub.aclose()
    assert received == [1, 2]


async def test_unclosed_subscription_warns(bus_factory) -> None:
    bus = bus_factory()
    async with bus:
        sub = bus.subscribe(Topic("leak", local=True))
        await sub.__aenter__()
        sub._subscribers.detach(
            sub._receiver, sub._topic_tuple()
        )  # the bus on close, minus aclose()
        # The subscription sits in a reference cycle: an automatic collection
        # between `del` and the block would finalize it outside the block.
        gc.disable()
        try:
            del sub
            with pytest.warns(ResourceWarning, match="never closed"):
                gc.collect()
        finally:
            gc.enable()


async def test_shutdown_drains_buffered_handler_work(bus_factory) -> None:
    bus = bus_factory()
    topic = Topic("drain", int, local=True)
    handled: list[int] = []
    gate = anyio.Event()

    @bus.on(topic, buffer=100)
    async def slow(value: int) -> None:
        await gate.wait()
        handled.append(value)

    async with bus:
        for i in range(50):
            await bus.publish(topic, i)
        gate.set()
    assert handled == list(range(50))


async def test_handler_added_on_open_bus(bus_factory) -> None:
    bus = bus_factory()
    got: list[int] = []
    async with bus:

        @bus.on("late")
        def late(value: int) -> None:
            got.append(value)

        async def subscribed() -> bool:
            return bool(bus.handler_statistics(late))

        await wait_until(subscribed)
        await bus.publish("late", 5)
        await wait_until(lambda: got == [5])


async def test_embedded_bus_starts_and_stops_its_own_server() -> None:
    bus = EventBus.embedded()
    async with bus, bus.subscribe(prices) as sub:
        assert bus.url.startswith("redis://127.0.0.1:")
        await bus.publish(prices, Tick("E", 1))
        with anyio.fail_after(5):
            assert await sub.receive() == Tick("E", 1)
        server = bus._server
        assert server is not None
        assert server.running
    assert not server.running


async def test_repr_masks_password() -> None:
    bus = EventBus("redis://user:s3cret-canary@127.0.0.1:6379/0")
    assert "s3cret-canary" not in repr(bus)
    assert "***" in bus.url


async def test_handler_logs_are_rate_limited(bus_factory, caplog) -> None:
    caplog.set_level(logging.ERROR, logger="eventbus")
    bus = bus_factory()
    topic = Topic("boom", int, local=True)

    @bus.on(topic, buffer=1000)
    def boom(value: int) -> None:
        raise RuntimeError(f"boom {value}")

    async with bus:
        for i in range(250):
            await bus.publish(topic, i)
        await wait_until(lambda: bus.handler_statistics(boom)[0].errors == 250)
    records = [r for r in caplog.records if "boom" in r.getMessage()]
    assert len(records) == 3  # the 1st, the 100th, the 200th


async def test_concurrent_publishes_arrive_in_order_without_false_gaps(bus_factory) -> None:
    bus = bus_factory()
    async with bus, bus.subscribe("burst", buffer=2000) as sub:
        async with anyio.create_task_group() as tg:
            for n in range(1000):
                tg.start_soon(bus.publish, "burst", n)
        with anyio.fail_after(10):
            seqs = [(await sub.receive_delivery())[1].seq for _ in range(1000)]
        stats = sub.statistics()
    assert seqs == list(range(1, 1001))
    assert (stats.gaps, stats.missed, stats.dropped) == (0, 0, 0)


async def test_bytes_subscriber_gets_a_bare_payload_verbatim(bus_factory, redis_url) -> None:
    bus = bus_factory()
    async with control_client(redis_url) as ctl, bus, bus.subscribe(Topic("b", bytes)) as sub:
        await ctl.publish(f"{bus.prefix}:{{b}}", '{"a":  1}')
        with anyio.fail_after(5):
            assert await sub.receive() == b'{"a":  1}'


async def test_local_pattern_negated_class_follows_redis_globs(bus_factory) -> None:
    bus = bus_factory()
    async with bus, bus.subscribe(Topic("j.[^a]", local=True, pattern=True)) as sub:
        await bus.publish(Topic("j.a", local=True), "a")
        await bus.publish(Topic("j.b", local=True), "b")
        with anyio.fail_after(5):
            assert await sub.receive() == "b"
        assert sub.statistics().received == 1


def test_durations_accept_seconds_or_timedelta() -> None:
    from datetime import timedelta

    policy = LivePolicy(ping_interval=timedelta(milliseconds=1500), ping_timeout=0.5)
    assert (policy.ping_interval, policy.ping_timeout) == (1.5, 0.5)
    with pytest.raises(ConfigurationError, match="negative"):
        LivePolicy(connect_timeout=-1)
    bus = EventBus("redis://127.0.0.1:1/0", shutdown_grace=timedelta(seconds=3))
    assert bus._shutdown_grace == 3.0


async def test_eventbus_without_url_reads_eventbus_url(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EVENTBUS_URL", raising=False)
    assert EventBus().url == "redis://localhost:6379/0"
    monkeypatch.setenv("EVENTBUS_URL", redis_url)
    bus = EventBus(prefix="envurl")
    assert bus.url == redis_url
    seen: list[int] = []
    async with bus, bus.subscribe("n") as sub:
        await bus.publish("n", 1)
        with anyio.fail_after(5):
            seen.append(await sub.receive())
    assert seen == [1]


@pytest.mark.security
async def test_a_password_server_without_credentials_says_none_were_given(
    redis_server_factory,
) -> None:
    server = redis_server_factory(extra_args=["--requirepass", "s3cret-pw"])
    host_port = server.url.split("://", 1)[1]
    for protocol in (3, 2):
        with pytest.raises(errors.AuthenticationFailed) as info:
            async with EventBus(server.url, protocol=protocol):
                raise AssertionError("opened without credentials")
        message = str(info.value)
        assert "no credentials were given" in message
        assert "redis://:PASSWORD@host:port/0" in message
        assert "rejected the credentials" not in message
    with pytest.raises(errors.AuthenticationFailed, match="rejected the credentials") as info:
        async with EventBus(f"redis://:wrong-pw@{host_port}"):
            raise AssertionError("opened with a wrong password")
    assert "wrong-pw" not in str(info.value)
    bus = EventBus(f"redis://:s3cret-pw@{host_port}", prefix="pw")
    async with bus:
        assert (await bus.publish("t", 1)).receivers == 0
