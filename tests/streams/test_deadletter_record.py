"""The dead-letter record: what ``DeadLetterWriter`` writes is what ``DeadLetter`` reads.

Both sides live in ``eventbus._streams._deadletter`` and share its ``FIELD_*``
names; these tests hold them to one format. The Redis tests write with the writer
against the session's redis-server (unique key prefix) and read back with
``list_dead_letters``; the unit tests run the field builder and the reader on a
dict, as Redis would return the fields.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from eventbus import DeadLetter, Limits, make_converter
from eventbus._codec import Codec
from eventbus._keys import TopicKeys, topic_keys
from eventbus._stats import ConsumerCounters
from eventbus._streams._deadletter import (
    FIELD_ENV,
    FIELD_ID,
    FIELD_RAW,
    MAX_ERROR_MESSAGE,
    MAX_RAW,
    MAX_TRACEBACK,
    DeadLetterWriter,
    dead_letter_fields,
    list_dead_letters,
    read_dead_letter,
    replay_dead_letters,
)
from eventbus._streams._entry import Work
from eventbus.errors import DecodeError

TOPIC = "orders"
GROUP = "billing"
CONSUMER = "billing-1"


def _as_redis_returns(fields: list[Any]) -> dict[bytes, bytes]:
    """``[name, value, ...]`` as Redis hands them back: every name and value bytes."""

    def raw(value: Any) -> bytes:
        if isinstance(value, bytes):
            return value
        return str(value).encode()

    return {raw(fields[i]): raw(fields[i + 1]) for i in range(0, len(fields), 2)}


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as exc:  # the traceback is part of the record
        return exc


# -- against Redis ------------------------------------------------------------------------


@pytest.fixture
async def client(redis_url: str) -> Any:
    async with aioredis.Redis.from_url(redis_url) as redis_client:
        yield redis_client


def _keys() -> TopicKeys:
    return topic_keys(f"t{uuid.uuid4().hex[:8]}", TOPIC)


def _writer(client: Any, keys: TopicKeys, counters: ConsumerCounters) -> DeadLetterWriter:
    return DeadLetterWriter(
        client=client,
        keys=keys,
        topic=TOPIC,
        group=GROUP,
        consumer=CONSUMER,
        codec=Codec(make_converter(), Limits()),
        maxlen=1000,
        counters=counters,
        sender=object(),
    )


async def _pending_entry(client: Any, keys: TopicKeys, fields: dict[str, Any]) -> Work:
    """XADD ``fields`` and deliver the entry to ``CONSUMER``: pending, as a member holds it."""
    await client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    await client.xadd(keys.stream, fields)
    reply = await client.xreadgroup(GROUP, CONSUMER, {keys.stream: ">"}, count=1)
    entries = reply[keys.stream.encode()] if isinstance(reply, dict) else reply[0][1]
    (entry_id, entry_fields) = entries[0]
    return Work(entry_id.decode(), entry_fields, 1)


async def test_written_record_reads_back_and_replays(client: Any) -> None:
    keys = _keys()
    codec = Codec(make_converter(), Limits())
    envelope, _ms = codec.encode(
        TOPIC, {"amount": 3}, event_id="ev-1", publisher="p", seq=1, headers={}
    )
    work = await _pending_entry(client, keys, {"id": "ev-1", "env": envelope})
    work.count = 4
    env = codec.decode_entry(TOPIC, work.id, work.fields)
    counters = ConsumerCounters()
    before = datetime.now(timezone.utc).replace(microsecond=0)

    await _writer(client, keys, counters).write(
        work, env, reason="handler_error", error=_raised(ValueError("card declined"))
    )

    assert counters.dead_lettered == 1
    assert await client.xpending(keys.stream, GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    (letter,) = await list_dead_letters(client, keys, count=10, after=None)
    assert isinstance(letter, DeadLetter)
    assert (letter.event_id, letter.topic, letter.original_id) == ("ev-1", TOPIC, work.id)
    assert (letter.group, letter.consumer, letter.attempts) == (GROUP, CONSUMER, 4)
    assert (letter.reason, letter.error_type) == ("handler_error", "ValueError")
    assert letter.error_message == "card declined"
    assert letter.traceback.endswith("ValueError: card declined\n")
    assert before <= letter.failed_at <= datetime.now(timezone.utc)
    assert letter.envelope == envelope
    assert letter.raw is None

    # The record's id and env are the stream entry's own fields: a replay is an event.
    assert await replay_dead_letters(client, keys, None) == 1
    (_, replayed) = (await client.xrange(keys.stream))[-1]
    assert replayed[FIELD_ID.encode()] == b"ev-1"
    assert replayed[FIELD_ENV.encode()] == envelope


async def test_undecodable_entry_is_kept_raw(client: Any) -> None:
    keys = _keys()
    work = await _pending_entry(client, keys, {"id": "ev-2", "env": b"\xff not json"})
    counters = ConsumerCounters()
    error = DecodeError("bad envelope", topic=TOPIC, reason="decode_error", event_id="ev-2")

    await _writer(client, keys, counters).write(work, None, reason="decode_error", error=error)

    (letter,) = await list_dead_letters(client, keys, count=10, after=None)
    assert (letter.event_id, letter.reason, letter.envelope) == ("ev-2", "decode_error", None)
    assert letter.error_type == "DecodeError"
    assert letter.raw is not None
    assert orjson.loads(letter.raw) == {
        "id": "ev-2",
        "env": "base64:/yBub3QganNvbg==",
    }


async def test_entry_no_longer_pending_is_not_written(client: Any) -> None:
    keys = _keys()
    work = await _pending_entry(client, keys, {"id": "ev-3", "env": b"{}"})
    await client.xack(keys.stream, GROUP, work.id)  # another member finished it
    counters = ConsumerCounters()

    await _writer(client, keys, counters).write(work, None, reason="decode_error", error=None)

    assert (counters.dead_lettered, counters.ack_lost_ownership) == (0, 1)
    assert await list_dead_letters(client, keys, count=10, after=None) == []


# -- the builder and the reader, without Redis --------------------------------------------


def _build(**overrides: Any) -> list[Any]:
    options: dict[str, Any] = {
        "topic": TOPIC,
        "original_id": "1-0",
        "group": GROUP,
        "consumer": CONSUMER,
        "attempts": 2,
        "reason": "handler_error",
        "failed_at_ms": 1_700_000_000_123,
        "entry": {b"id": b"ev-9", b"env": b"{}"},
        "envelope": b'{"v":1}',
        "event_id": "ev-9",
        "error": None,
    }
    options.update(overrides)
    return dead_letter_fields(**options)


def test_fields_read_back_field_by_field() -> None:
    letter = read_dead_letter(b"5-1", _as_redis_returns(_build()))
    assert letter == DeadLetter(
        id="5-1",
        event_id="ev-9",
        topic=TOPIC,
        original_id="1-0",
        group=GROUP,
        consumer=CONSUMER,
        attempts=2,
        reason="handler_error",
        error_type="",
        error_message="",
        traceback="",
        failed_at=datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=timezone.utc),
        envelope=b'{"v":1}',
        raw=None,
    )


def test_error_message_and_traceback_are_truncated() -> None:
    # Longer than both limits by itself, so the traceback's start is cut.
    error = _raised(RuntimeError("x" * (2 * MAX_TRACEBACK)))
    letter = read_dead_letter(b"5-1", _as_redis_returns(_build(error=error)))
    assert letter.error_type == "RuntimeError"
    assert len(letter.error_message) == MAX_ERROR_MESSAGE
    assert letter.error_message.endswith("x...")
    # The end of a traceback is kept: the innermost frames and the error line.
    assert len(letter.traceback) == MAX_TRACEBACK
    assert letter.traceback.startswith("...")
    assert letter.traceback.endswith("x" * 10 + "\n")


def test_undecodable_entry_raw_json_is_bounded() -> None:
    entry = {f"f{i:03d}".encode(): b"\x01" * 1000 for i in range(200)}  # escapes: 6 bytes each
    entry[b"id"] = b"i" * 300  # too long to copy as the record's id
    fields = _as_redis_returns(_build(entry=entry, envelope=None, event_id=""))
    assert FIELD_ENV.encode() not in fields
    letter = read_dead_letter(b"5-1", fields)
    assert letter.envelope is None
    assert letter.event_id == ""
    assert letter.raw == fields[FIELD_RAW.encode()]
    assert letter.raw is not None
    assert len(letter.raw) <= MAX_RAW
    shown = orjson.loads(letter.raw)
    assert shown["..."] == "truncated: 201 fields in all"
    assert shown["f000"] == "\x01" * 1000
    assert 1 < len(shown) < 201
