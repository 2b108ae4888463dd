"""RELIABILITY.md F3c, F21, F30: faults of one consumer-group member.

* F3c: handlers running 3x ``claim_idle`` on live members are never claimed (the
  member's claimer heartbeats what it holds); the negative control, a holder
  that does not heartbeat (a raw redis-py consumer), loses its entry to a claim
  and the event runs twice.
* F21: a group iterator's task cancelled 0-3 ms after its handler returned,
  around the ``XACK``, 2,000 times through a 1 ms delay proxy, with sentinel
  ``SET``/``GET`` pairs on the member's own command client: no reply cross-talk,
  no leaked connection, nothing lost.
* F30: two members under one consumer name: the second is refused with
  ``ConsumerNameInUse`` (a lease on the name), a clean leave frees the name at
  once, a crashed holder's lease lapses within its TTL, and a member whose name
  was taken while it was frozen stops reading.

Real redis-server only; fault timing comes from one seed, printed first
(``EVENTBUS_FAULT_SEED=<n>`` replays it).
"""

from __future__ import annotations

import gc
import logging
import os
import random
import secrets
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from eventbus import ClaimPolicy, Delivery, EventBus, Topic, errors
from eventbus._keys import member_lease, topic_keys
from eventbus._streams._lease import LEASE_TTL
from eventbus.testing import FaultProxy

from ..helpers import control_client, wait_until
from .oracle import OracleTail
from .test_crash import fleet_of

pytestmark = [pytest.mark.fault]


def fault_rng(name: str) -> random.Random:
    seed = int(os.environ.get("EVENTBUS_FAULT_SEED") or secrets.randbelow(2**31))
    print(f"\n{name}: EVENTBUS_FAULT_SEED={seed}")
    return random.Random(seed)


class Calls:
    """Every handler call: (event id, entry id, attempt, who)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, str]] = []

    def add(self, d: Delivery, who: str) -> None:
        self.calls.append((d.id, d.stream_id, d.attempt, who))

    @property
    def by_id(self) -> Counter[str]:
        return Counter(c[0] for c in self.calls)

    @property
    def dup(self) -> int:
        return len(self.calls) - len(self.by_id)


async def pending_entries(ctl: aioredis.Redis, stream: str, group: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = await ctl.xpending_range(stream, group, "-", "+", 10_000)
    return entries


# -- F3c: long handlers are not claimed from live members -------------------------------

F3C_IDLE = 1.0
F3C_CLAIM = ClaimPolicy(idle=F3C_IDLE, interval=0.2)
F3C_HANDLER_S = 3 * F3C_IDLE
F3C_GROUP: dict[str, Any] = {"claim": F3C_CLAIM, "concurrency": 4, "batch": 4, "block": 0.5}


class IdleWatch:
    """Polls the group's pending list: the largest idle time and delivery count seen."""

    def __init__(self, ctl: aioredis.Redis, stream: str, group: str) -> None:
        self.ctl, self.stream, self.group = ctl, stream, group
        self.max_idle: dict[str, int] = {}
        self.max_delivered: dict[str, int] = {}

    async def run(self) -> None:
        while True:
            for e in await pending_entries(self.ctl, self.stream, self.group):
                sid = e["message_id"]
                self.max_idle[sid] = max(self.max_idle.get(sid, 0), int(e["time_since_delivered"]))
                self.max_delivered[sid] = max(
                    self.max_delivered.get(sid, 0), int(e["times_delivered"])
                )
            await anyio.sleep(0.05)


async def _f3c_members(
    bus_factory: Any, topic: Topic[Any], calls: Calls, started: list[float]
) -> list[tuple[EventBus, Any]]:
    members = []
    for i in range(3):
        bus = bus_factory()
        name = f"m{i}"

        async def handle(event: Any, d: Delivery, name: str = name) -> None:
            started.append(anyio.current_time())
            calls.add(d, name)
            await anyio.sleep(F3C_HANDLER_S)

        bus.on(topic, group="g", consumer=name, **F3C_GROUP)(handle)
        members.append((bus, handle))
    return members


