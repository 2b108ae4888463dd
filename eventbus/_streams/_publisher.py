"""Publishing to durable topics: coalesced XADD pipelines, safe retries, trimming.

Concurrent ``publish()`` calls share pipelines: the first caller to find the
writer idle sends everything queued (up to ``MAX_BATCH`` per pipeline) until the
queue is empty, while later callers only queue and wait. An idle bus therefore
sends a lone publish at once, as one command; only what is already waiting is
batched. No linger timer, and no background task unless the writing caller's
own events are answered while others still wait: it then returns, and a task
of the bus sends the rest (else, with Redis down, that caller would wait out
every later caller's ``publish_timeout`` too).

A pipeline that dies with the connection is *ambiguous*: Redis may have stored
some of its entries. Before anything is sent again the writer looks for the
batch's event ids in the stream (``XRANGE`` from shortly before the send, by
the server's clock), resolves those it finds, and re-sends only the rest, so a
lost reply does not turn into a duplicate. If the lookup cannot finish (Redis
still down at the deadline) the call raises; a re-send that raced a late
execution (a server frozen with our bytes in its socket buffer) can still
duplicate, with the same event id, which consumers can deduplicate on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

import anyio
import anyio.lowlevel
import redis.asyncio as aioredis
import redis.exceptions as rex

from .._codec import F_ID, F_ID_TEXT
from .._connection import CONNECTION_ERRORS, translate
from .._keys import TopicKeys
from .._scripts import TRIM_ACKED
from .._topic import Topic
from ..errors import RedisUnavailable

__all__ = ["StreamWriter", "Trimmer"]

logger = logging.getLogger("eventbus")

MAX_BATCH: Final = 1000
_SCAN_PAGE: Final = 1000
_SCAN_LIMIT: Final = 200_000
"""Most entries read back to resolve one ambiguous batch; past it, re-send."""
_TRIM_PROBE: Final = 10_000
_LAST_TRY: Final = 0.05
"""Seconds kept for the last lookup before a deadline (less left: the event fails)."""
_ID_FIELDS: Final = (F_ID, F_ID_TEXT)


class _Item:
    __slots__ = ("deadline", "event_id", "fields", "fut", "keys", "topic")

    def __init__(
        self,
        topic: Topic[Any],
        keys: TopicKeys,
        event_id: str,
        fields: list[bytes],
        fut: asyncio.Future[str],
        deadline: float,
    ) -> None:
        self.topic = topic
        self.keys = keys
        self.event_id = event_id
        self.fields = fields
        """The entry's fields, flat; the first pair is the event id's (``Codec.encode_entry``)."""
        self.fut = fut
        self.deadline = deadline
        """``time.monotonic()`` by which its caller gets an answer: queued time counts."""


def _xadd_args(item: _Item) -> tuple[Any, ...]:
    topic = item.topic
    if topic.trim == "hard" and topic.maxlen is not None:
        return ("XADD", item.keys.stream, "MAXLEN", "~", topic.maxlen, "*", *item.fields)
    return ("XADD", item.keys.stream, "*", *item.fields)


class StreamWriter:
    """Sends XADDs for durable topics, batching concurrent callers into pipelines.

    :param client: a client WITHOUT redis-py retries (a blind retry of ``XADD *``
        after a lost reply stores the event twice; this class retries itself) and
        without a socket timeout (this class bounds each pipeline as a whole).
    :param timeout: seconds a publish may spend retrying before it raises.
    :param start: schedules a task in the bus's task group (see :meth:`_write_queued`).
    :param address: where Redis is, for error messages.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        timeout: float,
        trimmer: Trimmer,
        start: Callable[[Callable[[], Awaitable[None]]], None],
        address: str = "?",
    ) -> None:
        self._client: Any = client  # redis-py's stubs type replies as unions
        self._timeout = timeout
        self._address = address
        self._trimmer = trimmer
        self._start = start
        self._queue: list[_Item] = []
        self._busy = False
        self._gather = False
        """Whether the last pipeline carried more than one caller's events: publishers
        are running concurrently, so yield one loop turn to let them join the next."""

    async def add(
        self, topic: Topic[Any], keys: TopicKeys, entries: Iterable[tuple[str, list[bytes]]]
    ) -> list[str | BaseException]:
        """Store ``(event id, fields)`` entries in ``topic``'s stream, in order.

        Returns, per entry, its stream id, or the error that kept it out of the
        stream: the entries of one call are not all or nothing (Redis accepts or
        refuses each ``XADD`` of a pipeline on its own: one that fills the memory
        up leaves those before it stored and refuses those after).
        Cancellation: once called, the entries are sent even if the caller is
        cancelled (their outcome is then unknown to it).

        Errors, as values: ``RedisUnavailable`` (Redis could not be reached within the
        timeout; the entry was not stored, or, if Redis executed a command whose
        reply was lost and could not be checked, see the module doc); ``BackendOOM``
        and other ``BackendError`` (Redis refused this entry's command).
        """
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._timeout
        items = [
            _Item(topic, keys, eid, fields, loop.create_future(), deadline)
            for eid, fields in entries
        ]
        self._queue.extend(items)
        if not self._busy and items:
            await self._write_queued(items[-1])
        return list(await asyncio.gather(*(i.fut for i in items), return_exceptions=True))

    async def add_one(
        self, topic: Topic[Any], keys: TopicKeys, event_id: str, fields: list[bytes]
    ) -> str:
        """:meth:`add` for one entry (the common ``publish()`` path, without lists)."""
        fut = asyncio.get_running_loop().create_future()
        item = _Item(topic, keys, event_id, fields, fut, time.monotonic() + self._timeout)
        self._queue.append(item)
        if not self._busy:
            await self._write_queued(item)
        return await item.fut

    async def _write_queued(self, mine: _Item | None) -> None:
        """Send what is queued, and what gets queued meanwhile, until the queue is empty.

        ``mine``: the writing caller's last event. Once it is answered, the caller
        stops writing for the others, who then get a task of their own
        (:meth:`_write_rest`): a publish waits at most its own ``publish_timeout``
        plus the batch in flight when it was called (also bounded by its deadline),
        never the retries of every batch queued after it."""
        self._busy = True
        handed_over = False
        try:
            # Every await below is shielded: this task writes for every queued
            # caller now, so its own cancellation must not abort their batch.
            if self._gather:
                # Concurrent publishers: one turn of the event loop first, so
                # those ready to run right now (woken by the last pipeline's
                # replies) join this batch. Microseconds, not a linger; a lone
                # publisher (idle bus) skips it and is sent at once.
                await anyio.lowlevel.cancel_shielded_checkpoint()
            while self._queue:
                if mine is not None and mine.fut.done():
                    self._start(self._write_rest)  # keeps _busy: the task writes on
                    handed_over = True
                    return
                batch = self._queue[:MAX_BATCH]
                del self._queue[:MAX_BATCH]
                self._gather = len(batch) > 1
                await self._send(batch)
        finally:
            if not handed_over:
                self._busy = False

    async def _write_rest(self) -> None:
        """What a caller left queued when its own events were answered (a bus task)."""
        await self._write_queued(None)

    async def _send(self, batch: list[_Item]) -> None:
        attempt = 0
        remaining = batch
        while remaining:
            sent_at = time.monotonic()
            # Each event's deadline runs from its publish call, time spent queued
            # behind another batch included: the caller waits publish_timeout, not
            # that batch's timeout plus its own.
            deadline = min(item.deadline for item in remaining)
            try:
                # One scope per pipeline: shielded from the caller's cancellation,
                # with its own deadline (not redis-py's socket timeout: that one
                # re-arms a timer for every reply read, which halved throughput).
                limit = anyio.current_time() + max(deadline - sent_at, 0.001)
                with anyio.CancelScope(shield=True, deadline=limit) as scope:
                    results = await self._pipeline(remaining)
                if scope.cancelled_caught:
                    raise TimeoutError(f"no reply to XADD within {self._timeout:g}s")
            except CONNECTION_ERRORS as exc:
                remaining = await self._recover(remaining, exc, sent_at, attempt)
                attempt += 1
                continue
            except Exception as exc:  # not a connection problem: fail these, keep writing
                self._fail(remaining, exc)
                return
            for item, result in zip(remaining, results, strict=True):
                if item.fut.done():
                    continue
                if isinstance(result, BaseException):
                    self._fail([item], result)
                else:
                    item.fut.set_result(
                        result.decode() if isinstance(result, bytes) else str(result)
                    )
            self._trimmer.note(remaining)
            remaining = []

    async def _pipeline(self, items: list[_Item]) -> list[Any]:
        """Send the XADDs as one write and read their replies (errors as values).

        A pipeline without redis-py's ``Pipeline`` object: that one also runs
        per-command bookkeeping this writer does not need (about 1.5 us an event,
        a fifth of the publish cost). Any failure leaves the connection's reply
        stream in an unknown state, so the connection is dropped, not reused.
        """
        pool = self._client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_commands([_xadd_args(i) for i in items]))
            results: list[Any] = []
            for _ in items:
                try:
                    results.append(await conn.read_response())
                except rex.ResponseError as exc:  # this command's error; the next reply follows
                    results.append(exc)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await conn.disconnect(nowait=True)
                await pool.release(conn)
            raise
        await pool.release(conn)
        return results

    async def _recover(
        self, items: list[_Item], error: BaseException, sent_at: float, attempt: int
    ) -> list[_Item]:
        """After an ambiguous failure: resolve what Redis stored, return what it did not.

        Tries until the earliest deadline of ``items``, the last try just before
        it; an event with no time left for a try fails, the others keep trying."""
        while True:
            now = time.monotonic()
            expired = [i for i in items if i.deadline - now < _LAST_TRY]
            if expired:
                self._fail(expired, error)
                items = [i for i in items if i.deadline - now >= _LAST_TRY]
                if not items:
                    return []
            deadline = min(i.deadline for i in items)
            delay = min(0.05 * 2**attempt, 1.0) * (1 + random.random() * 0.2)
            delay = min(delay, deadline - now - _LAST_TRY)
            attempt += 1
            try:
                with anyio.CancelScope(shield=True):  # see _write_queued
                    await anyio.sleep(delay)
                    with anyio.fail_after(max(deadline - time.monotonic(), 0.001)):
                        return await self._unstored(items, sent_at)
            except CONNECTION_ERRORS as exc:
                error = exc

    async def _unstored(self, items: list[_Item], sent_at: float) -> list[_Item]:
        seconds, micros = await self._client.time()
        server_ms = int(seconds) * 1000 + int(micros) // 1000
        since_ms = server_ms - int((time.monotonic() - sent_at) * 1000) - 2000
        # Each entry is found by its event id field (name and value as written).
        by_stream: dict[str, dict[tuple[bytes, bytes], _Item]] = {}
        for item in items:
            by_stream.setdefault(item.keys.stream, {})[(item.fields[0], item.fields[1])] = item
        for stream, wanted in by_stream.items():
            start: str = f"{max(since_ms, 0)}-0"
            scanned = 0
            while wanted and scanned < _SCAN_LIMIT:
                page = await self._client.xrange(stream, min=start, count=_SCAN_PAGE)
                for entry_id, fields in page:
                    found = None
                    for name in _ID_FIELDS:
                        value = fields.get(name)
                        if value is not None:
                            found = wanted.pop((name, value), None)
                            break
                    if found is not None and not found.fut.done():
                        found.fut.set_result(entry_id.decode())
                if len(page) < _SCAN_PAGE:
                    break
                scanned += len(page)
                start = "(" + page[-1][0].decode()
        resolved = [i for i in items if i.fut.done()]
        if resolved:
            logger.info(
                "publish retry: %d of %d events were stored before the connection dropped",
                len(resolved),
                len(items),
            )
            self._trimmer.note(resolved)
        return [i for i in items if not i.fut.done()]

    def _fail(self, items: list[_Item], error: BaseException) -> None:
        for item in items:
            if item.fut.done():
                continue
            mapped = translate(error, topic=item.topic.name, command="XADD")
            if type(mapped) is RedisUnavailable:
                # Retried until the deadline: say where, and for how long.
                mapped = RedisUnavailable(
                    f"Redis at {self._address} did not store the event within"
                    f" {self._timeout:g}s (publish_timeout): {error}",
                    topic=item.topic.name,
                )
            elif mapped is error and not isinstance(error, rex.RedisError):
                mapped = RedisUnavailable(f"publish failed: {error}", topic=item.topic.name)
            if mapped is not error:
                mapped.__cause__ = error
            item.fut.set_exception(mapped)


