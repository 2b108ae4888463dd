"""RELIABILITY.md F7, F9, F25, F26, F27, F29: connection, trim and group faults on durable topics.

Real redis-server only (a private one where the test kills connections or
flushes), consumers and publishers in this process unless the scenario needs a
process to die (F29). Faults on the wire come from ``FaultProxy``: ``CLIENT
KILL``, lost replies (``drop_next_reply``: Redis executed the command, the
client never got the answer) and resets.

Every scenario reports the §0 numbers it can measure: ``lost`` (published and
acknowledged, never handled), ``dup`` (handler calls beyond one per event id),
``recovery_s`` and the faults injected. Fault timing comes from one seed,
printed first; ``EVENTBUS_FAULT_SEED=<n>`` replays it.

Fault config (§6): claim_idle=2 s, claim interval=0.5 s, batch=10,
concurrency=4, block=1 s.
"""

from __future__ import annotations

import logging
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
import redis.asyncio as aioredis

from eventbus import ClaimPolicy, Delivery, EventBus, Receipt, Topic, errors, signals
from eventbus._keys import topic_keys
from eventbus.testing import FaultProxy

from ..helpers import command_calls, control_client, stored_event, wait_until

pytestmark = [pytest.mark.fault]

CLAIM_IDLE = 2.0
CLAIM_INTERVAL = 0.5
FAULT_GROUP: dict[str, Any] = {
    "claim_idle": CLAIM_IDLE,
    "claim": ClaimPolicy(idle=CLAIM_IDLE, interval=CLAIM_INTERVAL),
    "batch": 10,
    "concurrency": 4,
    "block": 1.0,
}
# The entry ids in a raw XREADGROUP reply: bulk strings of the form <ms>-<seq>
# (keys, event ids and JSON envelopes never match).
_ENTRY_ID = re.compile(rb"\$\d+\r\n(\d+-\d+)\r\n")
# The uuid5 namespace of chained event ids, as documented in docs/wire-format.md.
CHAIN_NAMESPACE = uuid.UUID("6f1c5f7e-8a1b-4d0e-9a57-2f4b3c9e0d11")
REPO = Path(__file__).resolve().parents[2]


def fault_rng(name: str) -> random.Random:
    seed = int(os.environ.get("EVENTBUS_FAULT_SEED") or secrets.randbelow(2**31))
    print(f"{name}: EVENTBUS_FAULT_SEED={seed}")
    return random.Random(seed)