@pytest.mark.slow  # ~6 s: one member runs 5 of the 6 handlers, 4 at a time
async def test_f3c_long_handlers_of_live_members_are_never_claimed(bus_factory: Any) -> None:
    topic = Topic("f3c", durable=True)
    pub = bus_factory()
    stream = topic_keys(pub.prefix, "f3c").stream
    calls = Calls()
    started: list[float] = []
    members = await _f3c_members(bus_factory, topic, calls, started)
    (a, _), (b, _), (c, _) = members
    t0 = anyio.current_time()
    async with control_client(pub.url) as ctl, pub, a, b, c:
        watch = IdleWatch(ctl, stream, "g")
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch.run)
            receipts = await pub.publish_many(topic, [{"n": n} for n in range(6)])
            await wait_until(lambda: len(calls.calls) >= 6, timeout=5)

            async def drained() -> bool:
                return not await pending_entries(ctl, stream, "g")

            await wait_until(drained, timeout=F3C_HANDLER_S + 5)
            tg.cancel_scope.cancel()
        stats = [s for m, fn in members for s in m.consumer_statistics(fn)]
    elapsed = anyio.current_time() - t0
    claimed = sum(s.claimed for s in stats)
    attempts = Counter(c[2] for c in calls.calls)
    max_idle_ms = max(watch.max_idle.values())
    held_s = max(started) + F3C_HANDLER_S - min(started)
    print(
        f"F3c: events=6 members=3 handler_s={F3C_HANDLER_S} claim_idle_s={F3C_IDLE} "
        f"reclaims={claimed} dup={calls.dup} attempts={dict(attempts)} "
        f"max_pending_idle_ms={max_idle_ms} "
        f"max_times_delivered={max(watch.max_delivered.values())} "
        f"per_member={Counter(c[3] for c in calls.calls)} elapsed_s={elapsed:.1f}"
    )
    assert {r.id for r in receipts} == set(calls.by_id)  # lost = 0
    assert held_s >= 3 * F3C_IDLE  # each entry was held 3x claim_idle
    assert claimed == 0
    assert calls.dup == 0
    assert attempts == {1: 6}
    assert max(watch.max_delivered.values()) == 1
    # The heartbeat kept every entry's idle time below claim_idle all along.
    assert max_idle_ms < F3C_IDLE * 1000


async def test_f3c_negative_control_a_holder_without_heartbeat_loses_its_entry(
    bus_factory: Any,
) -> None:
    """A raw consumer reads one entry and sits on it for 3x claim_idle without the
    heartbeat (as a member that never extends would): a live member claims it after
    claim_idle and the event runs twice. The members' own long handlers, beside it,
    are still not claimed."""
    topic = Topic("f3c", durable=True)
    pub = bus_factory()
    stream = topic_keys(pub.prefix, "f3c").stream
    calls = Calls()
    started: list[float] = []
    members = await _f3c_members(bus_factory, topic, calls, started)
    (a, _), (b, _), (c, _) = members
    zombie_ack: list[int] = []
    async with control_client(pub.url) as ctl, pub:
        await ctl.xgroup_create(stream, "g", id="0", mkstream=True)
        (held,) = await pub.publish_many(topic, [{"n": 0}])
        ((_key, entries),) = await ctl.xreadgroup("g", "zombie", {stream: ">"}, count=1)
        assert [e[0] for e in entries] == [held.stream_id]
        read_at = anyio.current_time()
        async with a, b, c:
            others = await pub.publish_many(topic, [{"n": n} for n in range(1, 6)])
            # The zombie's "handler": 3x claim_idle, no heartbeat, then its ack.
            await anyio.sleep_until(read_at + F3C_HANDLER_S)
            calls.calls.append((held.id, held.stream_id, 1, "zombie"))
            zombie_ack.append(await ctl.xack(stream, "g", held.stream_id))

            def acks_done() -> list[Any]:
                # Every entry a member ran has had its ack (counted or found taken).
                stats = [s for m, fn in members for s in m.consumer_statistics(fn)]
                done = sum(s.acked + s.ack_lost_ownership for s in stats)
                return stats if len(calls.calls) >= 7 and done == 6 else []

            await wait_until(lambda: bool(acks_done()), timeout=F3C_HANDLER_S + 5)
            stats = acks_done()
            assert not await pending_entries(ctl, stream, "g")
    claimed = sum(s.claimed for s in stats)
    lost_ownership = sum(s.ack_lost_ownership for s in stats)
    again = [c for c in calls.calls if c[0] == held.id and c[3] != "zombie"]
    print(
        f"F3c negative control: reclaims={claimed} dup={calls.dup} "
        f"zombie_xack={zombie_ack[0]} members_ack_lost_ownership={lost_ownership} "
        f"second_run={again}"
    )
    assert {r.id for r in [held, *others]} == set(calls.by_id)  # lost = 0
    assert claimed == 1
    assert calls.dup == 1  # the Celery visibility-timeout trap: it ran twice
    assert [c[2] for c in again] == [2]  # the claim was a second delivery
    # Whoever acked second found nothing: exactly one of the two acks counted.
    assert zombie_ack[0] + (1 - lost_ownership) == 1
    assert all(n == 1 for i, n in calls.by_id.items() if i != held.id)


