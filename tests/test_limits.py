"""RELIABILITY.md §5.5 and S5: every limit of ``eventbus.Limits`` at its boundary.

For each limit (docs/wire-format.md, "Topic names and limits"): a value AT the limit
is accepted and travels end to end through a real redis-server; the limit + 1 is
refused with a typed eventbus error BEFORE any I/O, shown by ``INFO commandstats``
being unchanged (as in test_security.py, test_s6_bad_topics_are_rejected_before_any_io).
Commandstats are server-wide, so those tests run on their own redis-server.
Limits checked on receipt (payload size, entry size and field count) are fed with
raw redis-py ``PUBLISH``/``XADD``: over the limit, a live message is dropped and
counted, a stream entry is dead-lettered with its reason at the first delivery.

Most boundaries run twice: with the default ``Limits()`` and with small custom ones,
which proves a bus applies its own limits, not only the defaults.

Finally the structures poison fills stay bounded: the dead-letter stream keeps about
``Limits.dead_letter_maxlen`` entries (``XADD MAXLEN ~``), and ``dedupe=`` marks carry
a TTL and expire. Each test prints what it measured (``S5 ...``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from eventbus import Delivery, EventBus, Limits, LivePolicy, Topic, signals
from eventbus._config import MAX_PATTERN_LEN, MAX_TOPIC_LEN
from eventbus.errors import ConfigurationError, InvalidTopic, PayloadTooLarge
from eventbus.testing import RedisServer

from .helpers import wait_until

pytestmark = pytest.mark.security

QUIET_LIVE: Final = LivePolicy(ping_interval=60.0)  # no keepalive PING inside a measurement
GROUP: Final[dict[str, Any]] = {"group": "g", "consumer": "g-1", "block": 0.2, "batch": 50}
HANG_GUARD_S: Final = 10.0
ENTRY_SLACK: Final = 1024  # a stream entry may exceed max_payload_bytes by this much (names)
HEADER_LEN: Final = 8192  # key + value of one header (docs/wire-format.md); not in Limits

SMALL: Final = Limits(
    max_payload_bytes=4096,
    max_topic_len=20,
    max_pattern_len=32,
    max_headers=4,
    max_entry_fields=8,
)
LIMITS: Final = [pytest.param(Limits(), id="default"), pytest.param(SMALL, id="small")]


# -- helpers ------------------------------------------------------------------------------


async def command_calls(admin: aioredis.Redis) -> dict[str, int]:
    """Calls per command on the server, but INFO (our probe) and PING (keepalive)."""
    stats = await admin.info("commandstats")
    return {
        name: int(value["calls"])
        for name, value in stats.items()
        if name not in ("cmdstat_info", "cmdstat_ping")
    }


@contextlib.asynccontextmanager
async def no_io(admin: aioredis.Redis) -> AsyncIterator[None]:
    """Fail unless the block sent nothing to Redis (INFO commandstats unchanged)."""
    before = await command_calls(admin)
    yield
    assert await command_calls(admin) == before


async def invoke(call: Callable[[], Awaitable[object] | object]) -> object:
    """``call()``, awaited if it returns an awaitable."""
    result = call()
    return await result if isinstance(result, Awaitable) else result


async def raises_before_io(
    admin: aioredis.Redis,
    error: type[Exception],
    calls: list[Callable[[], Awaitable[object] | object]],
) -> list[Exception]:
    """Each call raises ``error`` (sync or async: ``on`` and ``subscribe`` raise when
    called), and all of them together send no command to Redis."""
    errors: list[Exception] = []
    async with no_io(admin):
        for call in calls:
            with pytest.raises(error) as info:
                await invoke(call)
            errors.append(info.value)
    return errors


def stream_key(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}:stream"


def dlq_key(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}:dlq"


def raw_client(server: RedisServer) -> aioredis.Redis:
    """redis-py with bytes replies: what a foreign (or hostile) producer would use."""
    return aioredis.Redis.from_url(server.url)


def envelope(event_id: str, data: Any) -> bytes:
    """A well-formed eventbus envelope (wire version 1), as another client would write it."""
    return orjson.dumps(
        {
            "eventbus": 1,
            "id": event_id,
            "pub": "raw-producer",
            "seq": 1,
            "ts": int(time.time() * 1000),
            "ct": "application/json",
            "data": data,
        }
    )


async def body_len_at_limit(bus: EventBus, topic: Topic[Any], limit: int) -> int:
    """The length of a string event whose envelope on ``bus`` is exactly ``limit`` bytes.

    A refused publish reports the encoded size and takes no sequence number (so the
    next envelope of this topic has the same length but for the body): the envelope's
    overhead is that size minus the body. Sends nothing to Redis.
    """
    probe = "x" * (limit + 1)
    with pytest.raises(PayloadTooLarge) as info:
        await bus.publish(topic, probe)
    return limit - (info.value.size - len(probe))


async def receive_raw(pubsub: Any, timeout: float) -> bytes:
    """The next message on a raw redis-py pub/sub connection."""
    with anyio.fail_after(timeout):
        while True:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if msg is not None:
                data: bytes = msg["data"]
                return data


async def test_s5_the_no_io_probe_sees_what_does_reach_redis(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    """The probe every refusal below relies on can fail: a publish that happens shows."""
    server = redis_server_factory()
    bus = bus_factory(server.url, live=QUIET_LIVE)
    async with raw_client(server) as admin, bus:
        for topic in (Topic("live"), Topic("stored", durable=True)):
            with pytest.raises(AssertionError):
                async with no_io(admin):
                    await bus.publish(topic, 1)


# -- the ceilings of Limits -----------------------------------------------------------------


def test_s5_limits_can_lower_topic_and_pattern_lengths_not_raise_them() -> None:
    # Topic() checks a name when it is created, before it meets a bus: against the
    # defaults. A bus's Limits therefore cannot raise them (refused, not ignored).
    assert Limits().max_topic_len == MAX_TOPIC_LEN == 200
    assert Limits().max_pattern_len == MAX_PATTERN_LEN == 256
    assert Limits(max_topic_len=MAX_TOPIC_LEN, max_pattern_len=MAX_PATTERN_LEN) == Limits()
    with pytest.raises(ConfigurationError, match="max_topic_len must be at most 200"):
        Limits(max_topic_len=MAX_TOPIC_LEN + 1)
    with pytest.raises(ConfigurationError, match="max_pattern_len must be at most 256"):
        Limits(max_pattern_len=MAX_PATTERN_LEN + 1)
    for field in ("max_payload_bytes", "max_headers", "max_entry_fields", "dead_letter_maxlen"):
        with pytest.raises(ConfigurationError):
            Limits(**{field: 0})


# -- topic and pattern length ---------------------------------------------------------------


@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_topic_length_boundary(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
) -> None:
    n = limits.max_topic_len
    at, over = "t" * n, "t" * (n + 1)
    durable_at = Topic("d" * n, durable=True)
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    # The group member runs on a bus of its own, started after the refusals: its
    # blocking reads would show in INFO commandstats.
    consumer = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    if n == MAX_TOPIC_LEN:  # the default: Topic itself refuses, whatever the bus
        with pytest.raises(InvalidTopic, match=f"longer than {n} characters"):
            Topic(over)
        over_durable: Topic[Any] | str = over
    else:
        over_durable = Topic(over, durable=True)  # fits Topic's default; the bus refuses it
    got: list[Any] = []

    @consumer.on(durable_at, **GROUP)
    async def on_durable(event: Any) -> None:
        got.append(event)

    async with raw_client(server) as admin, bus:
        refusals = await raises_before_io(
            admin,
            InvalidTopic,
            [
                lambda: bus.publish(over, 1),
                lambda: bus.publish_many(over, [1, 2]),
                lambda: bus.publish(over_durable, 1),
                lambda: bus.subscribe(over),
                lambda: bus.subscribe(over_durable, group="g"),
                lambda: bus.on(over),
                lambda: bus.on(over_durable, group="g"),
                lambda: bus.on(durable_at, group="g2", publish_to=over),
                lambda: bus.dead_letters(over_durable),
                lambda: bus.stats(over_durable),
            ],
        )
        assert {getattr(e, "reason", None) for e in refusals} == {f"longer than {n} characters"}

        # At the limit: a live and a durable topic, end to end.
        async with bus.subscribe(at) as live, consumer:
            live_receipt = await bus.publish(at, {"live": n})
            durable_receipt = await bus.publish(durable_at, {"durable": n})
            with anyio.fail_after(HANG_GUARD_S):
                assert await live.receive() == {"live": n}
            await wait_until(lambda: got == [{"durable": n}], timeout=HANG_GUARD_S)
        stored = await admin.xlen(stream_key(bus, durable_at.name))
    assert live_receipt.receivers == 1
    assert durable_receipt.stream_id is not None
    assert stored == 1
    print(f"\nS5 topic_len limit={n} accepted={n} refused={n + 1} refusal_paths={len(refusals)}")


@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_pattern_length_boundary(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
) -> None:
    n = limits.max_pattern_len
    at, over = "p." + "*" * (n - 2), "p." + "*" * (n - 1)  # both match topic "p.x"
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    calls: list[Callable[[], object]] = []
    if n == MAX_PATTERN_LEN:
        # The default: Topic itself refuses it, before a bus ever sees it.
        calls.append(lambda: Topic(over, pattern=True))
    else:
        over_pattern = Topic(over, pattern=True)
        calls += [lambda: bus.subscribe(over_pattern), lambda: bus.on(over_pattern)]
    async with raw_client(server) as admin, bus:
        refusals = await raises_before_io(admin, InvalidTopic, calls)
        reasons = {getattr(e, "reason", None) for e in refusals}
        assert reasons == {f"pattern longer than {n} characters"}
        async with bus.subscribe(Topic(at, pattern=True)) as sub:
            receipt = await bus.publish("p.x", {"n": n})
            with anyio.fail_after(HANG_GUARD_S):
                event, delivery = await sub.receive_delivery()
            patterns = await admin.pubsub_numpat()
    assert event == {"n": n}
    assert delivery.topic == "p.x"
    assert receipt.receivers == 1
    assert patterns == 1
    print(f"\nS5 pattern_len limit={n} accepted={len(at)} refused={len(over)}")


# -- headers --------------------------------------------------------------------------------


async def header_boundary(
    server: RedisServer,
    bus_factory: Callable[..., EventBus],
    limits: Limits,
    at: dict[str, str],
    over: dict[str, str],
) -> tuple[list[Exception], Delivery, Delivery]:
    """Publish with ``over`` (refused before any I/O), then with ``at`` to a live and a
    durable topic; returns the refusals and the two deliveries of ``at``."""
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    consumer = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    durable = Topic("orders", durable=True)
    got: list[Delivery] = []

    @consumer.on(durable, **GROUP)
    async def on_durable(event: Any, delivery: Delivery) -> None:
        got.append(delivery)

    async with raw_client(server) as admin, bus:
        refusals = await raises_before_io(
            admin,
            ConfigurationError,
            [
                lambda: bus.publish("prices", 1, headers=over),
                lambda: bus.publish(durable, 1, headers=over),
                lambda: bus.publish_many(durable, [1, 2], headers=over),
            ],
        )
        async with bus.subscribe("prices") as live, consumer:
            await bus.publish("prices", 1, headers=at)
            await bus.publish(durable, 2, headers=at)
            with anyio.fail_after(HANG_GUARD_S):
                _event, live_delivery = await live.receive_delivery()
            await wait_until(lambda: len(got) == 1, timeout=HANG_GUARD_S)
    return refusals, live_delivery, got[0]


@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_header_count_boundary(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
) -> None:
    n = limits.max_headers
    at = {f"h{i}": f"v{i}" for i in range(n)}
    over = {**at, "one-more": "v"}
    refusals, live, durable = await header_boundary(
        redis_server_factory(), bus_factory, limits, at, over
    )
    assert all(f"{n + 1} headers, the limit is {n}" in str(e) for e in refusals)
    assert live.headers == at
    assert durable.headers == at
    print(f"\nS5 headers limit={n} accepted={len(at)} refused={len(over)}")


async def test_s5_header_size_boundary(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    # Each header's key + value: at most 8192 characters (a fixed bound, not in Limits).
    key = "trace"
    at = {key: "v" * (HEADER_LEN - len(key))}
    over = {key: "v" * (HEADER_LEN - len(key) + 1)}
    refusals, live, durable = await header_boundary(
        redis_server_factory(), bus_factory, Limits(), at, over
    )
    assert all(f"header {key!r} is too long" in str(e) for e in refusals)
    assert live.headers == at
    assert durable.headers == at
    print(f"\nS5 header_len limit={HEADER_LEN} accepted={HEADER_LEN} refused={HEADER_LEN + 1}")


# -- payload size on publish ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["live", "durable"])
@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_payload_size_boundary_on_publish(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
    kind: str,
) -> None:
    limit = limits.max_payload_bytes
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    consumer = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    topic: Topic[Any] = Topic("blobs", durable=kind == "durable")
    got: list[str] = []

    @consumer.on(Topic("blobs", durable=True), **GROUP)
    async def on_durable(event: str) -> None:
        got.append(event)

    async with raw_client(server) as admin, bus:
        async with no_io(admin):
            body = await body_len_at_limit(bus, topic, limit)
            with pytest.raises(PayloadTooLarge) as over:
                await bus.publish(topic, "x" * (body + 1))
            with pytest.raises(PayloadTooLarge):
                await bus.publish_many(topic, ["x", "x" * (body + 1)])  # all or nothing
        assert (over.value.size, over.value.limit, over.value.topic) == (limit + 1, limit, "blobs")

        # At the limit: sent, stored, received; the wire carries exactly `limit` bytes.
        channel = f"{bus.prefix}:{{blobs}}"
        async with bus.subscribe(topic) as sub, admin.pubsub() as raw_sub:
            if topic.durable:
                receipt = await bus.publish(topic, "x" * body)
                entries = await admin.xrange(stream_key(bus, "blobs"))
                assert len(entries) == 1
                # A durable entry's size is its field names and values together.
                wire = b"".join(k + v for k, v in entries[0][1].items())
                async with consumer:  # a group member reads it too
                    await wait_until(lambda: len(got) == 1, timeout=HANG_GUARD_S)
                assert len(got[0]) == body
            else:
                await raw_sub.subscribe(channel)
                receipt = await bus.publish(topic, "x" * body)
                wire = await receive_raw(raw_sub, HANG_GUARD_S)
            with anyio.fail_after(HANG_GUARD_S):
                received = await sub.receive()
    assert len(wire) == limit
    assert len(received) == body
    assert receipt.topic == "blobs"
    print(f"\nS5 payload {kind} limit={limit} accepted_bytes={len(wire)} refused={over.value.size}")


# -- payload size on receipt ----------------------------------------------------------------


@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_live_message_over_the_limit_is_dropped_and_counted(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
) -> None:
    limit = limits.max_payload_bytes
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    failures: list[BaseException] = []
    bus.connect_signal(signals.failed, lambda s, **kw: failures.append(kw["error"]))
    at = orjson.dumps("x" * (limit - 2))  # a JSON string of exactly `limit` bytes
    over = orjson.dumps("x" * (limit - 1))
    async with raw_client(server) as raw, bus, bus.subscribe("prices") as sub:
        channel = f"{bus.prefix}:{{prices}}"
        assert await raw.publish(channel, over) == 1  # reaches the bus ...
        assert await raw.publish(channel, at) == 1
        with anyio.fail_after(HANG_GUARD_S):
            first = await sub.receive()  # ... which reads in order: `over` was dropped
        stats = sub.statistics()
    assert first == "x" * (limit - 2)
    assert (stats.received, stats.delivered, stats.errors) == (1, 1, 1)
    assert len(failures) == 1
    assert isinstance(failures[0], PayloadTooLarge)
    assert (failures[0].size, failures[0].limit) == (limit + 1, limit)
    print(f"\nS5 live_receipt limit={limit} delivered_bytes={len(at)} dropped_bytes={len(over)}")


def sized_entry(shape: str, total: int, event_id: bytes) -> dict[bytes, bytes]:
    """A valid stream entry whose names and values add up to exactly ``total`` bytes:
    an eventbus envelope (``id`` + ``env``) or a bare payload (``data``)."""
    if shape == "data":
        return {b"data": orjson.dumps("x" * (total - len(b"data") - 2))}
    base = len(b"id") + len(event_id) + len(b"env") + len(envelope(event_id.decode(), ""))
    return {b"id": event_id, b"env": envelope(event_id.decode(), "x" * (total - base))}


@pytest.mark.parametrize("shape", ["envelope", "data"])
@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_stream_entry_size_boundary_on_receipt(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
    shape: str,
) -> None:
    # A stream entry may carry max_payload_bytes + 1 KiB in all (field names, an id):
    # one byte more is dead-lettered as too_large at once, never handled.
    total = limits.max_payload_bytes + ENTRY_SLACK
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    topic = Topic("inbox", durable=True)
    handled: list[tuple[str, int]] = []

    @bus.on(topic, **GROUP, max_attempts=3)
    async def on_entry(event: str, delivery: Delivery) -> None:
        handled.append((delivery.stream_id or "", len(event)))

    async with raw_client(server) as raw, bus:
        at = sized_entry(shape, total, b"at-limit")
        over = sized_entry(shape, total + 1, b"over-limit")
        assert sum(len(k) + len(v) for k, v in at.items()) == total
        assert sum(len(k) + len(v) for k, v in over.items()) == total + 1
        at_id = (await raw.xadd(stream_key(bus, "inbox"), at)).decode()
        over_id = (await raw.xadd(stream_key(bus, "inbox"), over)).decode()
        await wait_until(lambda: bus.consumer_statistics(on_entry)[0].dead_lettered == 1)
        await wait_until(lambda: len(handled) == 1)
        (dead,) = await bus.dead_letters(topic)
        pending = (await raw.xpending(stream_key(bus, "inbox"), "g"))["pending"]
    assert [entry_id for entry_id, _ in handled] == [at_id]
    assert (dead.original_id, dead.reason, dead.attempts) == (over_id, "too_large", 1)
    assert f"is {total + 1} bytes" in dead.error_message
    assert pending == 0
    print(f"\nS5 entry_size {shape} accepted_bytes={total} dead_lettered_bytes={total + 1}")


@pytest.mark.parametrize("limits", LIMITS)
async def test_s5_stream_entry_field_count_boundary_on_receipt(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    limits: Limits,
) -> None:
    n = limits.max_entry_fields
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=limits, live=QUIET_LIVE)
    topic = Topic("inbox", durable=True)
    handled: list[tuple[str, Any]] = []

    @bus.on(topic, **GROUP, max_attempts=3)
    async def on_entry(event: Any, delivery: Delivery) -> None:
        handled.append((delivery.id, event))

    def entry(event_id: str, fields: int) -> dict[bytes, bytes]:
        extra = {f"x{i}".encode(): b"1" for i in range(fields - 2)}  # names are distinct
        return {b"id": event_id.encode(), b"env": envelope(event_id, {"ok": 1}), **extra}

    async with raw_client(server) as raw, bus:
        at_id = (await raw.xadd(stream_key(bus, "inbox"), entry("at-limit", n))).decode()
        over_id = (await raw.xadd(stream_key(bus, "inbox"), entry("over", n + 1))).decode()
        fields = [len(f) for _, f in await raw.xrange(stream_key(bus, "inbox"))]
        await wait_until(lambda: bus.consumer_statistics(on_entry)[0].dead_lettered == 1)
        await wait_until(lambda: len(handled) == 1)
        (dead,) = await bus.dead_letters(topic)
    assert fields == [n, n + 1]  # as Redis stored them
    assert handled == [("at-limit", {"ok": 1})]
    assert (dead.original_id, dead.event_id, dead.reason, dead.attempts) == (
        over_id,
        "over",
        "too_many_fields",
        1,
    )
    assert f"{n + 1} fields, the limit is {n}" in dead.error_message
    assert at_id != over_id
    print(f"\nS5 entry_fields limit={n} accepted={n} dead_lettered={n + 1}")


# -- bounded structures under poison --------------------------------------------------------

DLQ_MAXLEN: Final = 1000
POISON: Final = 10_000
"""Poison events of the bounded-DLQ scenario: 10x the dead-letter MAXLEN. The plan
asks for 100,000. One consumer dead-letters about 1,200 a second on this 2-core
machine (one DEAD_LETTER script call each; most of the Python time goes to
formatting the error's traceback): 100,000 would take well over a minute, 20,000
took 16 s alone and 27 s beside another test run, 10,000 takes about 8 s."""
HANDLER_POISON: Final = POISON // 10
"""Of those, published through the bus, whose handler raises (``handler_error``); the
rest are undecodable entries written raw (``decode_error``)."""
DEDUPE_WINDOW: Final = 1.5


@pytest.mark.slow
async def test_s5_dead_letter_stream_and_dedupe_marks_stay_bounded_under_poison(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    server = redis_server_factory()
    bus = bus_factory(server.url, limits=Limits(dead_letter_maxlen=DLQ_MAXLEN), live=QUIET_LIVE)
    topic = Topic("poison", durable=True)
    stream, dlq = stream_key(bus, "poison"), dlq_key(bus, "poison")

    @bus.on(topic, **GROUP, concurrency=20, max_attempts=1, dedupe=DEDUPE_WINDOW)
    async def always_fails(event: Any) -> None:
        raise ValueError("poison")

    lengths: list[int] = []
    async with raw_client(server) as raw, bus:
        start = time.monotonic()
        # Ten rounds of both kinds, so the kept dead letters show both reasons.
        raw_per_round, bus_per_round = (POISON - HANDLER_POISON) // 10, HANDLER_POISON // 10
        for r in range(10):
            async with raw.pipeline(transaction=False) as pipe:
                for j in range(r * raw_per_round, (r + 1) * raw_per_round):
                    pipe.xadd(stream, {b"id": b"bad-%d" % j, b"env": b"not json"})
                await pipe.execute()
            await bus.publish_many(topic, [{"n": j} for j in range(bus_per_round)])

        async def drained() -> bool:
            lengths.append(await raw.xlen(dlq))  # sampled all along the drain
            return bus.consumer_statistics(always_fails)[0].dead_lettered == POISON

        await wait_until(drained, timeout=60, interval=0.05)
        elapsed = time.monotonic() - start
        final_len = await raw.xlen(dlq)
        counts = await raw.hgetall(f"{bus.prefix}:{{poison}}:dlq-count")
        pending = (await raw.xpending(stream, "g"))["pending"]
        keys = {k.decode() async for k in raw.scan_iter(match=f"{bus.prefix}:*", count=1000)}
        reasons = {dl.reason for dl in await bus.dead_letters(topic, count=DLQ_MAXLEN * 2)}
        stats = bus.consumer_statistics(always_fails)[0]
    bound = DLQ_MAXLEN * 1.1
    print(
        f"\nS5 dlq poison={POISON} maxlen={DLQ_MAXLEN} final_xlen={final_len}"
        f" max_sampled_xlen={max(lengths)} samples={len(lengths)} bound={bound:.0f}"
        f" seconds={elapsed:.1f} rate={POISON / elapsed:.0f}/s keys={sorted(keys)}"
    )
    assert DLQ_MAXLEN <= final_len <= bound
    assert max(lengths) <= bound
    assert counts == {b"g": str(POISON).encode()}  # every one was dead-lettered, once
    assert (stats.dead_lettered, stats.handled, stats.ack_lost_ownership) == (POISON, 0, 0)
    assert pending == 0
    assert reasons == {"decode_error", "handler_error"}
    # No dedupe mark for an event that was never handled; the topic has its fixed keys
    # (and, while the bus runs, its member's name lease and the schedulers' lease of
    # the prefix: a bus that serves group handlers runs a scheduler).
    assert not [k for k in keys if ":seen:" in k]
    assert {k for k in keys if ":lease:" not in k} <= {
        stream,
        dlq,
        f"{bus.prefix}:{{poison}}:dlq-count",
        f"{bus.prefix}:{{poison}}:cursors",
        f"{bus.prefix}:delayed:lease",
    }


async def test_s5_dedupe_marks_have_a_ttl_and_expire(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    server = redis_server_factory()
    bus = bus_factory(server.url, live=QUIET_LIVE)
    topic = Topic("orders", durable=True)
    handled: list[str] = []

    @bus.on(topic, **GROUP, max_attempts=1, dedupe=DEDUPE_WINDOW)
    async def on_order(event: Any, delivery: Delivery) -> None:
        if event.get("poison"):
            raise ValueError("poison")
        handled.append(delivery.id)

    marks_match = f"{bus.prefix}:{{orders}}:seen:g:*"
    async with raw_client(server) as raw, bus:
        good = await bus.publish_many(topic, [{"n": i} for i in range(200)])
        bad = await bus.publish_many(topic, [{"poison": True} for _ in range(50)])
        await wait_until(
            lambda: bus.consumer_statistics(on_order)[0].dead_lettered == len(bad), timeout=10
        )
        await wait_until(lambda: bus.consumer_statistics(on_order)[0].acked == len(good))

        async def marks() -> list[bytes]:
            return [k async for k in raw.scan_iter(match=marks_match, count=1000)]

        await wait_until(lambda: _has(marks, len(good)))  # written with the ack flush
        keys = await marks()
        ttls = [await raw.pttl(k) for k in keys]
        start = time.monotonic()
        await wait_until(lambda: _has(marks, 0), timeout=DEDUPE_WINDOW + 5, interval=0.1)
        expired_after = time.monotonic() - start
        # Nothing else with a TTL is left, but the running member's name lease and
        # the lease of the bus's scheduler (on by default in a bus serving a group).
        leases = [k async for k in raw.scan_iter(match="*:lease:*", count=1000)]
        leases += [k async for k in raw.scan_iter(match="*:delayed:lease", count=1000)]
        expires = (await raw.info("keyspace")).get("db0", {}).get("expires", 0) - len(leases)
    assert sorted(k.decode().rsplit(":", 1)[1] for k in keys) == sorted(r.id for r in good)
    assert all(0 < ttl <= DEDUPE_WINDOW * 1000 for ttl in ttls), ttls
    assert expires == 0
    print(
        f"\nS5 dedupe marks={len(keys)} poison_marks=0 window_s={DEDUPE_WINDOW}"
        f" ttl_ms_min={min(ttls)} ttl_ms_max={max(ttls)} gone_after_s={expired_after:.2f}"
    )


async def _has(marks: Callable[[], Awaitable[list[bytes]]], count: int) -> bool:
    return len(await marks()) == count