class Recorder:
    """Every handler call of a group: event id, entry id, attempt, when."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int, float]] = []
        self.by_id: Counter[str] = Counter()
        self.by_entry: dict[str, list[tuple[int, float]]] = {}
        self.running = 0

    def add(self, d: Delivery) -> None:
        now = anyio.current_time()
        self.calls.append((d.id, d.stream_id, d.attempt, now))
        self.by_id[d.id] += 1
        self.by_entry.setdefault(d.stream_id, []).append((d.attempt, now))

    @property
    def dup(self) -> int:
        return len(self.calls) - len(self.by_id)

    def lost(self, receipts: list[Receipt]) -> int:
        return sum(1 for r in receipts if r.id not in self.by_id)


async def group_info(ctl: aioredis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    try:
        groups = await ctl.xinfo_groups(stream)
    except aioredis.ResponseError:  # no such key
        return None
    return next((g for g in groups if g["name"] == group), None)


async def settled(ctl: aioredis.Redis, stream: str, group: str) -> bool:
    """Everything in the stream was delivered to ``group`` and acked."""
    info = await group_info(ctl, stream, group)
    if info is None or info["pending"]:
        return False
    # Not XINFO's "lag": after trimming Redis reports a stale one (or none).
    last = (await ctl.xinfo_stream(stream))["last-generated-id"]
    return bool(info["last-delivered-id"] == last)


def payloads(start: int, count: int) -> list[dict[str, int]]:
    return [{"n": n} for n in range(start, start + count)]


# -- F7: connection drops during the blocking read ------------------------------------


async def _xreadgroup_clients(ctl: aioredis.Redis) -> list[int]:
    return [int(c["id"]) for c in await ctl.client_list() if c["cmd"] == "xreadgroup"]


@pytest.mark.slow
async def test_f7a_client_kill_of_the_xreadgroup_connection(redis_server_factory) -> None:
    rng = fault_rng("F7a")
    server = redis_server_factory()
    topic = Topic("f7a", durable=True)
    stream = topic_keys("f7a", "f7a").stream
    rec = Recorder()
    receipts: list[Receipt] = []
    kills: list[tuple[float, float, float]] = []  # (killed at, reconnected s, next handled s)
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        sub = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="f7a")
        pub = EventBus(server.url, prefix="f7a")

        @sub.on(topic, group="g", consumer="c1", **FAULT_GROUP)
        async def handle(event: Any, d: Delivery) -> None:
            rec.add(d)

        async with control_client(server.url) as ctl, sub, pub:
            start = anyio.current_time()

            async def publisher() -> None:
                # 5,000 events at ~500/s: 200 batches of 25, one every 50 ms.
                for i in range(200):
                    receipts.extend(await pub.publish_many(topic, payloads(i * 25, 25)))
                    await anyio.sleep_until(start + (i + 1) * 0.05)

            async def killer() -> None:
                for k in range(5):  # at ~1, 3, 5, 7, 9 s: all while publishing
                    await anyio.sleep_until(start + 1 + 2 * k + rng.uniform(-0.3, 0.3))
                    (old,) = await _xreadgroup_clients(ctl)
                    assert await ctl.execute_command("CLIENT", "KILL", "ID", old) == 1
                    at = anyio.current_time()
                    handled_before = len(rec.calls)

                    async def reconnected(old: int = old) -> bool:
                        ids = await _xreadgroup_clients(ctl)
                        return bool(ids) and old not in ids

                    reconnect_s = await wait_until(reconnected, timeout=5)
                    await wait_until(lambda n=handled_before: len(rec.calls) > n)
                    kills.append((at - start, reconnect_s, anyio.current_time() - at))

            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                tg.start_soon(killer)
            await wait_until(lambda: rec.lost(receipts) == 0, timeout=15)
            await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
            (stats,) = sub.consumer_statistics(handle)
        async with control_client(server.url) as ctl:
            # Leftovers: every connection of both buses closed (only this one left).
            await wait_until(lambda: _client_count(ctl, 1), timeout=5)

    lost, dup = rec.lost(receipts), rec.dup
    recovery = max(k[1] for k in kills)
    print(
        f"F7a published={len(receipts)} kills={len(kills)} lost={lost} dup={dup}"
        f" recovery_s(reconnect)={[round(k[1], 3) for k in kills]}"
        f" first_handled_after_kill_s={[round(k[2], 3) for k in kills]}"
        f" proxy_connections={proxy.connections} stats={stats}"
    )
    assert len(receipts) == 5000
    assert len(kills) == 5
    assert lost == 0
    assert dup <= 20
    assert stats.failed == 0  # no ConnectionError ever reached the handler
    assert recovery <= 2.0


async def _client_count(ctl: aioredis.Redis, expected: int) -> bool:
    return len(await ctl.client_list()) == expected


async def test_f7b_lost_xreadgroup_replies_are_redelivered(redis_server_factory) -> None:
    """The reply to XREADGROUP is lost 20 times: Redis put the entries in this
    consumer's pending list, the consumer never saw them."""
    rng = fault_rng("F7b")
    server = redis_server_factory()
    topic = Topic("f7b", durable=True)
    stream = topic_keys("f7b", "f7b").stream
    rec = Recorder()
    receipts: list[Receipt] = []
    recoveries: list[float] = []
    empty_drops = 0
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        sub = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="f7b")
        pub = EventBus(server.url, prefix="f7b")

        @sub.on(topic, group="g", consumer="c1", **FAULT_GROUP)
        async def handle(event: Any, d: Delivery) -> None:
            rec.add(d)

        async with control_client(server.url) as ctl, sub, pub:
            connections_before = proxy.connections
            done = anyio.Event()

            async def publisher() -> None:
                # A steady ~1,000 events/s, so most XREADGROUP replies carry entries.
                n = 0
                while not done.is_set():
                    size = rng.randint(1, 20)
                    receipts.extend(await pub.publish_many(topic, payloads(n, size)))
                    n += size
                    await anyio.sleep(size / 1000)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                for k in range(20):
                    proxy.drop_next_reply(b"XREADGROUP")
                    await wait_until(lambda k=k: len(proxy.dropped) > k, timeout=5)
                    drop = proxy.dropped[k]
                    lost_ids = [m.decode() for m in _ENTRY_ID.findall(drop.reply)]
                    if not lost_ids:
                        empty_drops += 1  # a BLOCK that timed out empty: nothing to lose
                        continue

                    def redelivered(ids: list[str] = lost_ids) -> bool:
                        return all(i in rec.by_entry for i in ids)

                    await wait_until(redelivered, timeout=CLAIM_IDLE + CLAIM_INTERVAL + 2)
                    for entry_id in lost_ids:
                        (attempt, _at), *again = rec.by_entry[entry_id]
                        assert attempt >= 2, (entry_id, attempt)
                        assert not again, f"{entry_id} handled {1 + len(again)} times"
                    recoveries.append(max(rec.by_entry[i][0][1] for i in lost_ids) - drop.at)
                    # 20 separate faults: a read succeeds before the next one (back to
                    # back, the reader's reconnect backoff would keep growing).
                    mark = len(rec.calls)
                    await wait_until(
                        lambda m=mark: any(c[2] == 1 for c in rec.calls[m:]), timeout=5
                    )
                done.set()
            await wait_until(lambda: rec.lost(receipts) == 0, timeout=10)
            await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
            (stats,) = sub.consumer_statistics(handle)
            reconnects = proxy.connections - connections_before

    lost, dup = rec.lost(receipts), rec.dup
    entries_lost_in_replies = sum(len(_ENTRY_ID.findall(d.reply)) for d in proxy.dropped)
    print(
        f"F7b published={len(receipts)} dropped_replies={len(proxy.dropped)}"
        f" (empty={empty_drops}, entries in them={entries_lost_in_replies}) lost={lost}"
        f" dup={dup} recovery_s max={max(recoveries):.3f}"
        f" all={[round(r, 3) for r in recoveries]} proxy_reconnects={reconnects} stats={stats}"
    )
    assert len(proxy.dropped) == 20
    assert lost == 0
    assert dup <= 20
    assert stats.failed == 0
    # Each lost reply handled within claim_idle + claim_interval (own-PEL re-read or claim).
    assert max(recoveries) <= CLAIM_IDLE + CLAIM_INTERVAL
    # One new blocking connection per lost reply; the command pool may add a few.
    assert 20 <= reconnects <= 20 + 5