# -- F30: duplicate consumer names --------------------------------------------------------


F30_GROUP: dict[str, Any] = {"claim": ClaimPolicy(idle=30, interval=0.5), "block": 0.5}


def lease_key(prefix: str, topic: str, group: str, consumer: str) -> str:
    return member_lease(topic_keys(prefix, topic), group, consumer)


_NAMES = st.text(alphabet=st.sampled_from("ab:{}-1"), min_size=1, max_size=6)


@given(first=st.tuples(_NAMES, _NAMES), second=st.tuples(_NAMES, _NAMES))
def test_f30_lease_key_is_one_to_one_and_in_the_topic_slot(
    first: tuple[str, str], second: tuple[str, str]
) -> None:
    keys = topic_keys("eb", "orders")
    one, two = member_lease(keys, *first), member_lease(keys, *second)
    assert (one == two) == (first == second)  # e.g. ("a:b", "c") vs ("a", "b:c")
    assert key_slot(one.encode()) == key_slot(b"orders")


async def test_f30_second_member_with_the_same_name_is_refused(bus_factory: Any) -> None:
    topic = Topic("f30", durable=True)
    first, second, third = bus_factory(), bus_factory(), bus_factory()
    key = lease_key(first.prefix, "f30", "g", "c1")
    got: dict[str, list[str]] = {"first": [], "second": []}

    @first.on(topic, group="g", consumer="c1", **F30_GROUP)
    async def one(event: Any, d: Delivery) -> None:
        got["first"].append(d.id)

    @second.on(topic, group="g", consumer="c1", **F30_GROUP)
    async def two(event: Any, d: Delivery) -> None:
        got["second"].append(d.id)

    async with control_client(first.url) as ctl, first:
        token = await ctl.get(key)
        assert token is not None
        assert token.split("/")[1] == str(os.getpid())  # <host>/<pid>/<random>
        t0 = anyio.current_time()
        with pytest.raises(errors.ConsumerNameInUse) as refused:
            async with second:
                pass
        refused_s = anyio.current_time() - t0
        t0 = anyio.current_time()
        async with third:
            with pytest.raises(errors.ConsumerNameInUse) as refused_iter:
                async with third.subscribe(topic, group="g", consumer="c1"):
                    pass
        refused_iter_s = anyio.current_time() - t0
        receipts = await first.publish_many(topic, [{"n": n} for n in range(20)])
        await wait_until(lambda: len(got["first"]) == 20, timeout=5)
        consumers = await ctl.xinfo_consumers(topic_keys(first.prefix, "f30").stream, "g")
        assert await ctl.get(key) == token  # the refused members left the lease alone
    print(
        f"F30: refused_s={refused_s:.2f} refused_iterator_s={refused_iter_s:.2f} "
        f"(renewal every {LEASE_TTL / 3:.1f}s) error={refused.value}"
    )
    for exc in (refused.value, refused_iter.value):
        assert isinstance(exc, errors.BackendError)
        assert (exc.topic, exc.group, exc.consumer) == ("f30", "g", "c1")
        assert exc.holder == token
        assert "'c1'" in str(exc)
        assert "'g'" in str(exc)
        assert "'f30'" in str(exc)
    # Refused within one renewal period plus a poll: "fails fast".
    assert refused_s <= LEASE_TTL / 3 + 0.5
    assert refused_iter_s <= LEASE_TTL / 3 + 0.5
    assert got["second"] == []
    assert sorted(got["first"]) == sorted(r.id for r in receipts)
    assert [c["name"] for c in consumers] == ["c1"]


