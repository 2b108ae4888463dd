"""RELIABILITY.md F10 and F10b: the push connection dies; nothing hangs, gaps are exact."""

from __future__ import annotations

import time
from collections import defaultdict

import anyio
import pytest

from eventbus import Delivery, EventBus, Gap, LivePolicy, Topic, signals
from eventbus.testing import FaultProxy

from .helpers import control_client, wait_until

pytestmark = [pytest.mark.fault]

FAST_LIVE = LivePolicy(
    ping_interval=1.0, ping_timeout=1.0, reconnect_backoff=0.05, connect_timeout=1.0
)

CHANNELS = [f"f.c{i}" for i in range(5)]
PATTERNS = ["f.*", "f.c[0-2]"]


class Recorder:
    """What one subscriber saw: (publisher, topic) -> seqs in arrival order."""

    def __init__(self) -> None:
        self.seqs: dict[tuple[str, str], list[int]] = defaultdict(list)
        self.gaps: list[Gap] = []

    def add(self, delivery: Delivery) -> None:
        self.seqs[(delivery.publisher, delivery.topic)].append(delivery.seq)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", [2, 3])
async def test_f10_kill_pubsub_resubscribes_and_accounts_gaps_exactly(
    redis_server_factory, protocol: int
) -> None:
    server = redis_server_factory()
    sub_bus = EventBus(server.url, prefix="f10", protocol=protocol, live=FAST_LIVE)
    pub_bus = EventBus(server.url, prefix="f10", protocol=protocol)
    topics = [Topic(name) for name in CHANNELS]
    pattern_topics = [Topic(p, pattern=True) for p in PATTERNS]
    recorders: list[Recorder] = []
    subs = []
    gap_signals: list[tuple[object, Gap]] = []
    reconnect_signals: list[int] = []
    sub_bus.connect_signal(
        signals.gap, lambda s, **kw: gap_signals.append((kw["subscription"], kw["gap"]))
    )
    sub_bus.connect_signal(
        signals.reconnected, lambda s, **kw: reconnect_signals.append(kw["reconnects"])
    )

    async def consume(sub, recorder: Recorder) -> None:
        async for _payload, delivery in sub.deliveries():
            recorder.add(delivery)

    restore_times: list[float] = []
    async with control_client(server.url) as ctl, sub_bus, pub_bus, anyio.create_task_group() as tg:
        # 100 subscribers: 14 per channel (70), 15 per pattern (30).
        for i in range(100):
            topic = topics[i % 5] if i < 70 else pattern_topics[i % 2]
            sub = sub_bus.subscribe(topic, buffer=1000)
            await sub.__aenter__()
            recorder = Recorder()
            subs.append((sub, topic))
            recorders.append(recorder)
            tg.start_soon(consume, sub, recorder)

        channel_names = [f"f10:{{{c}}}" for c in CHANNELS]

        async def restored(expect_reconnects: int) -> bool:
            if sub_bus.reconnects != expect_reconnects:
                return False
            numsub = dict(await ctl.pubsub_numsub(*channel_names))
            clients = await ctl.client_list(_type="pubsub")
            return (
                all(numsub[c] == 1 for c in channel_names)
                and await ctl.pubsub_numpat() == 2
                and len(clients) == 1
            )

        assert await restored(0)
        published = dict.fromkeys(CHANNELS, 0)
        start = anyio.current_time()

        async def publisher() -> None:
            # 1,000 msg/s for 15 s, round robin over the 5 channels.
            n = 0
            while n < 15_000:
                for _ in range(10):
                    name = CHANNELS[n % 5]
                    await pub_bus.publish(name, n)
                    published[name] += 1
                    n += 1
                await anyio.sleep_until(start + n / 1000)

        async def killer() -> None:
            for k, at in enumerate((2, 5, 8, 11), start=1):
                await anyio.sleep_until(start + at)
                killed = await ctl.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed == 1
                restore_times.append(await wait_until(lambda k=k: restored(k), timeout=1.0))

        async with anyio.create_task_group() as load:
            load.start_soon(publisher)
            load.start_soon(killer)
        # Fence: one more event per channel, so a trailing gap is detectable.
        for name in CHANNELS:
            await pub_bus.publish(name, "fence")
            published[name] += 1

        def fenced() -> bool:
            return all(
                rec.seqs.get((pub_bus.publisher_id, name), [0])[-1] == published[name]
                for rec, (_sub, topic) in zip(recorders, subs, strict=True)
                for name in CHANNELS
                if _matches(topic, name)
            )

        await wait_until(fenced, timeout=10)
        tg.cancel_scope.cancel()

    assert sub_bus.reconnects == 4
    assert sub_bus.disconnects == {"closed": 4}  # CLIENT KILL of a reader keeping up
    assert reconnect_signals == [1, 2, 3, 4]
    assert all(t <= 1.0 for t in restore_times), restore_times
    total_missed = 0
    for recorder, (sub, topic) in zip(recorders, subs, strict=True):
        stats = sub.statistics()
        expected = sum(published[name] for name in CHANNELS if _matches(topic, name))
        received = sum(len(v) for v in recorder.seqs.values())
        for seqs in recorder.seqs.values():
            assert seqs == sorted(set(seqs)), "out of order or duplicated"
        my_gaps = [gap for owner, gap in gap_signals if owner is sub]
        # Each gap reported once; sizes add up to exactly what was not received.
        assert len(my_gaps) == stats.gaps
        assert sum(g.size for g in my_gaps) == stats.missed == expected - received
        assert stats.reconnects == 4
        assert stats.dropped == 0
        total_missed += stats.missed
    # CLIENT KILL loses what was in flight; at 1,000 msg/s over 4 kills, some gap is certain
    # unless the reconnect were instant. Report, don't require: the accounting is the point.
    print(f"protocol={protocol} restore_s={restore_times} missed_total={total_missed}")