async def test_f7c_reset_in_the_middle_of_a_batch(redis_server_factory) -> None:
    """(c) a 50-entry XREADGROUP reply cut mid-frame, 5 times; then every connection
    reset (RST) while handlers of a batch are running, 5 times."""
    rng = fault_rng("F7c")
    server = redis_server_factory()
    topic = Topic("f7c", durable=True)
    stream = topic_keys("f7c", "f7c").stream
    rec = Recorder()
    receipts: list[Receipt] = []
    cut_recoveries: list[float] = []
    reset_recoveries: list[float] = []
    group = {**FAULT_GROUP, "batch": 50}
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        sub = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="f7c")
        pub = EventBus(server.url, prefix="f7c")

        @sub.on(topic, group="g", consumer="c1", **group)
        async def handle(event: Any, d: Delivery) -> None:
            rec.running += 1
            try:
                # 4 x 5 ms: a little slower than the publisher, so reads return full batches.
                await anyio.sleep(0.005)
                rec.add(d)
            finally:
                rec.running -= 1

        async with control_client(server.url) as ctl, sub, pub:
            done = anyio.Event()

            async def publisher() -> None:
                n = 0
                while not done.is_set():
                    receipts.extend(await pub.publish_many(topic, payloads(n, 100)))
                    n += 100
                    await anyio.sleep(0.1)

            async with anyio.create_task_group() as tg:
                tg.start_soon(publisher)
                for k in range(5):
                    # Forward a seeded part of the reply, never all of it.
                    proxy.drop_next_reply(b"XREADGROUP", keep=rng.randint(50, 3000))
                    await wait_until(lambda k=k: len(proxy.dropped) > k, timeout=5)
                    drop = proxy.dropped[k]
                    cut_ids = [m.decode() for m in _ENTRY_ID.findall(drop.reply)]

                    def redelivered(ids: list[str] = cut_ids) -> bool:
                        return all(i in rec.by_entry for i in ids)

                    await wait_until(redelivered, timeout=CLAIM_IDLE + CLAIM_INTERVAL + 2)
                    assert all(rec.by_entry[i][0][0] >= 2 for i in cut_ids)
                    if cut_ids:
                        cut_recoveries.append(max(rec.by_entry[i][0][1] for i in cut_ids) - drop.at)
                for _ in range(5):
                    await wait_until(lambda: rec.running > 0, timeout=5)
                    before = len(rec.calls)
                    await anyio.sleep(rng.uniform(0, 0.005))
                    at = anyio.current_time()
                    await proxy.reset_all()
                    # Recovery: handling continues past what was in memory at the reset.
                    await wait_until(lambda b=before: len(rec.calls) > b + 60, timeout=5)
                    reset_recoveries.append(anyio.current_time() - at)
                done.set()
            await wait_until(lambda: rec.lost(receipts) == 0, timeout=10)
            await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
            (stats,) = sub.consumer_statistics(handle)

    lost, dup = rec.lost(receipts), rec.dup
    print(
        f"F7c published={len(receipts)} cut_replies={len(proxy.dropped)}"
        f" (bytes kept={[d.forwarded for d in proxy.dropped]},"
        f" entries={[len(_ENTRY_ID.findall(d.reply)) for d in proxy.dropped]})"
        f" resets=5 lost={lost} dup={dup}"
        f" cut_recovery_s={[round(r, 3) for r in cut_recoveries]}"
        f" reset_recovery_s={[round(r, 3) for r in reset_recoveries]} stats={stats}"
    )
    assert lost == 0
    assert dup <= 20
    assert stats.failed == 0
    assert max(cut_recoveries) <= CLAIM_IDLE + CLAIM_INTERVAL
    assert max(len(_ENTRY_ID.findall(d.reply)) for d in proxy.dropped) == 50