async def test_f30_clean_leave_frees_the_name_at_once(bus_factory: Any) -> None:
    topic = Topic("f30", durable=True)
    first, again, third = bus_factory(), bus_factory(), bus_factory()
    key = lease_key(first.prefix, "f30", "g", "c1")
    for bus in (first, again):
        bus.on(topic, group="g", consumer="c1", **F30_GROUP)(lambda event: None)
    async with control_client(first.url) as ctl:
        async with first:
            assert await ctl.exists(key) == 1
            assert 0 < await ctl.pttl(key) <= LEASE_TTL * 1000
        assert await ctl.exists(key) == 0  # deleted on leave, not left to lapse
        t0 = anyio.current_time()
        async with again:
            restart_s = anyio.current_time() - t0
        async with third:
            for _ in range(3):  # an iterator's leave frees it too
                async with third.subscribe(topic, group="g", consumer="c1"):
                    assert await ctl.exists(key) == 1
                assert await ctl.exists(key) == 0
    print(f"F30 clean leave: restart_s={restart_s:.3f}")
    assert restart_s < 0.5


async def test_f30_crashed_holder_lease_lapses_and_the_restart_takes_its_pending_back(
    bus_factory: Any,
) -> None:
    """A crashed member's lease (its last renewal 1 s before) is not renewed: the
    restart under its name waits for it to lapse, at most one TTL, then takes its
    own pending entries back at once (F2's path), long before claim_idle."""
    topic = Topic("f30", durable=True)
    pub, restarted = bus_factory(), bus_factory()
    stream = topic_keys(pub.prefix, "f30").stream
    key = lease_key(pub.prefix, "f30", "g", "c1")
    calls = Calls()

    @restarted.on(topic, group="g", consumer="c1", **F30_GROUP)
    async def handle(event: Any, d: Delivery) -> None:
        calls.add(d, "restarted")

    async with control_client(pub.url) as ctl, pub:
        await ctl.xgroup_create(stream, "g", id="0", mkstream=True)
        receipts = await pub.publish_many(topic, [{"n": n} for n in range(3)])
        await ctl.xreadgroup("g", "c1", {stream: ">"}, count=3)  # held when it crashed
        remaining_ms = int(LEASE_TTL * 1000) - 1000
        await ctl.set(key, "crashed-host/1/0123456789ab", px=remaining_ms)
        t0 = anyio.current_time()
        async with restarted:
            waited = anyio.current_time() - t0
            handled_s = await wait_until(lambda: len(calls.calls) == 3, timeout=5)
            assert (await ctl.get(key)).split("/")[1] == str(os.getpid())
    print(
        f"F30 crashed holder: lease_left_ms={remaining_ms} waited_s={waited:.2f} "
        f"own_pending_handled_s={handled_s:.2f} attempts={[c[2] for c in calls.calls]}"
    )
    assert remaining_ms / 1000 - 0.1 <= waited <= remaining_ms / 1000 + 0.5
    assert handled_s < 1.0  # claim_idle is 30 s: these came back as its own
    assert sorted(c[0] for c in calls.calls) == sorted(r.id for r in receipts)
    assert {c[2] for c in calls.calls} == {2}


async def test_f30_lease_without_expiry_is_refused_at_once(bus_factory: Any) -> None:
    topic = Topic("f30", durable=True)
    bus = bus_factory()
    key = lease_key(bus.prefix, "f30", "g", "c1")
    async with control_client(bus.url) as ctl, bus:
        await ctl.set(key, "someone")
        t0 = anyio.current_time()
        with pytest.raises(errors.ConsumerNameInUse) as refused:
            async with bus.subscribe(topic, group="g", consumer="c1"):
                pass
        assert refused.value.holder == "someone"
        assert anyio.current_time() - t0 < 0.5
        assert await ctl.get(key) == "someone"


