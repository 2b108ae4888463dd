"""The dead-letter record of a durable topic: written and read here, in one format.

A member that gives up on an entry (its handler failed on every attempt, it was
delivered more than ``max_attempts`` times without a verdict, or it cannot be
decoded) moves it to the topic's dead-letter stream with the ``DEAD_LETTER``
script: the record is written and the entry acked atomically, and only while the
entry is still pending (so two members never write it twice).

A record's fields (``docs/wire-format.md``), each named once below (``FIELD_*``)
and used by both :class:`DeadLetterWriter` and :func:`read_dead_letter`:

* ``topic``, ``original_id``, ``group``, ``consumer``, ``attempts``, ``reason``,
  ``failed_at`` (milliseconds since the epoch, the consumer's clock): always;
* ``id`` and ``env``: the event id and its envelope, when the entry could be
  decoded. They are the stream entry's own field names, so a replay
  (``REPLAY_DEAD_LETTERS``) writes them back as an ordinary event;
* ``raw``: instead of ``env`` for undecodable input, its fields as JSON (at most
  64 KiB; bytes that are not UTF-8 as ``base64:...``), with ``id`` if it had one;
* ``error_type``, ``error_message`` (at most 1 KiB), ``traceback`` (at most 4 KiB,
  its end kept): when an exception was the cause.
"""

from __future__ import annotations

import base64
import logging
import time
import traceback
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, Final

import attrs
import orjson

from .. import signals
from .._codec import F_ID, Codec, id_of
from .._envelope import Envelope
from .._keys import TopicKeys
from .._scripts import DEAD_LETTER, REPLAY_DEAD_LETTERS
from .._stats import ConsumerCounters
from ..errors import DecodeError
from ..signals import emit
from ._entry import Work

__all__ = [
    "FIELD_ATTEMPTS",
    "FIELD_CONSUMER",
    "FIELD_ENV",
    "FIELD_ERROR_MESSAGE",
    "FIELD_ERROR_TYPE",
    "FIELD_FAILED_AT",
    "FIELD_GROUP",
    "FIELD_ID",
    "FIELD_ORIGINAL_ID",
    "FIELD_RAW",
    "FIELD_REASON",
    "FIELD_TOPIC",
    "FIELD_TRACEBACK",
    "MAX_ERROR_MESSAGE",
    "MAX_RAW",
    "MAX_TRACEBACK",
    "DeadLetter",
    "DeadLetterWriter",
    "dead_letter_fields",
    "list_dead_letters",
    "purge_dead_letters",
    "read_dead_letter",
    "replay_dead_letters",
]

logger = logging.getLogger("eventbus")

FIELD_TOPIC: Final = "topic"
FIELD_ORIGINAL_ID: Final = "original_id"
FIELD_GROUP: Final = "group"
FIELD_CONSUMER: Final = "consumer"
FIELD_ATTEMPTS: Final = "attempts"
FIELD_REASON: Final = "reason"
FIELD_FAILED_AT: Final = "failed_at"
FIELD_ID: Final = "id"
FIELD_ENV: Final = "env"
FIELD_RAW: Final = "raw"
FIELD_ERROR_TYPE: Final = "error_type"
FIELD_ERROR_MESSAGE: Final = "error_message"
FIELD_TRACEBACK: Final = "traceback"

MAX_ERROR_MESSAGE: Final = 1024
MAX_TRACEBACK: Final = 4096
MAX_RAW: Final = 64 * 1024
_MAX_EVENT_ID: Final = 256
"""An undecodable entry's ``id`` longer than this is not copied (it is in ``raw``)."""
_REPLAY_BATCH: Final = 100

# The event entry's own fields, read from the entry being dead-lettered.
_ENTRY_ID: Final = FIELD_ID.encode()
_ENTRY_ENV: Final = FIELD_ENV.encode()


@attrs.frozen
class DeadLetter:
    """One entry of a topic's dead-letter stream.

    .. versionadded:: 0.2
    """

    id: str
    """The dead-letter entry id (what :meth:`EventBus.replay_dead_letters` takes)."""
    event_id: str
    """The event's id (empty if the entry carried none)."""
    topic: str
    """The topic it was published to."""
    original_id: str
    """Its entry id in the topic's stream."""
    group: str
    """The consumer group that gave up on it."""
    consumer: str
    """The group member that dead-lettered it."""
    attempts: int
    """Deliveries it had (Redis's delivery count)."""
    reason: str
    """``handler_error`` (raised on every attempt), ``max_deliveries`` (delivered
    more than ``max_attempts`` times without a verdict: its handler kept crashing
    or hanging the process), or a decode reason: ``decode_error``,
    ``validation_error``, ``unsupported_version``, ``too_large``, ``too_many_fields``."""
    error_type: str
    """The exception's class name (empty if none)."""
    error_message: str
    """The exception's message, truncated to 1 KiB."""
    traceback: str
    """The formatted traceback, truncated to 4 KiB."""
    failed_at: datetime
    """When it was dead-lettered (consumer clock, UTC)."""
    envelope: bytes | None
    """The original event envelope (replayable), or ``None`` for undecodable input."""
    raw: bytes | None
    """Undecodable input: its fields as JSON (bounded), else ``None``."""