# -- F9: ambiguous publishes -------------------------------------------------------------


@pytest.mark.slow
async def test_f9_lost_xadd_replies_neither_lose_nor_duplicate(redis_server_factory) -> None:
    rng = fault_rng("F9")
    server = redis_server_factory()
    topic = Topic("f9", durable=True)
    stream = topic_keys("f9", "f9").stream
    rec = Recorder()
    receipts: list[Receipt] = []
    failures: list[BaseException] = []
    calls = 0
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        pub = EventBus(f"redis://127.0.0.1:{proxy.port}/0", prefix="f9")
        sub = EventBus(server.url, prefix="f9")

        @sub.on(topic, group="g", consumer="c1", dedupe=60, **FAULT_GROUP)
        async def handle(event: Any, d: Delivery) -> None:
            rec.add(d)  # the side effect: must happen once per event id

        def maybe_drop() -> None:
            nonlocal calls
            calls += 1
            if rng.random() < 0.05:
                proxy.drop_next_reply(b"XADD")

        async def single(worker: int) -> None:
            for i in range(250):  # 8 x 250 = 2,000 concurrent publish() calls
                maybe_drop()
                try:
                    receipts.append(await pub.publish(topic, {"n": worker * 250 + i}))
                except Exception as exc:
                    failures.append(exc)

        async def batches() -> None:
            for b in range(60):  # 60 x 50 = 3,000 through publish_many
                maybe_drop()
                try:
                    receipts.extend(await pub.publish_many(topic, payloads(2000 + b * 50, 50)))
                except Exception as exc:
                    failures.append(exc)

        async with control_client(server.url) as ctl, pub, sub:
            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                for w in range(8):
                    tg.start_soon(single, w)
                tg.start_soon(batches)
            publish_s = anyio.current_time() - start
            unfired = proxy.armed_drops
            proxy.cancel_drops()
            await wait_until(lambda: len(rec.by_id) >= len(receipts), timeout=20)
            await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
            entries = await ctl.xrange(stream)
            (stats,) = sub.consumer_statistics(handle)

    dropped = len(proxy.dropped)
    in_stream = Counter(stored_event(fields).id for _, fields in entries)
    by_entry = {entry_id: stored_event(fields).id for entry_id, fields in entries}
    stream_dups = sum(n - 1 for n in in_stream.values())
    missing = [r.id for r in receipts if in_stream[r.id] == 0]
    bad_stream_ids = [r for r in receipts if by_entry.get(r.stream_id) != r.id]
    phantoms = set(in_stream) - {r.id for r in receipts}
    lost = rec.lost(receipts)
    print(
        f"F9 publish_calls={calls} published={len(receipts)} failed={len(failures)}"
        f" dropped_replies={dropped} unfired_drops={unfired} stream_len={len(entries)}"
        f" stream_duplicates={stream_dups} missing={len(missing)} lost={lost}"
        f" dup_after_dedupe={rec.dup} deduplicated={stats.deduplicated}"
        f" publish_s={publish_s:.2f}"
    )
    assert not failures, failures[:3]
    assert len(receipts) == 5000
    assert dropped >= 60  # ~5% of 2,060 calls: the faults really happened
    assert not missing  # every event whose publish returned is in the stream
    assert not bad_stream_ids  # and its receipt names the entry that holds it
    assert not phantoms
    assert stream_dups <= dropped
    assert stream_dups == 0  # the writer looks up what Redis stored before re-sending
    assert lost == 0
    assert rec.dup == 0  # with dedupe=60: exactly one side effect per event id
    assert set(rec.by_id.values()) == {1}


async def test_publish_during_a_partition_raises_within_publish_timeout(
    redis_server_factory,
) -> None:
    # A half-open partition (no RST, no FIN): no reply ever comes. publish() must
    # give up after publish_timeout with RedisUnavailable naming the topic, not hang,
    # and publish again once the network heals.
    server = redis_server_factory()
    topic = Topic("partitioned", durable=True)
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        bus = EventBus(f"redis://127.0.0.1:{proxy.port}/0", publish_timeout=1.0)
        async with bus:
            await bus.publish(topic, {"n": 0})  # the writer's connection is open
            proxy.blackhole()
            start = anyio.current_time()
            with anyio.fail_after(10), pytest.raises(errors.RedisUnavailable) as info:
                await bus.publish(topic, {"n": 1})
            waited = anyio.current_time() - start
            proxy.heal()
            with anyio.fail_after(10):
                receipt = await bus.publish(topic, {"n": 2})
    print(f"partition: raised after {waited:.2f} s (publish_timeout 1.0)")
    assert info.value.topic == "partitioned"
    assert 0.9 <= waited <= 2.5
    assert receipt.stream_id is not None