async def test_f30_member_whose_name_was_taken_stops_reading(
    bus_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Another member took the name while this one was silent past its lease (here:
    the lease is overwritten, as a member starting after it lapsed would): at its
    next renewal the member logs an ERROR and reads nothing more under the name."""
    topic = Topic("f30", durable=True)
    victim, other, pub = bus_factory(client_name="victim"), bus_factory(), bus_factory()
    key = lease_key(pub.prefix, "f30", "g", "c1")
    calls = Calls()

    @victim.on(topic, group="g", consumer="c1", **F30_GROUP)
    async def one(event: Any, d: Delivery) -> None:
        calls.add(d, "victim")

    @other.on(topic, group="g", consumer="c2", **F30_GROUP)
    async def two(event: Any, d: Delivery) -> None:
        calls.add(d, "other")

    async with control_client(pub.url) as ctl, pub, victim, other:
        before = await pub.publish_many(topic, [{"n": n} for n in range(10)])
        await wait_until(lambda: len(calls.calls) == 10, timeout=5)
        await ctl.set(key, "intruder/1/0123456789ab", px=60_000)
        t0 = anyio.current_time()

        def logged() -> bool:
            return any("was taken" in r.getMessage() for r in caplog.records)

        await wait_until(logged, timeout=LEASE_TTL)
        noticed_s = anyio.current_time() - t0

        async def not_reading() -> bool:
            clients = await ctl.client_list()
            return not [c for c in clients if c["name"] == "victim" and c["cmd"] == "xreadgroup"]

        await wait_until(not_reading, timeout=5)
        after = await pub.publish_many(topic, [{"n": n} for n in range(10, 60)])

        async def drained() -> bool:
            return len(calls.calls) >= 60 and not await pending_entries(
                ctl, topic_keys(pub.prefix, "f30").stream, "g"
            )

        await wait_until(drained, timeout=5)
        (victim_stats,) = victim.consumer_statistics(one)
    assert await ctl_get_after(pub.url, key) == "intruder/1/0123456789ab"  # left alone on leave
    victim_after = [c for c in calls.calls if c[0] in {r.id for r in after} and c[3] == "victim"]
    errors_logged = [
        r for r in caplog.records if r.levelno == logging.ERROR and "was taken" in r.getMessage()
    ]
    print(
        f"F30 name taken: noticed_s={noticed_s:.2f} victim_handled_after={len(victim_after)} "
        f"errors_logged={len(errors_logged)} victim_reads={victim_stats.reads}"
    )
    assert noticed_s <= LEASE_TTL / 3 + 0.5
    assert len(errors_logged) == 1
    assert victim_after == []
    assert {c[0] for c in calls.calls} == {r.id for r in [*before, *after]}
    assert calls.dup == 0


async def ctl_get_after(url: str, key: str) -> str | None:
    async with control_client(url) as ctl:
        value: str | None = await ctl.get(key)
        return value


@pytest.mark.slow
async def test_f30_two_processes_with_one_name(redis_server_factory: Any, tmp_path: Path) -> None:
    """The scenario as the plan states it, with real processes: a second process
    under the same name fails fast; once the first is frozen (SIGSTOP) past its
    lease, a third takes the name; the first, resumed, logs an ERROR and stops
    reading, and everything published afterwards is handled by the new holder."""
    server = redis_server_factory()
    prefix, seed = "f30", 30
    topic = Topic("orders", durable=True)
    key = lease_key(prefix, "orders", "billing", "c1")
    with fleet_of(tmp_path, server.url, prefix, seed, claim_idle=10.0) as fleet:
        holder = fleet.spawn("c1")
        await holder.wait_event("ready", timeout=20)
        t_spawn = time.time()
        duplicate = fleet.spawn("c1")
        code = await duplicate.wait_exit(timeout=20)
        refused_s = time.time() - t_spawn
        stderr = duplicate.stderr_tail(20_000)
        assert code != 0
        assert "ConsumerNameInUse" in stderr
        assert "consumer name 'c1' of group 'billing' is in use" in stderr
        assert "(topic 'orders')" in stderr
        assert duplicate.event("ready") is None

        async with control_client(server.url) as ctl:
            first_token = await ctl.get(key)
            t_stop = holder.send(signal.SIGSTOP)
            successor = fleet.spawn("c1")
            ready = await successor.wait_event("ready", timeout=20)
            takeover_s = ready["t"] - t_stop
            assert await ctl.get(key) != first_token
            holder.send(signal.SIGCONT)

            def holder_gave_up() -> bool:
                return "was taken" in holder.stderr_tail(20_000)

            await wait_until(holder_gave_up, timeout=LEASE_TTL + 2)
            bus = EventBus(server.url, prefix=prefix)
            async with bus:
                receipts = await bus.publish_many(topic, [{"seq": n} for n in range(50)])
                tail = OracleTail(fleet.oracle_dir)

                def handled() -> bool:
                    tail.poll()
                    return {r.id for r in receipts} <= tail.handled_ids

                await wait_until(handled, timeout=10)
            by_pid = Counter(line["pid"] for line in tail.done)
            await fleet.stop_all()
            assert await ctl.exists(key) == 0  # the successor freed it; the first did not
    print(
        f"F30 processes: duplicate_exit_code={code} refused_after_spawn_s={refused_s:.2f} "
        f"takeover_after_sigstop_s={takeover_s:.2f} handled_by_pid={dict(by_pid)} "
        f"(holder {holder.pid}, successor {successor.pid})"
    )
    assert by_pid[holder.pid] == 0
    assert by_pid[successor.pid] == 50
    assert takeover_s <= LEASE_TTL + 3.0  # interpreter start-up included


# -- F21: cancellation around the ack --------------------------------------------------

F21_ITERATIONS = 2000
F21_CHECK_EVERY = 100
F21_LANES = 4
"""Iterations run in 4 lanes at once (each its own topic and member, all on the one
bus and its command client): ~45 ms an iteration through the 1 ms proxy, so
2,000 in a row would take 90 s; side by side they also interleave on the pool."""
F21_GROUP: dict[str, Any] = {
    "group": "g",
    # Claim passes every 2 ms: their XAUTOCLAIM / XPENDING calls on the shared
    # command client are cut mid-flight by the stop, again and again.
    "claim": ClaimPolicy(idle=30, interval=0.002),
    "block": 0.05,
}


@pytest.mark.slow
@pytest.mark.filterwarnings("error")
async def test_f21_cancellation_around_the_ack(
    redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each iteration: publish one event, run a group iterator in a task until the
    event's loop body returns (then ``__anext__`` acks it), cancel that task 0-3 ms
    later. The cancel reaches the member only through the iterator's exit, which
    stops it shielded: the reader's blocked XREADGROUP and the claimer's calls are
    cut, the XACK is flushed (or, if Redis cannot be reached in time, the event stays
    pending for the same name's next start). Sentinels run SET/GET pairs on the
    member's command client throughout, a third of them cut 0-3 ms in."""
    rng = fault_rng("F21")
    server = redis_server_factory()
    topics = [Topic(f"f21-{lane}", durable=True) for lane in range(F21_LANES)]
    streams = [topic_keys("f21", t.name).stream for t in topics]
    caplog.set_level(logging.ERROR, logger="asyncio")
    handled: Counter[str] = Counter()
    published: list[str] = []
    counts = Counter[str]()
    client_counts: list[int] = []
    t_start = time.monotonic()
    async with FaultProxy(("127.0.0.1", server.port)) as proxy, control_client(server.url) as ctl:
        proxy.delay = 0.001  # each way, per chunk
        bus = EventBus(f"redis://127.0.0.1:{proxy.port}", prefix="f21", client_name="f21")

        async def consume(lane: int, target: str, returned: anyio.Event, box: list[Any]) -> None:
            async with bus.subscribe(topics[lane], consumer=f"c{lane}", **F21_GROUP) as sub:
                box.append(sub)
                async for _ in sub:
                    d = sub.delivery
                    assert d is not None
                    handled[d.id] += 1
                    if d.id == target:
                        returned.set()  # the body ends: __anext__ acks it

        async def iteration(lane: int) -> None:
            receipt = await bus.publish(topics[lane], {"lane": lane})
            published.append(receipt.id)
            returned = anyio.Event()
            box: list[Any] = []
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(consume, lane, receipt.id, returned, box)
                    await returned.wait()
                    await anyio.sleep(rng.uniform(0, 0.003))
                    acked = box[0].statistics().acked
                    tg.cancel_scope.cancel()
            counts["cancel_after_ack_reply" if acked else "cancel_before_ack_reply"] += 1

        async def lane_run(lane: int, n: int) -> None:
            for _ in range(n):
                await iteration(lane)

        async with bus:
            # The members' own command client: acks, claims, leases, hand-backs. The
            # sentinels must share its pool to catch a reply read by the wrong caller.
            shared: aioredis.Redis = bus._durable._client
            sentinels = Sentinels(shared, rng)
            async with anyio.create_task_group() as background:
                background.start_soon(sentinels.run)  # two at once: more of the pool in use
                background.start_soon(sentinels.run)
                for _ in range(F21_ITERATIONS // F21_CHECK_EVERY):
                    async with anyio.create_task_group() as lanes:
                        for lane in range(F21_LANES):
                            lanes.start_soon(lane_run, lane, F21_CHECK_EVERY // F21_LANES)
                    sentinels.pause()
                    client_counts.append(await no_leaks(bus, shared, ctl))
                    for stream in streams:
                        counts["pending_at_checks"] += await pending_count(ctl, stream)
                    sentinels.resume()
                background.cancel_scope.cancel()
            # Anything left pending comes back to the same name on its next start.
            async with anyio.create_task_group() as lanes:
                for lane in range(F21_LANES):
                    lanes.start_soon(iteration, lane)
            for stream in streams:
                await wait_until(lambda s=stream: _no_pending(ctl, s), timeout=5)
            client_counts.append(await no_leaks(bus, shared, ctl))
        gc.collect()  # unclosed connections or transports would warn (as errors) here
    elapsed = time.monotonic() - t_start
    lost = [e for e in published if handled[e] == 0]
    dup = sum(handled.values()) - len(handled)
    asyncio_errors = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    print(
        f"F21: iterations={counts['cancel_after_ack_reply'] + counts['cancel_before_ack_reply']}"
        f" lanes={F21_LANES} delay_ms=1 each way lost={len(lost)} dup={dup} "
        f"cancels={dict(counts)} sentinel_pairs={sentinels.checked} "
        f"sentinel_cut={sentinels.cut} sentinel_mismatches={sentinels.mismatches} "
        f"client_list_counts={client_counts} asyncio_errors={len(asyncio_errors)} "
        f"elapsed_s={elapsed:.1f}"
    )
    assert sentinels.mismatches == 0
    assert sentinels.checked >= F21_ITERATIONS
    assert not lost
    assert not asyncio_errors, asyncio_errors[:3]
    assert max(client_counts) <= 20  # no growth over 2,000 stops (pool max: 100)


async def pending_count(ctl: aioredis.Redis, stream: str) -> int:
    return int((await ctl.xpending(stream, "g"))["pending"])


async def _no_pending(ctl: aioredis.Redis, stream: str) -> bool:
    return await pending_count(ctl, stream) == 0


async def no_leaks(bus: EventBus, shared: aioredis.Redis, ctl: aioredis.Redis) -> int:
    """No connection in use in the shared pool, and every connection Redis lists
    under the bus's name belongs to one of the bus's pools; returns the count."""
    pools = [shared.connection_pool, bus._durable._stream_client.connection_pool]
    seen: list[int] = []

    async def settled() -> bool:
        in_use = sum(p.get_connection_count()[1][0] for p in pools)
        held = sum(n for p in pools for n, _ in p.get_connection_count())
        listed = [c for c in await ctl.client_list() if c["name"] == "f21"]
        seen[:] = [len(listed)]
        return in_use == 0 and len(listed) <= held <= min(p.max_connections for p in pools)

    await wait_until(settled, timeout=5)
    return seen[0]


class Sentinels:
    """SET/GET pairs of unique keys on a shared client, some cut 0-3 ms in: any reply
    read by the wrong caller shows as a mismatch."""

    def __init__(self, client: aioredis.Redis, rng: random.Random) -> None:
        self.client = client
        self.rng = rng
        self.checked = 0
        self.cut = 0
        self.mismatches = 0
        self._go = anyio.Event()
        self._go.set()
        self._n = 0

    def pause(self) -> None:
        self._go = anyio.Event()

    def resume(self) -> None:
        self._go.set()

    async def run(self) -> None:
        while True:
            await self._go.wait()
            self._n += 1
            key, value = f"f21:s:{self._n}", secrets.token_hex(8)
            if self._n % 3 == 0:
                with anyio.move_on_after(self.rng.uniform(0, 0.003)) as scope:
                    await self._pair(key, value)
                if scope.cancelled_caught:
                    self.cut += 1
                continue
            await self._pair(key, value)
            self.checked += 1

    async def _pair(self, key: str, value: str) -> None:
        ok = await self.client.set(key, value, px=60_000)
        got = await self.client.get(key)
        if ok is not True or got != value.encode():
            self.mismatches += 1