def _matches(topic: Topic, name: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, topic.name) if topic.pattern else topic.name == name


async def test_f10b_half_open_connection_is_detected_by_ping(redis_server_factory) -> None:
    server = redis_server_factory()
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        sub_bus = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="f10b", live=FAST_LIVE)
        pub_bus = EventBus(server.url, prefix="f10b")
        lost_at: list[float] = []
        sub_bus.connect_signal(
            signals.disconnected, lambda s, **kw: lost_at.append(time.monotonic())
        )
        async with (
            control_client(server.url) as ctl,
            sub_bus,
            pub_bus,
            sub_bus.subscribe("t") as sub,
        ):
            await pub_bus.publish("t", 1)
            with anyio.fail_after(5):
                assert await sub.receive() == 1
            old_id = sub_bus.push_client_id
            proxy.blackhole()
            cut = time.monotonic()
            await wait_until(lambda: bool(lost_at), timeout=5)
            detection = lost_at[0] - cut
            # ping_interval + ping_timeout + 0.5 s, far below the ~45 s TCP keepalive floor
            assert detection <= 2.5, detection
            for i in range(2, 12):  # published while partitioned: lost, must be reported
                await pub_bus.publish("t", i)
            await anyio.sleep_until(cut + 10)  # the partition lasts 10 s
            proxy.heal()
            await wait_until(lambda: sub_bus.reconnects == 1, timeout=5)
            assert sub_bus.push_client_id != old_id
            await pub_bus.publish("t", 12)
            with anyio.fail_after(5):
                value = await sub.receive()
            assert value == 12
            stats = sub.statistics()
            assert (stats.gaps, stats.missed, stats.reconnects) == (1, 10, 1)
            assert sub_bus.disconnects == {"ping_timeout": 1}

            # The old socket is closed: one pub/sub client left on the server.
            async def one_pubsub_client() -> bool:
                return len(await ctl.client_list(_type="pubsub")) == 1

            await wait_until(one_pubsub_client, timeout=5)
            print(f"F10b detection_s={detection:.2f}")


async def test_block_subscriber_does_not_trip_the_keepalive(bus_factory) -> None:
    # A PONG queued behind frames a full block-policy subscriber is holding up
    # is not a dead connection: no reconnect, nothing lost.
    live = LivePolicy(ping_interval=0.2, ping_timeout=0.2, reconnect_backoff=0.05)
    bus = bus_factory(live=live)
    async with bus, bus.subscribe("held", buffer=5, overflow="block") as sub:
        for n in range(200):
            await bus.publish("held", n)
        got = []
        with anyio.fail_after(20):
            for _ in range(200):
                got.append(await sub.receive())
                await anyio.sleep(0.005)  # a slow consumer: ~1 s behind in total
    assert got == list(range(200))
    assert bus.reconnects == 0


async def test_reconnected_means_resubscribed(redis_server_factory) -> None:
    """``reconnects`` rises (and ``signals.reconnected`` fires) only once Redis confirmed
    every subscription on the new connection: an event published right then arrives.
    The proxy's delay makes the confirmation come well after the connection is open."""
    server = redis_server_factory()
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        sub_bus = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="rr", live=FAST_LIVE)
        pub_bus = EventBus(server.url, prefix="rr")
        async with (
            control_client(server.url) as ctl,
            sub_bus,
            pub_bus,
            sub_bus.subscribe("t") as sub,
        ):
            await pub_bus.publish("t", 0)
            with anyio.fail_after(5):
                assert await sub.receive() == 0
            proxy.delay = 0.15
            await ctl.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await wait_until(lambda: sub_bus.reconnects == 1, timeout=10, interval=0.001)
            await pub_bus.publish("t", 1)
            with anyio.fail_after(5):
                assert await sub.receive() == 1
