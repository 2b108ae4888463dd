"""The envelope: one event with its metadata, decoded once and shared by all subscribers;
and the two public records about one event: its :class:`Delivery` and its :class:`Receipt`."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final, final

import attrs

__all__ = ["CONTENT_BYTES", "CONTENT_JSON", "WIRE_VERSION", "Delivery", "Envelope", "Receipt"]

WIRE_VERSION: Final = 1
CONTENT_JSON: Final = "application/json"
CONTENT_BYTES: Final = "application/octet-stream"


@final
@attrs.frozen(slots=True)
class Delivery:
    """What a subscriber knows about the event it is handed.

    Ask for it by annotating a handler's second parameter with ``Delivery``.
    Only the bus creates these.

    .. versionadded:: 0.1
    """

    id: str
    """The event id, minted by the publisher (empty for a raw publish without an envelope)."""
    topic: str
    """The topic name the event was published to (for a pattern, the concrete topic)."""
    headers: dict[str, str]
    """Headers given to ``publish``."""
    published_at: datetime | None
    """The publisher's clock when it published (UTC), ``None`` for a raw publish."""
    attempt: int
    """Which delivery this is: always 1 for a live subscriber (never redelivered); in a
    consumer group, Redis's delivery count of the entry (2 and up: a retry, or a
    redelivery after a consumer crashed or hung)."""
    publisher: str
    """Id of the publishing bus instance; with ``seq``, orders and dedupes its events."""
    seq: int
    """Per publisher and topic sequence number, from 1 (0 for a raw publish)."""
    stream_id: str = ""
    """Durable topic: the entry id in the topic's stream (empty for a live topic)."""
    group: str | None = None
    """Consumer group that is handling the event, ``None`` outside a group."""
    causation_id: str = ""
    """Id of the event whose handler published this one (chaining), else empty."""
    correlation_id: str = ""
    """Id of the first event of a chain, inherited by every event it caused, else empty."""
    due: datetime | None = None
    """A delayed event (``publish(..., delay=)`` or ``at=``): when it was due, by the
    Redis server's clock (UTC); ``None`` for an event published at once.

    .. versionadded:: 0.2
    """


@final
@attrs.frozen
class Receipt:
    """What ``publish`` returns once the event was handed over.

    .. versionadded:: 0.1
    """

    id: str
    """The event id (unique; subscribers see it as ``Delivery.id``)."""
    topic: str
    """The topic name."""
    published_at: datetime
    """When it was published (UTC, publisher clock)."""
    receivers: int
    """Live topic: what Redis's PUBLISH counted, one per matching subscription of
    each push connection (a process subscribed to the channel and to a matching
    pattern counts twice). Local topic: local subscriptions it was offered to.
    Durable topic: 0 (consumers read the stream; see ``stats()``)."""
    stream_id: str | None = None
    """Durable topic: the entry id Redis gave the event in the topic's stream."""
    due: datetime | None = None
    """A delayed event: when it is due, by the Redis server's clock (UTC). ``None``
    for an event published at once.

    .. versionadded:: 0.2
    """
    duplicate: bool = False
    """A queue job enqueued with a ``job_id`` that was already waiting, scheduled or
    running: nothing was enqueued (``id`` is that job's).

    .. versionadded:: 0.3
    """


@attrs.define(slots=True, eq=False)
class Envelope:
    """One received (or locally published) event.

    ``data`` is the decoded JSON value (or bytes). ``cache`` holds the payload
    structured per requested type, so 100 subscribers of one type structure once.
    """

    topic: str
    id: str
    publisher: str
    seq: int
    published_ms: int | None
    headers: dict[str, str]
    content_type: str
    data: Any
    cache: dict[Any, Any] = attrs.field(factory=dict)
    stream_id: str = ""
    cause: str = ""
    corr: str = ""
    due_ms: int | None = None
    att: int = 0
    """A queue job: its attempts that failed before this one (the ``att`` field)."""
    _delivery: Delivery | None = None

    @classmethod
    def bare(cls, topic: str, data: Any, content_type: str) -> Envelope:
        """A payload published without an eventbus envelope (e.g. by redis-cli)."""
        return cls(
            topic=topic,
            id="",
            publisher="",
            seq=0,
            published_ms=None,
            headers={},
            content_type=content_type,
            data=data,
        )

    def delivery(self) -> Delivery:
        """The delivery context handed to live and local subscribers (built once)."""
        d = self._delivery
        if d is None:
            d = self._delivery = self._new_delivery(None, 1)
        return d

    def group_delivery(self, group: str | None, attempt: int) -> Delivery:
        """The delivery context of this entry handed to a consumer group member (or,
        with no group, of this job handed to a queue worker)."""
        return self._new_delivery(group, attempt)

    def _new_delivery(self, group: str | None, attempt: int) -> Delivery:
        ms = self.published_ms
        return Delivery(  # positional: attrs' keyword path costs ~3x here (a hot path)
            self.id,
            self.topic,
            self.headers,
            None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc),
            attempt,
            self.publisher,
            self.seq,
            self.stream_id,
            group,
            self.cause,
            self.corr,
            None
            if self.due_ms is None
            else datetime.fromtimestamp(self.due_ms / 1000, tz=timezone.utc),
        )
