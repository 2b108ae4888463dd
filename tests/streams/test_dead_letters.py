"""RELIABILITY.md F14-F17 and the dead-letter API: poison, flaky and malformed entries.

Consumer-group members run in this process against the session's redis-server
(unique key prefix per test), with the short fault config
of §6: claim_idle=2 s, claim interval=0.5 s, block=1 s, batch=10, concurrency=4,
max_attempts=4, backoff 0.2 s x2 (small jitter). Malformed input is written with
raw redis-py ``XADD`` / ``PUBLISH``, never through the bus. Each test prints the
numbers it measured (``F14 dlq_latency_s=...``).
"""

from __future__ import annotations

import math
import pickle
import statistics
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import anyio
import attrs
import orjson
import psutil
import pytest
import redis.asyncio as aioredis

from eventbus import (
    ClaimPolicy,
    DeadLetter,
    Delivery,
    EventBus,
    Limits,
    Receipt,
    RetryPolicy,
    Topic,
    signals,
)
from eventbus.errors import PayloadTooLarge

from ..helpers import command_calls, control_client, wait_until

N = 1000
CLAIM_IDLE = 2.0
BACKOFF = 0.2
JITTER = 0.05
TOLERANCE = 0.05  # ±50 ms on measured retry delays (§7 F15)
MAX_ATTEMPTS = 4
MiB = 1024 * 1024

SHORT: dict[str, Any] = {
    "concurrency": 4,
    "batch": 10,
    "block": 1.0,
    "max_attempts": MAX_ATTEMPTS,
    "claim_idle": CLAIM_IDLE,
    "claim": ClaimPolicy(interval=0.5),
    "retry": RetryPolicy(backoff=BACKOFF, multiplier=2.0, jitter=JITTER),
}


@attrs.frozen
class Payment:
    amount: int
    note: str


# -- helpers ------------------------------------------------------------------------------


def stream_key(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}:stream"


def raw_client(url: str) -> aioredis.Redis:
    """redis-py with bytes replies: what a foreign (or hostile) producer would use."""
    return aioredis.Redis.from_url(url)


async def pending(ctl: aioredis.Redis, stream: str, group: str) -> int:
    return int((await ctl.xpending(stream, group))["pending"])


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(0.99 * len(ordered)) - 1, 0)]


def envelope(event_id: str, data: Any, **overrides: Any) -> bytes:
    doc: dict[str, Any] = {
        "eventbus": 1,
        "id": event_id,
        "pub": "raw-producer",
        "seq": 1,
        "ts": int(time.time() * 1000),
        "ct": "application/json",
        "data": data,
    }
    doc.update(overrides)
    return orjson.dumps(doc)


async def publish_paced(
    bus: EventBus, topic: Topic[Any], events: list[Any], *, chunk: int = 20, interval: float = 0.04
) -> list[Receipt]:
    """Publish at a steady offered load (500 events/s by default), not as one burst,
    so publish->handle latency measures the consumer, not the backlog of a burst."""
    receipts: list[Receipt] = []
    start = anyio.current_time()
    for k, i in enumerate(range(0, len(events), chunk)):
        receipts += await bus.publish_many(topic, events[i : i + chunk])
        await anyio.sleep(max(start + (k + 1) * interval - anyio.current_time(), 0))
    return receipts


def raise_deep(depth: int) -> None:
    """Raise ValueError("boom") under ``depth`` alternating frames (not collapsed into
    "[Previous line repeated ...]"): a traceback well over 4 KiB."""
    if depth == 0:
        raise ValueError("boom")
    _raise_deeper(depth - 1)


def _raise_deeper(depth: int) -> None:
    raise_deep(depth)


