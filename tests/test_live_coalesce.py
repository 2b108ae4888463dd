"""Issue 15: many channels in one process (notification fan-out).

Coalesced subscribes and unsubscribes on the push connection keep per-caller
confirmation and per-caller ACL errors; subscribers joining and leaving at a
steady rate while messages flow leave nothing behind; a reconnect after a working
connection does not blame the URL scheme.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections.abc import Callable
from typing import Any, Final

import anyio
import pytest

from eventbus import EventBus, LivePolicy, errors
from eventbus._hub import Receiver
from eventbus._live._push import LiveConnection, _Route
from eventbus._subscription import Subscription
from eventbus.testing import RedisServer

from .helpers import command_calls, control_client, wait_until

FAST_LIVE: Final = LivePolicy(ping_interval=0.5, ping_timeout=0.5, reconnect_backoff=0.05)
HANG_GUARD_S: Final = 30.0


def channel_of(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}"


def live_connection(bus: EventBus) -> LiveConnection:
    live = bus._live._live
    assert live is not None
    return live


async def numsub(admin: Any, channels: list[str]) -> int:
    """Subscribers the server counts over ``channels`` (PUBSUB NUMSUB, in chunks)."""
    total = 0
    for start in range(0, len(channels), 1000):
        pairs = await admin.pubsub_numsub(*channels[start : start + 1000])
        total += sum(int(n) for _ch, n in pairs)
    return total


def none_subscribed(admin: Any, channels: list[str]) -> Callable[[], Any]:
    """A ``wait_until`` predicate: PUBSUB NUMSUB is 0 over ``channels``."""

    async def check() -> bool:
        return await numsub(admin, channels) == 0

    return check


def live_objects() -> dict[str, int]:
    """Receivers, subscriptions and route states alive in this process."""
    gc.collect()
    counts = {"Receiver": 0, "Subscription": 0, "_Route": 0}
    for obj in gc.get_objects():
        if isinstance(obj, Receiver | Subscription | _Route):
            counts[type(obj).__name__] += 1
    return counts


async def assert_no_channel_state(bus: EventBus) -> None:
    """Nothing per channel left in the push connection, the hub or the subscribers
    (once the replies to the last UNSUBSCRIBEs are read)."""
    live = live_connection(bus)
    await wait_until(lambda: all(s.command == b"PING" for s in live._outstanding), timeout=5)
    assert live._routes == {}
    assert live._pending == []
    assert live._topics == {}
    assert bus._hub.routes == {}
    assert bus._hub._trackers == {}
    assert bus._subscribers._open == {}


# -- coalesced subscribes ------------------------------------------------------------------


async def test_10000_concurrent_subscribes_coalesce_and_each_waits_for_its_own_confirmation(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    n = 10_000
    server = redis_server_factory()
    bus = bus_factory(server.url, live=FAST_LIVE)
    admin = control_client(server.url)
    received: dict[int, object] = {}
    entered = 0
    all_entered = anyio.Event()
    leave = anyio.Event()

    async def user(i: int) -> None:
        nonlocal entered
        async with bus.subscribe(f"user.{i}") as sub:
            # Published the moment this subscribe returned: it reaches the
            # subscriber only if the server had confirmed ITS channel by then.
            await bus.publish(f"user.{i}", i)
            received[i] = await sub.receive()
            entered += 1
            if entered == n:
                all_entered.set()
            await leave.wait()

    try:
        async with bus:
            async with bus.subscribe("warm-up"):  # the push connection's own start
                pass
            subscribes_before = await command_calls(admin, "subscribe")
            unsubscribes_before = await command_calls(admin, "unsubscribe")
            start = time.perf_counter()
            with anyio.fail_after(HANG_GUARD_S):
                async with anyio.create_task_group() as tg:
                    for i in range(n):
                        tg.start_soon(user, i)
                    await all_entered.wait()
                    burst = time.perf_counter() - start
                    subscribes = await command_calls(admin, "subscribe") - subscribes_before
                    channels = [channel_of(bus, f"user.{i}") for i in range(n)]
                    assert await numsub(admin, channels) == n
                    leave.set()  # all leave at once: their UNSUBSCRIBEs coalesce too
                await wait_until(none_subscribed(admin, channels), timeout=10)
                unsubscribes = await command_calls(admin, "unsubscribe") - unsubscribes_before
                await assert_no_channel_state(bus)
    finally:
        await admin.aclose()
    print(
        f"\n{n} concurrent subscribes (each publishes and receives once): {burst:.2f}s, "
        f"{subscribes} SUBSCRIBE and {unsubscribes} UNSUBSCRIBE commands"
    )
    assert received == {i: i for i in range(n)}
    assert 1 <= subscribes <= n // 100
    assert 1 <= unsubscribes <= n // 100


async def test_concurrent_subscribers_of_one_channel_share_one_subscribe(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    """Reference counting across a batch: one SUBSCRIBE, all confirmed, one channel."""
    n = 200
    server = redis_server_factory()
    bus = bus_factory(server.url, live=FAST_LIVE)
    admin = control_client(server.url)
    got: list[object] = []
    entered = 0
    all_entered = anyio.Event()
    published = anyio.Event()

    async def user() -> None:
        nonlocal entered
        async with bus.subscribe("room") as sub:
            entered += 1
            if entered == n:
                all_entered.set()
            await published.wait()
            got.append(await sub.receive())

    try:
        async with bus:
            before = await command_calls(admin, "subscribe")
            with anyio.fail_after(HANG_GUARD_S):
                async with anyio.create_task_group() as tg:
                    for _ in range(n):
                        tg.start_soon(user)
                    await all_entered.wait()
                    assert await command_calls(admin, "subscribe") - before == 1
                    assert await numsub(admin, [channel_of(bus, "room")]) == 1
                    receipt = await bus.publish("room", "hello")
                    assert receipt.receivers == 1  # one push connection
                    published.set()
                await wait_until(none_subscribed(admin, [channel_of(bus, "room")]))
                await assert_no_channel_state(bus)
    finally:
        await admin.aclose()
    assert got == ["hello"] * n


async def test_subscribe_leave_and_resubscribe_in_one_flush_keep_their_order(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    """A SUBSCRIBE, its UNSUBSCRIBE (the caller cancelled before the confirmation) and
    a new SUBSCRIBE of the same channel, queued together: the channel ends subscribed."""
    server = redis_server_factory()
    bus = bus_factory(server.url, live=FAST_LIVE)
    admin = control_client(server.url)
    channel = channel_of(bus, "flip")
    try:
        async with bus:
            async with bus.subscribe("warm-up"):
                pass
            for _ in range(20):
                with anyio.fail_after(HANG_GUARD_S):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_cancelled_subscribe, bus)
                        await anyio.lowlevel.checkpoint()
                        async with bus.subscribe("flip") as sub:
                            assert await numsub(admin, [channel]) == 1
                            await bus.publish("flip", 1)
                            assert await sub.receive() == 1
                        tg.cancel_scope.cancel()
                await wait_until(none_subscribed(admin, [channel]))
            await assert_no_channel_state(bus)
    finally:
        await admin.aclose()


async def _cancelled_subscribe(bus: EventBus) -> None:
    with anyio.CancelScope() as scope:
        scope.cancel()  # cancelled at its first wait: after its SUBSCRIBE was queued
        async with bus.subscribe("flip"):
            raise AssertionError("a cancelled subscribe was entered")


async def test_acl_refused_channel_fails_only_its_caller_in_a_batch(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    server = redis_server_factory()
    user, password = "eb-mixed", "pw"
    bus = bus_factory(f"redis://{user}:{password}@127.0.0.1:{server.port}/0", live=FAST_LIVE)
    rules = [
        "on",
        f">{password}",
        "resetkeys",
        "resetchannels",
        f"&{bus.prefix}:{{ok.*}}",
        "-@all",
        "+publish",
        "+subscribe",
        "+unsubscribe",
        "+ping",
        "+client|id",
    ]
    if server.binary.version >= (7, 2):
        rules.append("+client|setinfo")
    allowed = [f"ok.{i}" for i in range(50)]
    refused = ["no.a", "no.b", "no.c"]
    topics = allowed[:20] + refused[:1] + allowed[20:35] + refused[1:] + allowed[35:]
    outcomes: dict[str, object] = {}
    entered = 0
    all_done = anyio.Event()
    leave = anyio.Event()

    async def caller(topic: str) -> None:
        nonlocal entered
        try:
            async with bus.subscribe(topic) as sub:
                await bus.publish(topic, topic)
                outcomes[topic] = await sub.receive()
                entered += 1
                if entered == len(topics):
                    all_done.set()
                await leave.wait()
        except errors.PermissionDenied as exc:
            outcomes[topic] = exc
            entered += 1
            if entered == len(topics):
                all_done.set()

    admin = control_client(server.url)
    try:
        await admin.execute_command("ACL", "SETUSER", user, "reset", *rules)
        async with bus:
            async with bus.subscribe("ok.warm-up"):
                pass
            with anyio.fail_after(HANG_GUARD_S):
                async with anyio.create_task_group() as tg:
                    for topic in topics:
                        tg.start_soon(caller, topic)
                    await all_done.wait()
                    stats = (await admin.info("commandstats")).get("cmdstat_subscribe", {})
                    if "rejected_calls" in stats:  # Redis >= 7.0
                        # One refused batch, then each refused channel on its own.
                        assert int(stats["rejected_calls"]) == len(refused) + 1
                    assert await numsub(admin, [channel_of(bus, t) for t in allowed]) == 50
                    assert await numsub(admin, [channel_of(bus, t) for t in refused]) == 0
                    leave.set()
            # The bus carries on: a new subscriber after the refusals works.
            with anyio.fail_after(HANG_GUARD_S):
                async with bus.subscribe("ok.after") as sub:
                    await bus.publish("ok.after", "still here")
                    assert await sub.receive() == "still here"
            await wait_until(none_subscribed(admin, [channel_of(bus, t) for t in topics]))
            await assert_no_channel_state(bus)
    finally:
        await admin.aclose()
    for topic in allowed:
        assert outcomes[topic] == topic
    for topic in refused:
        exc = outcomes[topic]
        assert isinstance(exc, errors.PermissionDenied), (topic, exc)
        assert exc.command == "SUBSCRIBE"
        assert exc.channel == channel_of(bus, topic)
        assert channel_of(bus, topic) in str(exc)


# -- churn ---------------------------------------------------------------------------------


async def test_churn_misroutes_nothing_misses_nothing_and_leaves_nothing(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    """Subscribers join and leave at a steady rate while a publisher sends numbered
    messages to random channels: each confirmed subscriber receives every message
    of its channel whose publish returned between its subscribe and its leave, in
    order, and nothing of another channel; at the end nothing is left anywhere."""
    channels_n, seconds, rate = 300, 2.5, 300  # joins per second (and as many leaves)
    server = redis_server_factory()
    bus = bus_factory(server.url, live=FAST_LIVE)
    pub = bus_factory(server.url)
    admin = control_client(server.url)
    names = [f"churn.{i}" for i in range(channels_n)]
    issued = dict.fromkeys(names, 0)  # numbers taken by publishes issued so far
    returned = dict.fromkeys(names, 0)  # highest number whose publish has returned
    rng = random.Random(15)
    sessions: list[dict[str, Any]] = []
    leaves: dict[int, anyio.Event] = {}
    problems: list[str] = []
    stop = anyio.Event()

    async def publisher() -> None:
        while not stop.is_set():
            name = rng.choice(names)
            issued[name] += 1
            n = issued[name]
            await pub.publish(name, {"ch": name, "n": n})
            returned[name] = max(returned[name], n)

    async def session(key: int, name: str) -> None:
        record: dict[str, Any] = {"name": name, "got": []}
        async with bus.subscribe(name) as sub:
            record["first"] = issued[name] + 1  # published after the confirmation
            sessions.append(record)
            got: list[int] = record["got"]

            async def consume() -> None:
                async for event in sub:
                    if event["ch"] != name:
                        problems.append(f"{name} got a message of {event['ch']}")
                    got.append(event["n"])

            async with anyio.create_task_group() as tg:
                tg.start_soon(consume)
                await leaves[key].wait()
                # Everything whose publish returned before the leave must arrive.
                target = returned[name]
                await wait_until(
                    lambda: target < record["first"] or (bool(got) and got[-1] >= target),
                    timeout=5,
                    interval=0.005,
                )
                record["target"] = target
                tg.cancel_scope.cancel()
        record["left_received"] = sub.statistics().received

    baseline = live_objects()
    try:
        async with pub, bus:
            async with bus.subscribe("warm-up"):
                pass
            with anyio.fail_after(HANG_GUARD_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publisher)
                    active: list[int] = []
                    key = 0
                    start = anyio.current_time()
                    while anyio.current_time() - start < seconds:
                        key += 1
                        leaves[key] = anyio.Event()
                        tg.start_soon(session, key, rng.choice(names))
                        active.append(key)
                        if len(active) > 100:
                            leaves[active.pop(rng.randrange(len(active)))].set()
                        await anyio.sleep(1 / rate)
                    for k in active:
                        leaves[k].set()
                    await wait_until(
                        lambda: len(sessions) == key and all("target" in s for s in sessions),
                        timeout=HANG_GUARD_S,
                    )
                    stop.set()
            channels = [channel_of(bus, n) for n in names]
            await wait_until(none_subscribed(admin, channels), timeout=10)
            assert await admin.pubsub_channels(f"{bus.prefix}:*") == []
            await assert_no_channel_state(bus)
            published = sum(issued.values())
    finally:
        await admin.aclose()
    after = live_objects()
    checked = 0
    for record in sessions:
        got, first, target = record["got"], record["first"], record["target"]
        if got != sorted(set(got)):
            problems.append(f"{record['name']}: out of order or repeated: {got}")
        expected = set(range(first, target + 1))
        missing = expected - set(got)
        if missing:
            problems.append(f"{record['name']}: missed {sorted(missing)} of {first}..{target}")
        checked += len(expected)
    print(
        f"\nchurn: {len(sessions)} subscribers joined and left in {seconds}s, "
        f"{published} messages published, {checked} deliveries checked, objects "
        f"before {baseline} after {after}"
    )
    assert problems == []
    assert len(sessions) >= seconds * rate / 4  # the churn really happened
    assert checked > 0
    assert after == baseline  # no receiver, subscription or route state left alive


# -- the TLS hint ----------------------------------------------------------------------------


async def test_reconnect_after_client_kill_does_not_blame_the_scheme(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The "use rediss://" hint is for a first connection that fails (S3); a
    connection that had worked and was killed says only what happened."""
    caplog.set_level(logging.WARNING, logger="eventbus")
    server = redis_server_factory()
    bus = bus_factory(server.url, live=FAST_LIVE)
    admin = control_client(server.url)
    try:
        async with bus, bus.subscribe("tick") as sub:
            await bus.publish("tick", 1)
            assert await sub.receive() == 1
            before = bus.reconnects
            assert await admin.client_kill_filter(_type="pubsub") >= 1
            await wait_until(lambda: bus.reconnects > before, timeout=10)
            await bus.publish("tick", 2)
            with anyio.fail_after(5):
                assert await sub.receive() == 2
    finally:
        await admin.aclose()
    lost = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert lost, "the reconnect was not logged"
    for message in lost:
        assert "rediss://" not in message
        assert "TLS" not in message
        assert "certificate" not in message
