"""Live subscribers of durable topics: ``XREAD`` fan-out, replay and seek.

One :class:`StreamTail` reads any number of streams with one ``XREAD BLOCK``
on its own connection and offers every entry, decoded once, to each local
subscriber's bounded buffer (the same :class:`~eventbus._hub.Receiver` as live
topics). The bus keeps one shared tail for subscribers starting at
``"latest"``; a subscription that replays (``from_="earliest"``, a time, an
id) gets a tail of its own, so catching up never holds back the others.

Unlike pub/sub, nothing is lost while the connection is down: the tail
resumes from the last id it read. A ``block`` subscriber therefore slows only
its own tail, never loses events, and Redis never disconnects it.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timezone
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from .._codec import F_ID_TEXT, Codec, id_field
from .._connection import CONNECTION_ERRORS
from .._hub import Hub, Receiver
from .._keys import TopicKeys
from ..errors import ConfigurationError, DecodeError
from ._ids import id_key, previous_id, read_batches

__all__ = ["StreamTail", "resolve_end", "resolve_position"]

logger = logging.getLogger("eventbus")

_STREAM_ID: Final = re.compile(r"\d+-\d+")
_SEEK_PAGE: Final = 1000


async def resolve_position(client: Any, topic: str, keys: TopicKeys, from_: object) -> str:
    """The id to ``XREAD`` after, for a subscription starting at ``from_``.

    ``"latest"``: after the newest entry now; ``"earliest"``: the whole stream;
    a ``datetime``: the first entry at or after it (stream ids are milliseconds of
    the Redis clock); a stream id (``"1700000000000-0"``): that entry and what
    follows; an event id: the entry carrying it and what follows.

    :raises eventbus.errors.ConfigurationError: an unknown position, or an event id
        not in the stream.
    """
    if from_ == "latest":
        last = await client.xrevrange(keys.stream, count=1)
        return last[0][0].decode() if last else "0-0"
    if from_ == "earliest":
        return "0-0"
    if isinstance(from_, datetime):
        moment = from_ if from_.tzinfo else from_.replace(tzinfo=timezone.utc)
        return previous_id(f"{max(int(moment.timestamp() * 1000), 0)}-0")
    if isinstance(from_, str) and _STREAM_ID.fullmatch(from_):
        return previous_id(from_)
    if isinstance(from_, str) and from_:
        return previous_id(await _entry_of_event(client, topic, keys, from_))
    raise ConfigurationError(
        f"from_ must be 'latest', 'earliest', a datetime, a stream id or an event id, got {from_!r}"
    )


async def _entry_of_event(client: Any, topic: str, keys: TopicKeys, event_id: str) -> str:
    """The stream id of the entry carrying event ``event_id`` (a scan of the stream):
    its ``id`` field (version 1, bare entries, ids that are not hex) or its ``i``."""
    text = event_id.encode()
    name, value = id_field(event_id)
    start = "-"
    while True:
        page = await client.xrange(keys.stream, min=start, count=_SEEK_PAGE)
        for entry_id, fields in page:
            if fields.get(name) == value or fields.get(F_ID_TEXT) == text:
                return entry_id.decode()  # type: ignore[no-any-return]
        if len(page) < _SEEK_PAGE:
            break
        start = "(" + page[-1][0].decode()
    raise ConfigurationError(f"topic {topic!r}: no event with id {event_id!r} in the stream")


async def resolve_end(client: Any, topic: str, keys: TopicKeys, until: object) -> str:
    """The last id a subscription ending at ``until`` reads (included).

    ``"latest"``: the newest entry now. A ``datetime``: the last entry at or before
    it. A stream id: that entry. An event id: the entry carrying it. Never past
    the newest entry now, so the window is history and its iteration ends even
    when nothing more is published; ``"0-0"`` for an empty stream.

    :raises eventbus.errors.ConfigurationError: an unknown bound, or an event id not
        in the stream.
    """
    last = await client.xrevrange(keys.stream, count=1)
    newest = last[0][0].decode() if last else "0-0"
    if until == "latest":
        return newest
    if isinstance(until, datetime):
        moment = until if until.tzinfo else until.replace(tzinfo=timezone.utc)
        bound = f"{max(int(moment.timestamp() * 1000), 0)}-18446744073709551615"
    elif isinstance(until, str) and _STREAM_ID.fullmatch(until):
        bound = until
    elif isinstance(until, str) and until:
        bound = await _entry_of_event(client, topic, keys, until)
    else:
        raise ConfigurationError(
            f"until must be 'latest', a datetime, a stream id or an event id, got {until!r}"
        )
    return min(bound, newest, key=id_key)


class _Cursor:
    __slots__ = ("end", "keys", "last_id", "receivers", "topic")

    def __init__(self, topic: str, keys: TopicKeys, last_id: str, end: str | None) -> None:
        self.topic = topic
        self.keys = keys
        self.last_id = last_id
        self.end = None if end is None else id_key(end)
        """The last id to read (a subscription window that ends), else ``None``."""
        self.receivers: tuple[Receiver, ...] = ()


class StreamTail:
    """Reads streams with XREAD and fans entries out to local receivers."""

    def __init__(
        self, client: aioredis.Redis, codec: Codec, hub: Hub, *, block: float = 5.0
    ) -> None:
        self._client: Any = client  # redis-py's stubs type replies as unions
        self._codec = codec
        self._hub = hub
        self._block_ms = max(int(block * 1000), 1)
        self._cursors: dict[str, _Cursor] = {}
        self._changed = anyio.Event()
        self._read_scope: anyio.CancelScope | None = None
        self.reads = 0

    async def aclose(self) -> None:
        """Close this tail's connection (after :meth:`run` ended)."""
        await self._client.aclose()

    def add(
        self, topic: str, keys: TopicKeys, receiver: Receiver, last_id: str, end: str | None = None
    ) -> None:
        """Offer ``topic``'s entries after ``last_id`` to ``receiver``.

        A receiver joining a stream this tail already reads starts at the tail's
        position, which may be slightly behind ``last_id``: it can see a few events
        from just before it subscribed, never miss one after.

        ``end`` (a tail of its own only): read up to that id, included; once every
        stream of ``receiver`` reached its end, the receiver is closed, and its
        iteration ends after what it buffered.
        """
        cursor = self._cursors.get(keys.stream)
        if cursor is None:
            cursor = self._cursors[keys.stream] = _Cursor(topic, keys, last_id, end)
        cursor.receivers = (*cursor.receivers, receiver)
        if cursor.end is not None and id_key(last_id) >= cursor.end:
            self._finish(keys.stream)  # an empty window
        self._wake()

    def _finish(self, key: str) -> None:
        """A cursor reached its end: drop it, and close the receivers it was the last
        unfinished stream of."""
        cursor = self._cursors.pop(key)
        for receiver in cursor.receivers:
            if not any(receiver in c.receivers for c in self._cursors.values()):
                receiver.close()

    def remove(self, keys: TopicKeys, receiver: Receiver) -> None:
        cursor = self._cursors.get(keys.stream)
        if cursor is None:
            return
        cursor.receivers = tuple(r for r in cursor.receivers if r is not receiver)
        if not cursor.receivers:
            del self._cursors[keys.stream]
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        if self._read_scope is not None:
            self._read_scope.cancel()  # re-issue XREAD with the new set of streams

    async def run(self) -> None:
        """Read until cancelled; reconnects by itself, resuming where it stopped."""
        backoff = 0.05
        while True:
            if not self._cursors:
                self._changed = anyio.Event()
                await self._changed.wait()
                continue
            self._changed = anyio.Event()
            streams = {key: c.last_id for key, c in self._cursors.items()}
            response: Any = None
            with anyio.CancelScope() as scope:
                self._read_scope = scope
                try:
                    self.reads += 1
                    response = await self._client.xread(
                        streams,
                        count=1000,
                        block=self._block_ms,
                    )
                except CONNECTION_ERRORS as exc:
                    logger.warning("stream reader: %s; reconnecting", exc)
                    await anyio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                finally:
                    self._read_scope = None
            backoff = 0.05
            if response:
                await self._dispatch(response)
            elif any(c.end is not None for c in self._cursors.values()):
                await self._finish_drained()

    async def _finish_drained(self) -> None:
        """After a read that found nothing: a window whose end entry was deleted
        before it was read ends once nothing is left to read before its end."""
        for key, cursor in list(self._cursors.items()):
            if cursor.end is None:
                continue
            try:
                last = await self._client.xrevrange(key, count=1)
            except CONNECTION_ERRORS:
                return  # the next read reconnects
            newest = id_key(last[0][0].decode()) if last else (0, 0)
            if newest <= id_key(cursor.last_id) and key in self._cursors:
                self._finish(key)

    async def _dispatch(self, response: Any) -> None:
        for raw_key, entries in read_batches(response):
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            cursor = self._cursors.get(key)
            if cursor is None:
                continue
            end = cursor.end
            for raw_id, fields in entries:
                entry_id = raw_id.decode()
                if end is not None and id_key(entry_id) > end:
                    self._finish(key)
                    break
                cursor.last_id = entry_id
                receivers = cursor.receivers
                try:
                    env = self._codec.decode_entry(cursor.topic, entry_id, fields or {})
                except DecodeError as exc:
                    for receiver in receivers:
                        receiver.errors += 1
                    logger.warning("topic %r: skipping entry %s: %s", cursor.topic, entry_id, exc)
                else:
                    blocked = self._hub.deliver(receivers, env)
                    if blocked:
                        await self._hub.redeliver(blocked, env)
                if end is not None and id_key(entry_id) >= end:
                    self._finish(key)
                    break