class _PickleCanary:
    """Unpickling this creates ``path`` (``open(path, "w")``): proof that someone unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


# -- F14 ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_f14_poison_event_goes_to_dlq_once_and_replays_with_same_id(
    bus_factory, redis_url
) -> None:
    bus = bus_factory()
    orders = Topic("orders", durable=True)
    poison_n = 500
    poison_calls: list[tuple[float, Delivery]] = []
    latencies: dict[str, float] = {}
    billing_calls: Counter[str] = Counter()
    audit_calls: Counter[str] = Counter()
    dead_signals: list[tuple[float, dict[str, Any]]] = []
    full_traceback: list[int] = []

    @bus.on(orders, group="billing", consumer="billing-1", **SHORT)
    async def bill(event: dict, d: Delivery) -> None:
        billing_calls[d.id] += 1
        if event["n"] == poison_n:
            poison_calls.append((anyio.current_time(), d))
            try:
                raise_deep(60)
            except ValueError as exc:
                full_traceback.append(len("".join(traceback.format_exception(exc))))
                raise
        assert d.published_at is not None
        latencies[d.id] = time.time() - d.published_at.timestamp()

    @bus.on(orders, group="audit", consumer="audit-1", **SHORT)
    async def audit(event: dict, d: Delivery) -> None:
        audit_calls[d.id] += 1

    bus.connect_signal(
        signals.dead_lettered, lambda s, **kw: dead_signals.append((anyio.current_time(), kw))
    )
    stream = stream_key(bus, "orders")
    async with control_client(redis_url) as ctl, bus:
        receipts = await publish_paced(bus, orders, [{"n": n} for n in range(1, N + 1)])
        poison_id = receipts[poison_n - 1].id
        good_ids = {r.id for r in receipts} - {poison_id}

        await wait_until(
            lambda: (
                len(dead_signals) == 1 and good_ids <= latencies.keys() and len(audit_calls) == N
            ),
            timeout=10,
        )
        first_call = poison_calls[0][0]
        dlq_latency = dead_signals[0][0] - first_call

        async def no_pending() -> bool:
            return (
                await pending(ctl, stream, "billing") == 0
                and await pending(ctl, stream, "audit") == 0
            )

        await wait_until(no_pending, timeout=5)

        # The poison event: exactly 4 invocations, attempt 1..4, then one dead letter.
        assert [d.attempt for _, d in poison_calls] == [1, 2, 3, 4]
        assert {d.id for _, d in poison_calls} == {poison_id}
        assert billing_calls[poison_id] == MAX_ATTEMPTS
        assert dlq_latency <= 3.0
        dls = await bus.dead_letters(orders)
        assert len(dls) == 1
        dl = dls[0]
        assert dl.event_id == poison_id
        assert dl.topic == "orders"
        assert dl.original_id == receipts[poison_n - 1].stream_id
        assert dl.group == "billing"
        assert dl.consumer == "billing-1"
        assert dl.attempts == MAX_ATTEMPTS
        assert dl.reason == "handler_error"
        assert dl.error_type == "ValueError"
        assert dl.error_message == "boom"
        assert min(full_traceback) > 4096  # so the bound is exercised
        assert 0 < len(dl.traceback.encode()) <= 4096
        assert dl.traceback.endswith("ValueError: boom\n")  # the innermost end is kept
        assert "raise_deep" in dl.traceback
        assert abs(dl.failed_at.timestamp() - time.time()) < 30
        assert dl.failed_at.timestamp() * 1000 >= int(
            receipts[poison_n - 1].stream_id.split("-")[0]
        )
        assert dl.envelope is not None
        assert orjson.loads(dl.envelope)["id"] == poison_id
        assert dl.raw is None

        # The signal, once, naming the same dead letter.
        (_, kw) = dead_signals[0]
        assert kw["topic"] == "orders"
        assert kw["event_id"] == poison_id
        assert kw["group"] == "billing"
        assert kw["reason"] == "handler_error"
        assert isinstance(kw["error"], ValueError)
        assert kw["dead_letter_id"] == dl.id

        # No head-of-line blocking: every other event handled, once, promptly.
        assert latencies.keys() == good_ids
        assert all(billing_calls[i] == 1 for i in good_ids)
        assert set(audit_calls) == {r.id for r in receipts}
        assert set(audit_calls.values()) == {1}
        latency_p99 = p99(list(latencies.values()))
        assert latency_p99 <= 0.2

        stats = (await bus.stats(orders)).topic("orders")
        groups = {g.name: g for g in stats.groups}
        assert stats.dead_letters == 1
        assert (groups["billing"].dead_letters, groups["audit"].dead_letters) == (1, 0)
        assert (groups["billing"].pending, groups["audit"].pending) == (0, 0)
        (st,) = bus.consumer_statistics(bill)
        assert (st.handled, st.failed, st.retried, st.dead_lettered) == (N - 1, 4, 3, 1)
        print(
            f"\nF14 dlq_latency_s={dlq_latency:.3f} poison_invocations={len(poison_calls)}"
            f" p50_latency_s={statistics.median(latencies.values()):.4f}"
            f" p99_latency_s={latency_p99:.4f} max_latency_s={max(latencies.values()):.4f}"
            f" traceback_bytes={len(dl.traceback.encode())} (full {full_traceback[-1]})"
            f" handled={st.handled}"
            f" failed={st.failed} retried={st.retried} dead_lettered={st.dead_lettered}"
        )

        # Replay: same event id, a new stream entry that links back to the dead letter.
        # The handler still fails, so the replayed event runs 4 more attempts and is
        # dead-lettered again (fresh delivery count); every group sees the replay.
        assert await bus.replay_dead_letters(orders) == 1
        assert await bus.dead_letters(orders) == []
        await wait_until(lambda: len(dead_signals) == 2 and audit_calls[poison_id] == 2, timeout=5)
        replayed = [d for _, d in poison_calls[MAX_ATTEMPTS:]]
        assert [d.attempt for d in replayed] == [1, 2, 3, 4]
        assert {d.id for d in replayed} == {poison_id}
        (new_stream_id,) = {d.stream_id for d in replayed}
        assert new_stream_id != dl.original_id
        ((entry_id, fields),) = await ctl.xrange(stream, min=new_stream_id, max=new_stream_id)
        assert fields["redriven_from"] == dl.id
        assert fields["id"] == poison_id
        (dl2,) = await bus.dead_letters(orders)
        assert (dl2.event_id, dl2.original_id, dl2.attempts) == (poison_id, entry_id, 4)
        stats = (await bus.stats(orders)).topic("orders")
        assert {g.name: g.dead_letters for g in stats.groups} == {"billing": 2, "audit": 0}

        # Purge empties the dead-letter stream and resets the per-group counts.
        assert await bus.purge_dead_letters(orders) == 1
        assert await bus.dead_letters(orders) == []
        stats = (await bus.stats(orders)).topic("orders")
        assert stats.dead_letters == 0
        assert {g.name: g.dead_letters for g in stats.groups} == {"billing": 0, "audit": 0}
        await wait_until(no_pending, timeout=5)
        print(
            f"F14 replay: redriven_from={fields['redriven_from']} new_entry={entry_id}"
            f" replay_attempts={len(replayed)} audit_copies={audit_calls[poison_id]}"
        )


# -- F15 ----------------------------------------------------------------------------------


@pytest.mark.slow
async def test_f15_transient_failures_retry_with_backoff_and_all_succeed(
    bus_factory, redis_url
) -> None:
    bus = bus_factory()
    orders = Topic("orders", durable=True)
    stream = stream_key(bus, "orders")
    # event id -> [(monotonic time of the call, Delivery.attempt, XPENDING times_delivered)]
    calls: dict[str, list[tuple[float, int, int]]] = defaultdict(list)
    succeeded: Counter[str] = Counter()
    dead: list[dict[str, Any]] = []

    async with control_client(redis_url) as ctl:

        @bus.on(orders, group="billing", consumer="billing-1", **SHORT)
        async def bill(event: dict, d: Delivery) -> None:
            now = anyio.current_time()
            flaky = event["n"] % 10 == 0
            delivered = -1
            if flaky:
                # Redis's own delivery count of this entry, read while it is ours.
                (entry,) = await ctl.xpending_range(
                    stream, "billing", min=d.stream_id, max=d.stream_id, count=1
                )
                delivered = int(entry["times_delivered"])
            calls[d.id].append((now, d.attempt, delivered))
            if flaky and d.attempt <= 2:
                raise ConnectionError(f"transient failure {d.attempt} of event {event['n']}")
            succeeded[d.id] += 1

        bus.connect_signal(signals.dead_lettered, lambda s, **kw: dead.append(kw))
        async with bus:
            receipts = await publish_paced(bus, orders, [{"n": n} for n in range(1, N + 1)])
            flaky_ids = {r.id for n, r in enumerate(receipts, 1) if n % 10 == 0}
            await wait_until(lambda: len(succeeded) == N, timeout=10)

            async def no_pending() -> bool:
                return await pending(ctl, stream, "billing") == 0

            await wait_until(no_pending, timeout=5)
            dlq = await bus.dead_letters(orders)
            (st,) = bus.consumer_statistics(bill)

    assert len(flaky_ids) == N // 10
    assert set(succeeded) == {r.id for r in receipts}
    assert set(succeeded.values()) == {1}
    assert dlq == []
    assert dead == []
    first_delays: list[float] = []
    second_delays: list[float] = []
    for event_id, seen in calls.items():
        if event_id in flaky_ids:
            assert [attempt for _, attempt, _ in seen] == [1, 2, 3]
            # Delivery.attempt is Redis's delivery count (XPENDING), on every attempt.
            assert [delivered for _, _, delivered in seen] == [1, 2, 3]
            first_delays.append(seen[1][0] - seen[0][0])
            second_delays.append(seen[2][0] - seen[1][0])
        else:
            assert [attempt for _, attempt, _ in seen] == [1]
    # The spec's bar: no retry earlier than its backoff (less the ±50 ms tolerance).
    assert min(first_delays) >= BACKOFF - TOLERANCE
    assert min(second_delays) >= 2 * BACKOFF - TOLERANCE
    # And the retry is the backoff's, not a claim after claim_idle (2 s): the upper
    # bound allows scheduling slack on a busy 2-core machine.
    assert max(first_delays) <= BACKOFF * (1 + JITTER) + 0.15
    assert max(second_delays) <= 2 * BACKOFF * (1 + JITTER) + 0.15
    assert (st.handled, st.failed, st.retried, st.dead_lettered) == (N, 200, 200, 0)
    print(
        f"\nF15 flaky={len(flaky_ids)} handled={st.handled} failed={st.failed}"
        f" retried={st.retried} dlq={len(dlq)}"
        f" delay1_s=[{min(first_delays):.3f}, {max(first_delays):.3f}]"
        f" delay2_s=[{min(second_delays):.3f}, {max(second_delays):.3f}]"
    )


# -- F16 ----------------------------------------------------------------------------------


def malformed_entries(canary: Path) -> list[tuple[str, dict[bytes, bytes], str]]:
    """(name, raw stream-entry fields, expected dead-letter reason)."""
    evil = pickle.dumps(_PickleCanary(canary))
    good = {"amount": 5, "note": "ok"}
    return [
        ("invalid_json", {b"id": b"bad-json", b"env": b'{"eventbus": 1, "id": '}, "decode_error"),
        ("env_not_object", {b"id": b"bad-array", b"env": b"[1, 2, 3]"}, "decode_error"),
        (
            "wrong_schema",
            {
                b"id": b"bad-schema",
                b"env": envelope("bad-schema", {"amount": "lots", "note": "x"}),
            },
            "validation_error",
        ),
        (
            "wrong_schema_bare_data",
            {b"id": b"bad-bare", b"data": b'{"amount": "lots", "note": "x"}'},
            "validation_error",
        ),
        (
            "missing_envelope_fields",
            {b"id": b"bad-missing", b"env": orjson.dumps({"eventbus": 1, "id": "bad-missing"})},
            "decode_error",
        ),
        (
            "envelope_field_wrong_type",
            {b"id": b"bad-seq", b"env": envelope("bad-seq", good, seq="one")},
            "decode_error",
        ),
        (
            "unknown_content_type",
            {
                b"id": b"bad-ct",
                b"env": envelope("bad-ct", "gASVAAAA", ct="application/x-python-pickle"),
            },
            "decode_error",
        ),
        (
            "unsupported_version",
            {b"id": b"bad-v2", b"env": envelope("bad-v2", good, eventbus=2)},
            "unsupported_version",
        ),
        ("non_utf8_env", {b"id": b"bad-utf8", b"env": b"\xff\xfe\x80\x81{}"}, "decode_error"),
        ("non_utf8_field_names", {b"\xff\xfe": b"\x80", b"\xc3\x28": b"x"}, "decode_error"),
        (
            "too_many_fields",
            {b"id": b"bad-fields", **{f"f{i}".encode(): b"x" for i in range(9_999)}},
            "too_many_fields",
        ),
        ("unrelated_fields", {b"foo": b"bar", b"baz": b"1"}, "decode_error"),
        ("pickle_env", {b"id": b"bad-pickle-env", b"env": evil}, "decode_error"),
        ("pickle_data", {b"id": b"bad-pickle-data", b"data": evil}, "validation_error"),
    ]


async def test_f16_malformed_entries_are_dead_lettered_at_once_and_never_handled(
    bus_factory, redis_url, tmp_path
) -> None:
    canary = tmp_path / "canary-unpickled"
    bad = malformed_entries(canary)
    bus = bus_factory()
    payments = Topic("payments", Payment, durable=True)
    stream = stream_key(bus, "payments")
    handled: Counter[str] = Counter()
    handled_entries: set[str] = set()
    dead: list[dict[str, Any]] = []

    @bus.on(payments, group="ledger", consumer="ledger-1", **SHORT)
    async def book(payment: Payment, d: Delivery) -> None:
        assert isinstance(payment.amount, int)
        handled[d.id] += 1
        handled_entries.add(d.stream_id)

    bus.connect_signal(signals.dead_lettered, lambda s, **kw: dead.append(kw))
    process = psutil.Process()
    rss_before = process.memory_info().rss
    expected: dict[str, tuple[str, str]] = {}  # stream id -> (name, reason)
    receipts: list[Receipt] = []
    async with control_client(redis_url) as ctl, raw_client(redis_url) as raw, bus:
        # 1,000 valid events with a malformed entry after each chunk of them.
        chunk = math.ceil(N / len(bad))
        for k, (name, fields, reason) in enumerate(bad):
            valid = [Payment(amount=n, note=f"p{n}") for n in range(k * chunk, (k + 1) * chunk)]
            receipts += await bus.publish_many(payments, valid[: N - len(receipts)])
            entry_id = (await raw.xadd(stream, fields)).decode()
            expected[entry_id] = (name, reason)
        assert len(receipts) == N

        await wait_until(lambda: len(handled) == N and len(dead) == len(bad), timeout=10)

        async def no_pending() -> bool:
            return await pending(ctl, stream, "ledger") == 0

        await wait_until(no_pending, timeout=5)
        dls = await bus.dead_letters(payments, count=1000)
        stats = (await bus.stats(payments)).topic("payments")
        (st,) = bus.consumer_statistics(book)
    rss_growth = process.memory_info().rss - rss_before

    # Each malformed entry: one dead letter, on its first delivery, with its reason.
    by_original = {dl.original_id: dl for dl in dls}
    assert len(dls) == len(bad)
    assert by_original.keys() == expected.keys()
    delays: list[float] = []
    for entry_id, (name, reason) in expected.items():
        dl = by_original[entry_id]
        assert (name, dl.reason) == (name, reason)
        assert (name, dl.attempts) == (name, 1)
        assert dl.group == "ledger"
        assert dl.envelope is None  # nothing to replay
        assert dl.raw is not None
        assert len(dl.raw) <= 64 * 1024  # see test_dead_letter_raw_is_bounded_to_64_kib
        assert dl.error_type == "DecodeError"
        delays.append(dl.failed_at.timestamp() - int(entry_id.split("-")[0]) / 1000)
    assert max(delays) <= 1.0
    schema = next(dl for dl in dls if dl.event_id == "bad-schema")
    assert "$.amount" in schema.error_message
    assert orjson.loads(schema.raw or b"")["id"] == "bad-schema"
    fields_dl = next(dl for dl in dls if dl.reason == "too_many_fields")
    assert "10000 fields" in fields_dl.error_message
    assert orjson.loads(fields_dl.raw or b"")["id"] == "bad-fields"
    utf8_dl = next(dl for dl in dls if dl.event_id == "bad-utf8")
    assert orjson.loads(utf8_dl.raw or b"")["env"].startswith("base64:")

    # The valid events: all handled once, none of the malformed ones reached the handler.
    assert set(handled) == {r.id for r in receipts}
    assert set(handled.values()) == {1}
    assert not handled_entries & expected.keys()
    published = {r.id for r in receipts}
    lost = len(published - handled.keys() - {dl.event_id for dl in dls})
    assert lost == 0
    assert not canary.exists()
    assert stats.dead_letters == len(bad)
    assert stats.groups[0].pending == 0
    assert (st.handled, st.failed, st.dead_lettered) == (N, 0, len(bad))
    assert rss_growth <= 50 * MiB
    reasons = Counter(dl.reason for dl in dls)
    print(
        f"\nF16 malformed={len(bad)} valid_handled={len(handled)} lost={lost}"
        f" handler_calls_malformed={len(handled_entries & expected.keys())}"
        f" max_dlq_delay_s={max(delays):.3f} rss_growth_mb={rss_growth / MiB:.1f}"
        f" canary_exists={canary.exists()} reasons={dict(reasons)}"
    )


async def test_dead_letter_raw_is_bounded_to_64_kib(bus_factory, redis_url) -> None:
    """What an undecodable entry keeps in the dead-letter stream stays within the
    library's own 64 KiB (+1 KiB slack) budget, whatever its shape."""
    bus = bus_factory()
    topic = Topic("raw", durable=True)
    stream = stream_key(bus, "raw")

    @bus.on(topic, group="g", consumer="g-1", **SHORT)
    async def never(event: object) -> None:
        raise AssertionError("an undecodable entry reached the handler")

    async with raw_client(redis_url) as raw, bus:
        await raw.xadd(stream, {f"f{i}".encode(): b"x" for i in range(10_000)})
        await raw.xadd(stream, {b"id": b"ctl", b"env": b"\x01" * 60_000})
        await wait_until(lambda: bus.consumer_statistics(never)[0].dead_lettered == 2, timeout=5)
        dls = await bus.dead_letters(topic)
    sizes = [len(dl.raw or b"") for dl in dls]
    print(f"\nraw dead-letter sizes: {sizes} (budget {64 * 1024})")
    assert max(sizes) <= 65 * 1024