class Trimmer:
    """Trims durable topics published by this bus, in the background.

    ``trim="acked"`` topics are trimmed by a script that never removes what a
    consumer group still needs; ``trim="hard"`` topics trim inline on XADD
    (``MAXLEN ~``) and here only by age. A pass runs after a topic received a
    tenth of its ``maxlen`` (at most 1,000) new entries, or every second when it
    has a retention age. Its task starts with the first pass that is due
    (``start`` schedules it in the bus's task group).
    """

    def __init__(
        self, client: aioredis.Redis, start: Callable[[Callable[[], Awaitable[None]]], None]
    ) -> None:
        self._client: Any = client
        self._start = start
        self._started = False
        self._script = client.register_script(TRIM_ACKED)
        self._counts: dict[str, int] = {}
        self._topics: dict[str, tuple[Topic[Any], TopicKeys]] = {}
        self._due: set[str] = set()
        self._wake = anyio.Event()
        self._last: dict[str, float] = {}
        self.trimmed = 0
        self.held_back = 0

    def note(self, items: Iterable[_Item]) -> None:
        """Count stored entries; a topic that got enough new ones becomes due."""
        for item in items:
            self.note_topic(item.topic, item.keys, 1)

    def note_topic(self, topic: Topic[Any], keys: TopicKeys, added: int) -> None:
        if topic.maxlen is None and topic.retention is None:
            return
        if topic.trim == "hard" and topic.retention is None:
            return  # trimmed inline by XADD MAXLEN ~
        name = topic.name
        count = self._counts.get(name, 0) + added
        self._counts[name] = count
        self._topics[name] = (topic, keys)
        every = min(max(topic.maxlen // 10, 1), 1000) if topic.maxlen else 1000
        now = time.monotonic()
        if count >= every or (
            topic.retention is not None and now - self._last.get(name, 0.0) >= 1.0
        ):
            self._due.add(name)
            self._wake.set()
            if not self._started:
                self._started = True
                self._start(self.run)

    async def run(self) -> None:
        """Trim what is due until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            due, self._due = self._due, set()
            for name in due:
                self._counts[name] = 0
                self._last[name] = time.monotonic()
                topic, keys = self._topics[name]
                try:
                    await self.trim(topic, keys)
                except Exception as exc:  # trimming is housekeeping: log, retry next time
                    logger.warning("trimming topic %r failed: %s", name, exc)

    async def trim(self, topic: Topic[Any], keys: TopicKeys) -> int:
        """One trim pass of ``topic``; returns the entries removed."""
        minid = ""
        if topic.retention is not None:
            seconds, micros = await self._client.time()
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            minid = f"{max(now_ms - int(topic.retention * 1000), 0)}-0"
        if topic.trim == "hard":
            if not minid:
                return 0
            removed = int(await self._client.xtrim(keys.stream, minid=minid, approximate=True))
            self.trimmed += removed
            return removed
        maxlen = "" if topic.maxlen is None else str(topic.maxlen)
        removed, held = await self._script(keys=[keys.stream], args=[maxlen, minid, _TRIM_PROBE])
        self.trimmed += int(removed)
        if held:
            self.held_back += 1
            logger.debug("topic %r: trim held back by a consumer group that lags", topic.name)
        return int(removed)