async def test_cancelled_publishers_do_not_abort_the_batch_they_share(
    redis_server_factory,
) -> None:
    # 20 callers queue behind one writer while Redis is unreachable; half of them
    # (the caller doing the writing among them) are cancelled. Every event is
    # still stored once, and every caller that was not cancelled gets its receipt.
    # (The cancelled writer itself finishes the batch it is sending, shielded, and
    # may return its receipt: its event was stored.)
    server = redis_server_factory()
    topic = Topic("shared", durable=True)
    receipts: dict[int, Receipt] = {}
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        bus = EventBus(f"redis://127.0.0.1:{proxy.port}/0", publish_timeout=10.0)
        async with bus, control_client(server.url) as ctl:
            await bus.publish(topic, {"n": -1})
            proxy.blackhole()

            async def publisher(n: int) -> None:
                receipts[n] = await bus.publish(topic, {"n": n})

            with anyio.fail_after(10):  # a batch orphaned by the cancellation hangs
                async with anyio.create_task_group() as kept, anyio.create_task_group() as doomed:
                    for n in range(20):
                        (doomed if n % 2 == 0 else kept).start_soon(publisher, n)
                    await wait_until(lambda: len(bus._durable._writer._queue) >= 1)  # type: ignore[union-attr]
                    doomed.cancel_scope.cancel()
                    proxy.heal()
            entries = await ctl.xrange(topic_keys(bus.prefix, "shared").stream)
    stored = Counter(stored_event(fields).data["n"] for _, fields in entries)
    assert set(range(1, 20, 2)) <= set(receipts)
    assert all(n % 2 == 1 or n == 0 for n in receipts)
    assert stored == Counter(range(-1, 20))  # the cancelled callers' events too, once each
    by_entry = dict(entries)
    for n, receipt in receipts.items():
        assert stored_event(by_entry[receipt.stream_id]).data == {"n": n}


# -- F25: trimming never removes what a group still needs -------------------------------


async def _all_present(ctl: aioredis.Redis, stream: str, ids: list[str]) -> list[str]:
    """Those of ``ids`` no longer in the stream."""
    if not ids:
        return []
    present = {entry_id for entry_id, _ in await ctl.xrange(stream, min=ids[0], max=ids[-1])}
    return [i for i in ids if i not in present]


async def _pending_ids(ctl: aioredis.Redis, stream: str, group: str) -> list[str]:
    rows = await ctl.xpending_range(stream, group, min="-", max="+", count=100_000)
    return [row["message_id"] for row in rows]


async def test_f25_acked_trim_keeps_pending_entries(bus_factory) -> None:
    topic = Topic("f25", durable=True, maxlen=1000)  # trim="acked" is the default
    pub, sub = bus_factory(), bus_factory()
    stream = topic_keys(pub.prefix, "f25").stream
    slow, fast = Recorder(), Recorder()
    gate = anyio.Event()

    @sub.on(topic, group="slow", consumer="s1", **FAULT_GROUP)
    async def stalled(event: Any, d: Delivery) -> None:
        await gate.wait()  # stalled: holds its entries unacked
        slow.add(d)

    @sub.on(topic, group="fast", consumer="f1", **FAULT_GROUP)
    async def keeps_up(event: Any, d: Delivery) -> None:
        fast.add(d)

    receipts: list[Receipt] = []
    async with control_client(sub.url) as ctl, sub, pub:
        # Phase 1: one group stalled while 5,000 are published (the background
        # trimmer runs every 100 publishes).
        checks = 0
        for b in range(50):
            receipts += await pub.publish_many(topic, payloads(b * 100, 100))
            held = await _pending_ids(ctl, stream, "slow")
            assert not await _all_present(ctl, stream, held), "a pending entry was trimmed"
            checks += 1
        await wait_until(lambda: len(fast.by_id) == 5000, timeout=10)
        removed_while_stalled = await pub.trim(topic)
        held = await _pending_ids(ctl, stream, "slow")
        gone = await _all_present(ctl, stream, held)
        length_stalled = await ctl.xlen(stream)
        assert held, "the stalled group holds entries"
        assert not gone, f"pending entries trimmed: {gone[:5]}"
        # The stalled group lags from the very first entry: nothing may go.
        assert length_stalled == 5000

        # Unstall: everything is handled, nothing was lost.
        gate.set()
        await wait_until(lambda: len(slow.by_id) == 5000, timeout=10)
        for group in ("slow", "fast"):
            await wait_until(lambda g=group: settled(ctl, stream, g), timeout=10)
        lost_slow, lost_fast = slow.lost(receipts), fast.lost(receipts)

        # Phase 2: no group lags; the background trimmer keeps ~maxlen.
        for b in range(20):
            receipts += await pub.publish_many(topic, payloads(5000 + b * 100, 100))
            total = len(receipts)
            await wait_until(lambda t=total: len(fast.by_id) == t, timeout=5)
        await wait_until(lambda: len(slow.by_id) == total, timeout=5)

        async def background_trimmed() -> bool:
            return int(await ctl.xlen(stream)) <= 1000 + 100 + 100

        await wait_until(background_trimmed, timeout=5)
        length_background = await ctl.xlen(stream)
        for group in ("slow", "fast"):
            await wait_until(lambda g=group: settled(ctl, stream, g), timeout=10)
        removed = await pub.trim(topic)
        length_trimmed = await ctl.xlen(stream)

    print(
        f"F25 acked: pending_checks={checks} held_by_stalled_group={len(held)}"
        f" xlen_while_stalled={length_stalled} trimmed_while_stalled={removed_while_stalled}"
        f" lost_slow={lost_slow} lost_fast={lost_fast} dup_slow={slow.dup} dup_fast={fast.dup}"
        f" xlen_background={length_background} trim_removed={removed}"
        f" xlen_trimmed={length_trimmed}"
    )
    assert removed_while_stalled == 0
    assert lost_slow == lost_fast == 0
    assert slow.lost(receipts) == fast.lost(receipts) == 0
    # Approximate: MAXLEN ~ removes whole macro nodes (100 entries each).
    assert 1000 <= length_trimmed <= 1000 + 100 + 10