# -- F17 ----------------------------------------------------------------------------------

LIMITS_1MIB = Limits(max_payload_bytes=MiB)


async def test_f17a_oversized_publish_is_refused_before_any_io(bus_factory, redis_url) -> None:
    bus = bus_factory(limits=LIMITS_1MIB)
    orders = Topic("orders", durable=True)
    stream = stream_key(bus, "orders")
    async with control_client(redis_url) as ctl, bus:
        before = await command_calls(ctl, "xadd")
        with pytest.raises(PayloadTooLarge) as info:
            await bus.publish(orders, {"blob": "x" * (2 * MiB)})
        # One oversized event in a batch: nothing of the batch is sent.
        with pytest.raises(PayloadTooLarge):
            await bus.publish_many(orders, [{"n": 1}, {"blob": "x" * (2 * MiB)}, {"n": 3}])
        after = await command_calls(ctl, "xadd")
        length = await ctl.xlen(stream)
    assert after == before
    assert length == 0
    assert info.value.limit == MiB
    assert info.value.size > 2 * MiB
    assert info.value.topic == "orders"
    print(
        f"\nF17a size={info.value.size} limit={info.value.limit} xadd_calls_delta={after - before}"
    )


async def test_f17b_oversized_raw_entry_is_dead_lettered_as_too_large(
    bus_factory, redis_url
) -> None:
    bus = bus_factory(limits=LIMITS_1MIB)
    orders = Topic("orders", durable=True)
    stream = stream_key(bus, "orders")
    handled: list[str] = []

    @bus.on(orders, group="billing", consumer="billing-1", **SHORT)
    async def bill(event: dict, d: Delivery) -> None:
        handled.append(d.stream_id)

    async with control_client(redis_url) as ctl, raw_client(redis_url) as raw, bus:
        # A well-formed envelope, only too big: the size alone must decide.
        big = envelope("big-one", {"blob": "x" * (2 * MiB)})
        big_id = (await raw.xadd(stream, {b"id": b"big-one", b"env": big})).decode()
        receipt = await bus.publish(orders, {"n": 1})
        await wait_until(lambda: handled == [receipt.stream_id], timeout=5)
        await wait_until(lambda: bus.consumer_statistics(bill)[0].dead_lettered == 1, timeout=5)

        async def no_pending() -> bool:
            return await pending(ctl, stream, "billing") == 0

        await wait_until(no_pending, timeout=5)
        (dl,) = await bus.dead_letters(orders)
    assert (dl.original_id, dl.event_id, dl.reason, dl.attempts) == (
        big_id,
        "big-one",
        "too_large",
        1,
    )
    assert dl.envelope is None
    assert dl.raw is not None
    assert len(dl.raw) <= 65 * 1024  # not a second 2 MiB copy
    assert big_id not in handled
    print(
        f"\nF17b entry_bytes={len(big)} reason={dl.reason} attempts={dl.attempts}"
        f" raw_kept_bytes={len(dl.raw)} handled={len(handled)}"
    )