def _text(fields: Mapping[bytes, bytes], name: str) -> str:
    value = fields.get(name.encode())
    return value.decode("utf-8", "replace") if value is not None else ""


def read_dead_letter(entry_id: bytes, fields: Mapping[bytes, bytes]) -> DeadLetter:
    """The record of dead-letter entry ``entry_id`` (missing fields read as empty)."""
    failed_ms = int(fields.get(FIELD_FAILED_AT.encode(), b"0") or 0)
    return DeadLetter(
        id=entry_id.decode(),
        event_id=_text(fields, FIELD_ID),
        topic=_text(fields, FIELD_TOPIC),
        original_id=_text(fields, FIELD_ORIGINAL_ID),
        group=_text(fields, FIELD_GROUP),
        consumer=_text(fields, FIELD_CONSUMER),
        attempts=int(fields.get(FIELD_ATTEMPTS.encode(), b"0") or 0),
        reason=_text(fields, FIELD_REASON),
        error_type=_text(fields, FIELD_ERROR_TYPE),
        error_message=_text(fields, FIELD_ERROR_MESSAGE),
        traceback=_text(fields, FIELD_TRACEBACK),
        failed_at=datetime.fromtimestamp(failed_ms / 1000, tz=timezone.utc),
        envelope=fields.get(FIELD_ENV.encode()),
        raw=fields.get(FIELD_RAW.encode()),
    )


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _truncate_start(text: str, limit: int) -> str:
    """Keep the end (of a traceback: the innermost frames and the error line)."""
    return text if len(text) <= limit else "..." + text[len(text) - limit + 3 :]


def _raw_fields(fields: Mapping[bytes, bytes]) -> bytes:
    """The fields of an undecodable entry as JSON, kept for inspection.

    At most ``MAX_RAW`` bytes of JSON: the size counted is each item's encoded
    size (quotes and escapes included), so control characters cannot inflate it.
    """
    shown: dict[str, str] = {}
    size = 2
    for key, value in fields.items():
        name = key.decode("utf-8", "replace")
        try:
            text = value.decode("utf-8")
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(value).decode("ascii")
        item = len(orjson.dumps(name)) + len(orjson.dumps(text)) + 2
        if size + item > MAX_RAW - 64:
            shown["..."] = f"truncated: {len(fields)} fields in all"
            break
        size += item
        shown[name] = text
    return orjson.dumps(shown)


def dead_letter_fields(
    *,
    topic: str,
    original_id: str,
    group: str,
    consumer: str,
    attempts: int,
    reason: str,
    failed_at_ms: int,
    entry: Mapping[bytes, bytes],
    envelope: bytes | None,
    event_id: str,
    error: BaseException | None,
) -> list[Any]:
    """The ``[name, value, ...]`` fields of a dead-letter record (see the module doc).

    ``entry``: the dead-lettered entry's fields; ``envelope``: its replayable
    envelope, or ``None`` if it could not be decoded (then ``raw`` keeps
    ``entry``); ``event_id``: the id stored beside ``envelope``.
    """
    fields: list[Any] = [
        FIELD_TOPIC, topic,
        FIELD_ORIGINAL_ID, original_id,
        FIELD_GROUP, group,
        FIELD_CONSUMER, consumer,
        FIELD_ATTEMPTS, attempts,
        FIELD_REASON, reason,
        FIELD_FAILED_AT, failed_at_ms,
    ]  # fmt: skip
    if envelope is not None:
        fields += [FIELD_ID, event_id, FIELD_ENV, envelope]
    else:
        raw_id = entry.get(_ENTRY_ID)
        if raw_id is None and F_ID in entry:  # a version 2 entry: its id's 16 bytes
            try:
                raw_id = id_of(entry[F_ID]).encode()
            except ValueError:
                raw_id = None
        if raw_id is not None and len(raw_id) <= _MAX_EVENT_ID:
            fields += [FIELD_ID, raw_id]
        fields += [FIELD_RAW, _raw_fields(entry)]
    if error is not None:
        fields += [
            FIELD_ERROR_TYPE,
            type(error).__qualname__,
            FIELD_ERROR_MESSAGE,
            _truncate(str(error), MAX_ERROR_MESSAGE),
            FIELD_TRACEBACK,
            _truncate_start(
                "".join(traceback.format_exception(type(error), error, error.__traceback__)),
                MAX_TRACEBACK,
            ),
        ]
    return fields