async def test_f25_hard_trim_counts_trimmed_pending_entries_exactly(
    bus_factory, server_version: tuple[int, ...]
) -> None:
    """``trim="hard"``: the group is stalled by two members that crashed holding 30
    and 20 entries. 5,000 publishes trim them all. When the group runs again, one
    member restarts under a crashed name (own pending re-read: XCLAIM finds the
    entries gone) and one is new (XAUTOCLAIM's deleted list): each trimmed pending
    entry is counted once in ``lost_to_trim`` and signalled once."""
    if server_version < (7,):
        pytest.skip(
            "Redis < 7 returns trimmed pending entries as nil, without their ids, and"
            " keeps them pending: lost_to_trim is counted on Redis >= 7 only"
        )
    topic = Topic("f25h", durable=True, maxlen=1000, trim="hard")
    pub, sub = bus_factory(), bus_factory()
    stream = topic_keys(pub.prefix, "f25h").stream
    signalled: list[tuple[str, str]] = []  # (group, entry id) per signals.trimmed

    def on_trimmed(sender: object, **kw: Any) -> None:
        signalled.extend((kw["group"], entry_id) for entry_id in kw["entry_ids"])

    sub.connect_signal(signals.trimmed, on_trimmed)
    rec = Recorder()

    async def handle(event: Any, d: Delivery) -> None:
        rec.add(d)

    async with control_client(pub.url) as ctl, pub:
        receipts = await pub.publish_many(topic, payloads(0, 50))
        await ctl.xgroup_create(stream, "g", id="0")
        crashed: dict[str, list[str]] = {}
        for name, count in (("dead1", 30), ("dead2", 20)):
            # A member that read entries and crashed before acking any of them.
            ((_key, entries),) = await ctl.xreadgroup("g", name, {stream: ">"}, count=count)
            crashed[name] = [entry_id for entry_id, _ in entries]
        for b in range(50):
            receipts += await pub.publish_many(topic, payloads(50 + b * 100, 100))
        pending_ids = await _pending_ids(ctl, stream, "g")
        trimmed_pending = await _all_present(ctl, stream, pending_ids)
        length = await ctl.xlen(stream)
        assert len(pending_ids) == 50
        assert trimmed_pending == pending_ids  # MAXLEN ~ 1000 took the first 50

        sub.on(topic, group="g", consumer="dead1", **FAULT_GROUP)(handle)  # restarted
        sub.on(topic, group="g", consumer="fresh", **FAULT_GROUP)(handle)  # new member
        async with sub:

            def counted() -> int:
                return sum(s.lost_to_trim for s in sub.consumer_statistics(handle))

            await wait_until(lambda: counted() >= len(trimmed_pending), timeout=5)
            await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
            stats = sub.consumer_statistics(handle)

    per_member = {s.consumer: s.lost_to_trim for s in stats}
    published = {r.stream_id for r in receipts}
    never_delivered = published - set(rec.by_entry) - set(pending_ids)
    print(
        f"F25 hard: xlen_after_publish={length} pending={len(pending_ids)}"
        f" trimmed_pending={len(trimmed_pending)} lost_to_trim={per_member}"
        f" signalled={len(signalled)} handled={len(rec.by_id)} dup={rec.dup}"
        f" trimmed_before_delivery(never pending, not counted)={len(never_delivered)}"
    )
    assert length <= 1000 + 100
    assert sum(per_member.values()) == len(trimmed_pending)
    assert Counter(entry_id for _, entry_id in signalled) == Counter(trimmed_pending)
    assert {g for g, _ in signalled} == {"g"}
    # None of the trimmed entries was handled (nothing held them in memory).
    assert not set(rec.by_entry) & set(trimmed_pending)
    assert rec.dup == 0