async def test_f17c_oversized_live_message_is_dropped_and_counted(bus_factory, redis_url) -> None:
    bus = bus_factory(limits=LIMITS_1MIB)
    failures: list[BaseException] = []
    bus.connect_signal(signals.failed, lambda s, **kw: failures.append(kw["error"]))
    async with raw_client(redis_url) as raw, bus, bus.subscribe("prices") as sub:
        channel = f"{bus.prefix}:{{prices}}"
        assert await raw.publish(channel, orjson.dumps({"blob": "x" * (2 * MiB)})) == 1
        await bus.publish("prices", {"n": 1})
        with anyio.fail_after(5):
            first = await sub.receive()
        stats = sub.statistics()
    assert first == {"n": 1}
    assert (stats.received, stats.delivered, stats.errors) == (1, 1, 1)
    assert len(failures) == 1
    assert isinstance(failures[0], PayloadTooLarge)
    print(
        f"\nF17c dropped_errors={stats.errors} delivered={stats.delivered}"
        f" size={failures[0].size} limit={failures[0].limit}"
    )


# -- the dead-letter API ------------------------------------------------------------------


async def test_dead_letter_api_pages_replays_and_purges_subsets(bus_factory, redis_url) -> None:
    bus = bus_factory()
    orders = Topic("orders", durable=True)
    stream = stream_key(bus, "orders")
    failing = True
    handled: list[Delivery] = []
    options = {**SHORT, "max_attempts": 1}  # dead-letter on the first failure

    @bus.on(orders, group="billing", consumer="billing-1", **options)
    async def bill(event: dict, d: Delivery) -> None:
        if failing:
            raise RuntimeError(f"no funds for {event['n']}")
        handled.append(d)

    async with control_client(redis_url) as ctl, raw_client(redis_url) as raw, bus:
        receipts = [await bus.publish(orders, {"n": n}) for n in range(6)]
        u1 = (await raw.xadd(stream, {b"id": b"u1", b"env": b"\xff\x00garbage"})).decode()
        u2 = (await raw.xadd(stream, {b"foo": b"bar"})).decode()
        await wait_until(lambda: bus.consumer_statistics(bill)[0].dead_lettered == 8, timeout=5)
        everything = await bus.dead_letters(orders)
        assert len(everything) == 8

        # Paging: count + after walk the whole stream once, oldest first.
        pages: list[list[DeadLetter]] = []
        after: str | None = None
        while page := await bus.dead_letters(orders, count=3, after=after):
            pages.append(page)
            after = page[-1].id
        assert [len(p) for p in pages] == [3, 3, 2]
        assert [dl.id for p in pages for dl in p] == [dl.id for dl in everything]
        assert await bus.dead_letters(orders, count=3, after=everything[-1].id) == []

        by_original = {dl.original_id: dl for dl in everything}
        a = [by_original[r.stream_id or ""] for r in receipts]
        for dl, receipt in zip(a, receipts, strict=True):
            assert (dl.event_id, dl.reason, dl.attempts) == (receipt.id, "handler_error", 1)
            assert dl.error_type == "RuntimeError"
            assert dl.envelope is not None
            assert dl.raw is None
        # Undecodable input: no envelope; its fields as JSON in .raw.
        du1, du2 = by_original[u1], by_original[u2]
        assert (du1.reason, du1.event_id, du1.envelope) == ("decode_error", "u1", None)
        assert orjson.loads(du1.raw or b"") == {"id": "u1", "env": "base64:/wBnYXJiYWdl"}
        assert (du2.reason, du2.event_id, du2.envelope) == ("decode_error", "", None)
        assert orjson.loads(du2.raw or b"") == {"foo": "bar"}

        # Replay a subset: the undecodable one is skipped and kept.
        failing = False
        assert await bus.replay_dead_letters(orders, [a[0].id, a[1].id, du1.id]) == 2
        left = {dl.id for dl in await bus.dead_letters(orders)}
        assert left == {dl.id for dl in everything} - {a[0].id, a[1].id}
        await wait_until(lambda: len(handled) == 2, timeout=5)
        assert {d.id for d in handled} == {receipts[0].id, receipts[1].id}
        for d in handled:
            ((_, fields),) = await ctl.xrange(stream, min=d.stream_id, max=d.stream_id)
            assert fields["id"] == d.id
            assert fields["redriven_from"] in {a[0].id, a[1].id}
            assert d.attempt == 1
        # Replaying what is gone, or nothing, replays nothing.
        assert await bus.replay_dead_letters(orders, [a[0].id]) == 0
        assert await bus.replay_dead_letters(orders, []) == 0

        # Purge a subset.
        assert await bus.purge_dead_letters(orders, [a[2].id, du2.id]) == 2
        assert await bus.purge_dead_letters(orders, [a[2].id]) == 0
        left = {dl.id for dl in await bus.dead_letters(orders)}
        assert left == {a[3].id, a[4].id, a[5].id, du1.id}

        # Replay all: every replayable one; the undecodable one stays.
        assert await bus.replay_dead_letters(orders) == 3
        assert [dl.id for dl in await bus.dead_letters(orders)] == [du1.id]
        await wait_until(lambda: len(handled) == 5, timeout=5)
        assert {d.id for d in handled} == {r.id for r in receipts} - {receipts[2].id}

        # Purge all.
        assert await bus.purge_dead_letters(orders) == 1
        assert await bus.dead_letters(orders) == []
        assert await bus.purge_dead_letters(orders) == 0

        async def no_pending() -> bool:
            return await pending(ctl, stream, "billing") == 0

        await wait_until(no_pending, timeout=5)
        stats = (await bus.stats(orders)).topic("orders")
    assert stats.dead_letters == 0
    assert [(g.name, g.dead_letters, g.pending) for g in stats.groups] == [("billing", 0, 0)]
    print(
        f"\nDLQ api: dead_lettered=8 pages={[len(p) for p in pages]} replayed=2+3"
        f" purged=2+1 kept_undecodable=1 handled_after_replay={len(handled)}"
    )


async def test_a_validation_error_dead_letter_keeps_the_event_id(bus_factory) -> None:
    """A version 2 entry whose payload does not fit the handler's type is dead-lettered
    with its raw fields and the event id its publisher got (decoded from ``i``)."""

    @attrs.frozen
    class Strict:
        amount: int

    topic = Topic("strict", durable=True)
    publisher, consumer = bus_factory(), bus_factory()
    handled: list[Strict] = []

    @consumer.on(Topic("strict", Strict, durable=True), group="g")
    async def handle(event: Strict) -> None:
        handled.append(event)

    async with publisher, consumer:
        receipt = await publisher.publish(topic, {"amount": "lots"})
        await wait_until(lambda: consumer.consumer_statistics(handle)[0].dead_lettered == 1)
        (dead,) = await consumer.dead_letters(topic)
    assert dead.reason == "validation_error"
    assert dead.event_id == receipt.id
    assert handled == []