class DeadLetterWriter:
    """Moves entries of one group member to the topic's dead-letter stream.

    Counts what it did in the member's ``counters`` (``dead_lettered``, or
    ``ack_lost_ownership`` when the entry was no longer pending), before the log
    line and the ``dead_lettered`` signal, so a receiver sees the counters current.
    The member forgets the entry after :meth:`write` returns, whatever happened.
    """

    def __init__(
        self,
        *,
        client: Any,
        keys: TopicKeys,
        topic: str,
        group: str,
        consumer: str,
        codec: Codec,
        maxlen: int,
        counters: ConsumerCounters,
        sender: object,
    ) -> None:
        self._script = client.register_script(DEAD_LETTER)
        self._keys = keys
        self._topic = topic
        self._group = group
        self._consumer = consumer
        self._codec = codec
        self._maxlen = maxlen
        self._counters = counters
        self._sender = sender

    async def write(
        self, work: Work, env: Envelope | None, *, reason: str, error: BaseException | None
    ) -> None:
        """Dead-letter ``work`` (``env``: its decoded envelope, ``None`` if undecodable).

        A failed write is logged and leaves the entry pending: it is delivered
        again (and counted) until a write succeeds.
        """
        entry = work.field_map()
        original = entry.get(_ENTRY_ENV)
        if env is not None and original is None:
            # A version 2 entry, or a bare payload written by another client: store
            # it as a version 1 envelope (one field, replayed as it is), with what
            # the entry said: id, publisher, seq, headers, time, chain ids.
            try:
                original, _ms = self._codec.encode(
                    self._topic,
                    env.data,
                    event_id=env.id or work.id,
                    publisher=env.publisher,
                    seq=env.seq,
                    headers=env.headers,
                    cause=env.cause,
                    corr=env.corr,
                    published_ms=env.published_ms,
                )
            except Exception:
                original = None
        fields = dead_letter_fields(
            topic=self._topic,
            original_id=work.id,
            group=self._group,
            consumer=self._consumer,
            attempts=work.count,
            reason=reason,
            failed_at_ms=int(time.time() * 1000),
            entry=entry,
            envelope=original if env is not None else None,
            event_id=(env.id or work.id) if env is not None else "",
            error=error,
        )
        keys = self._keys
        try:
            dlq_id = await self._script(
                keys=[keys.stream, keys.dlq, keys.dlq_count],
                args=[self._group, work.id, self._maxlen, *fields],
            )
        except Exception as exc:
            logger.error(
                "group %r: could not dead-letter %s (%s); it stays pending and is retried",
                self._group,
                work.id,
                exc,
            )
            return
        if dlq_id is None:
            self._counters.ack_lost_ownership += 1
            return
        self._counters.dead_lettered += 1
        if env is not None:
            logged_id = env.id
        elif isinstance(error, DecodeError) and error.event_id:
            logged_id = error.event_id
        else:
            logged_id = entry.get(_ENTRY_ID, b"")[:_MAX_EVENT_ID].decode("utf-8", "replace")
        logger.warning(
            "topic %r group %r: event %s (entry %s) dead-lettered after %d deliveries: %s%s",
            self._topic,
            self._group,
            logged_id or "?",
            work.id,
            work.count,
            reason,
            f" ({type(error).__name__}: {error})" if error is not None else "",
        )
        if signals.dead_lettered.receivers:
            emit(
                signals.dead_lettered,
                self._sender,
                topic=self._topic,
                event_id=logged_id,
                group=self._group,
                reason=reason,
                error=error,
                dead_letter_id=dlq_id.decode() if isinstance(dlq_id, bytes) else dlq_id,
            )


async def list_dead_letters(
    client: Any, keys: TopicKeys, *, count: int, after: str | None
) -> list[DeadLetter]:
    start = "-" if after is None else "(" + after
    entries = await client.xrange(keys.dlq, min=start, count=count)
    return [read_dead_letter(entry_id, fields) for entry_id, fields in entries]


async def _all_ids(client: Any, keys: TopicKeys) -> list[str]:
    ids: list[str] = []
    start = "-"
    while True:
        page = await client.xrange(keys.dlq, min=start, count=1000)
        ids += [entry_id.decode() for entry_id, _ in page]
        if len(page) < 1000:
            return ids
        start = "(" + page[-1][0].decode()


async def replay_dead_letters(client: Any, keys: TopicKeys, ids: Sequence[str] | None) -> int:
    script = client.register_script(REPLAY_DEAD_LETTERS)
    todo = list(ids) if ids is not None else await _all_ids(client, keys)
    replayed = 0
    for i in range(0, len(todo), _REPLAY_BATCH):
        done, _skipped = await script(
            keys=[keys.dlq, keys.stream], args=todo[i : i + _REPLAY_BATCH]
        )
        replayed += int(done)
    return replayed


async def purge_dead_letters(client: Any, keys: TopicKeys, ids: Sequence[str] | None) -> int:
    if ids is None:
        async with client.pipeline(transaction=True) as pipe:
            pipe.xlen(keys.dlq)
            pipe.delete(keys.dlq, keys.dlq_count)
            length, _deleted = await pipe.execute()
        return int(length)
    if not ids:
        return 0
    return int(await client.xdel(keys.dlq, *ids))