# -- F26: the group (or the whole keyspace) vanishes under running consumers ------------


def _f26_params() -> list[Any]:
    # Redis >= 7.0 answers an XREADGROUP blocked on a stream that is deleted (DEL,
    # FLUSHALL) with "-UNBLOCKED the stream key no longer exists", not NOGROUP.
    return [pytest.param("flushall"), pytest.param("del"), pytest.param("destroy")]


@pytest.mark.parametrize("fault", _f26_params())
async def test_f26_group_vanishes_and_is_recreated(
    redis_server_factory, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    caplog.set_level(logging.WARNING, logger="eventbus")
    server = redis_server_factory()
    topic = Topic("f26", durable=True)
    stream = topic_keys("f26", "f26").stream
    sub = EventBus(server.url, prefix="f26")
    pub = EventBus(server.url, prefix="f26")
    rec = Recorder()

    async def handle(event: Any, d: Delivery) -> None:
        rec.add(d)

    for name in ("c1", "c2"):
        sub.on(topic, group="g", consumer=name, **FAULT_GROUP)(handle)

    async with control_client(server.url) as ctl, sub, pub:
        before = await pub.publish_many(topic, payloads(0, 200))
        await wait_until(lambda: rec.lost(before) == 0, timeout=5)
        await wait_until(lambda: settled(ctl, stream, "g"), timeout=5)

        async def both_blocked() -> bool:
            clients = await ctl.client_list()
            return sum(c["cmd"] == "xreadgroup" and "b" in c["flags"] for c in clients) == 2

        # Idle consumers sit in XREADGROUP BLOCK: the fault meets them there.
        await wait_until(both_blocked, timeout=5)
        creates_before = await command_calls(ctl, "xgroup|create")
        caplog.clear()
        fault_at = anyio.current_time()
        if fault == "flushall":
            await ctl.flushall()
        elif fault == "del":
            await ctl.delete(stream)
        else:
            await ctl.xgroup_destroy(stream, "g")

        after: list[Receipt] = []

        async def publisher() -> None:
            # Published after the fault: all must be handled (200 over ~2 s).
            for i in range(200):
                after.append(await pub.publish(topic, {"n": 1000 + i}))
                await anyio.sleep_until(fault_at + (i + 1) * 0.01)

        async def group_back() -> bool:
            return await group_info(ctl, stream, "g") is not None

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            recreated_s = await wait_until(group_back, timeout=5)
            await wait_until(lambda: any(r.id in rec.by_id for r in after), timeout=5)
            first_s = anyio.current_time() - fault_at
        await wait_until(lambda: rec.lost(after) == 0, timeout=10)
        await wait_until(lambda: settled(ctl, stream, "g"), timeout=10)
        window = anyio.current_time() - fault_at
        creates = await command_calls(ctl, "xgroup|create") - creates_before
        stats = sub.consumer_statistics(handle)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    vanished = [r for r in errors if "vanished" in r.getMessage()]
    recreated = sum(s.group_recreated for s in stats)
    print(
        f"F26 {fault}: recreate_s={recreated_s:.3f} first_new_handled_s={first_s:.3f}"
        f" lost_after_fault={rec.lost(after)} dup={rec.dup} group_recreated={recreated}"
        f" xgroup_create_calls={creates} in {window:.1f}s error_logs={len(errors)}"
        f" stats={[(s.consumer, s.group_recreated, s.ack_lost_ownership) for s in stats]}"
    )
    assert recreated_s <= 2.0
    assert rec.lost(after) == 0
    assert recreated >= 1
    assert all(s.failed == 0 for s in stats)
    # Logged at ERROR once (per consumer that met the vanished group), nothing else.
    assert 1 <= len(vanished) <= len(stats)
    assert errors == vanished
    # No crash loop: at most 5 recreate attempts per second per consumer.
    assert creates <= 5 * window * len(stats)
    assert creates <= 2 * len(stats)


# -- F27: where a new group starts ------------------------------------------------------


async def test_f27_new_group_start_position(bus_factory) -> None:
    topic = Topic("f27", durable=True)
    pub, early_bus, late_bus = bus_factory(), bus_factory(), bus_factory()
    stream = topic_keys(pub.prefix, "f27").stream
    early, late = Recorder(), Recorder()

    @early_bus.on(topic, group="early", consumer="e1", **FAULT_GROUP)  # start="earliest"
    async def from_start(event: Any, d: Delivery) -> None:
        early.add(d)

    @late_bus.on(topic, group="late", consumer="l1", start="latest", **FAULT_GROUP)
    async def from_now(event: Any, d: Delivery) -> None:
        late.add(d)

    async with control_client(pub.url) as ctl, pub:
        old = await pub.publish_many(topic, payloads(0, 100))  # before either group exists
        async with early_bus, late_bus:  # returns once both groups are created and reading
            await wait_until(lambda: early.lost(old) == 0, timeout=5)
            new = await pub.publish_many(topic, payloads(100, 10))
            await wait_until(lambda: late.lost(new) == 0 and early.lost(new) == 0, timeout=5)
            for group in ("early", "late"):
                await wait_until(lambda g=group: settled(ctl, stream, g), timeout=5)
    print(
        f"F27 earliest handled {len(early.by_id)} of 100 old + 10 new;"
        f" latest handled {len(late.by_id)} (old: {sum(r.id in late.by_id for r in old)})"
    )
    assert set(early.by_id) == {r.id for r in old + new}
    assert set(late.by_id) == {r.id for r in new}
    assert early.dup == late.dup == 0


# -- F29: chaining stays exactly-once through handler-process crashes ------------------


def _supervisor(server_url: str, markers: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.streams._chain_worker",
            "--url",
            server_url,
            "--prefix",
            "f29",
            "--markers",
            str(markers),
            "--workers",
            "3",
            "--max-seconds",
            "60",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
async def test_f29_chained_children_exactly_once_through_crashes(
    redis_server_factory, tmp_path: Path
) -> None:
    rng = fault_rng("F29")
    server = redis_server_factory()
    orders = Topic("orders", durable=True)
    invoices = Topic("invoices", durable=True)
    order_keys, invoice_keys = topic_keys("f29", "orders"), topic_keys("f29", "invoices")
    markers = tmp_path / "markers"
    markers.mkdir()
    n_orders, n_crash = 1000, 50
    crash = set(rng.sample(range(n_orders), n_crash))
    pub = EventBus(server.url, prefix="f29")
    audit_bus = EventBus(server.url, prefix="f29")
    children: dict[str, Delivery] = {}
    child_payloads: dict[str, Any] = {}

    @audit_bus.on(invoices, group="audit", consumer="a1", **FAULT_GROUP)
    async def audit(invoice: Any, d: Delivery) -> None:
        children[d.id] = d
        child_payloads[d.id] = invoice

    async with control_client(server.url) as ctl, pub:
        receipts = await pub.publish_many(
            orders, [{"n": n, "crash": n in crash} for n in range(n_orders)]
        )
        parent_of = {r.id: n for n, r in enumerate(receipts)}
        expected = {uuid.uuid5(CHAIN_NAMESPACE, f"{r.id}/0").hex: r.id for r in receipts}
        start = anyio.current_time()
        proc = _supervisor(server.url, markers)
        try:

            async def chained() -> bool:
                return (
                    len(list(markers.iterdir())) == n_crash
                    and await ctl.xlen(invoice_keys.stream) >= n_orders
                    and await settled(ctl, order_keys.stream, "chain")
                )

            await wait_until(chained, timeout=45, interval=0.05)
            elapsed = anyio.current_time() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=20))
        entries = await ctl.xrange(invoice_keys.stream)
        dead_letters = await ctl.xlen(order_keys.dlq)
        async with audit_bus:
            await wait_until(lambda: len(children) >= len(expected), timeout=10)

    events = [orjson.loads(line) for line in out.splitlines() if line.strip()]
    killed = sum(1 for e in events if e["event"] == "exit" and e.get("signal") == signal.SIGKILL)
    other_exits = [
        e for e in events if e["event"] == "exit" and not e.get("stopped") and e.get("signal") != 9
    ]
    (done,) = [e for e in events if e["event"] == "done"]
    in_stream = Counter(stored_event(fields).id for _, fields in entries)
    lost = sum(1 for child in expected if in_stream[child] == 0)
    dup = sum(n - 1 for n in in_stream.values())
    unexpected = set(in_stream) - set(expected)
    print(
        f"F29 orders={n_orders} kills={killed} spawned={done['spawned']}"
        f" children_in_stream={len(entries)} lost={lost} dup={dup}"
        f" unexpected={len(unexpected)} dead_letters={dead_letters} elapsed_s={elapsed:.2f}"
    )
    assert not other_exits, (other_exits, err.decode()[-2000:])
    assert killed == n_crash  # each flagged order crashed its process exactly once
    assert lost == 0
    assert dup == 0
    assert not unexpected
    assert dead_letters == 0
    # Deterministic ids and the causation chain, as consumers see them.
    assert set(children) == set(expected)
    for child_id, d in children.items():
        parent = expected[child_id]
        assert d.causation_id == parent
        assert d.correlation_id == parent  # the parent is the chain's root
        assert child_payloads[child_id] == {"order": parent_of[parent], "parent": parent}
