"""Every error eventbus raises on purpose.

The tree::

    EventBusError
    ├── ConfigurationError (also ValueError)     misuse found before any I/O
    │   └── InvalidTopic                         a topic name or pattern outside the allow-list
    ├── PayloadError (also ValueError)
    │   ├── PayloadTooLarge                      an encoded event over ``Limits.max_payload_bytes``
    │   ├── EncodeError                          an event the converter cannot unstructure
    │   └── DecodeError                          bytes that are not an event of the expected type
    ├── BusStateError (also RuntimeError)        publish on a closed bus, entering a bus twice, ...
    ├── SubscriberOverflow                       an ``overflow="error"`` subscriber fell behind
    ├── JobTimeout (also TimeoutError)           a queue job ran past its worker's ``timeout``
    └── BackendError                             Redis said no, or could not be reached
        ├── RedisUnavailable                     connection refused, reset or timed out
        │   └── TLSError                         the TLS handshake or certificate check failed
        ├── BackendOOM                           Redis is full (maxmemory) and refuses writes
        ├── AuthenticationFailed                 wrong password, disabled user
        ├── PermissionDenied                     an ACL NOPERM: names the command, key or channel
        └── ConsumerNameInUse                    a live member of the group already runs under
                                                 this consumer name

Errors carry their context as attributes (``topic``, ``event_id``, ...) and build
their message from it, so a log line names what failed. Foreign errors (redis-py,
ssl) are translated in one place, ``eventbus._connection.map_exceptions``, and are
kept as ``__cause__``.
"""

from __future__ import annotations

import typing

if typing.TYPE_CHECKING:
    from collections.abc import Sequence

    from ._envelope import Receipt

__all__ = [
    "AuthenticationFailed",
    "BackendError",
    "BackendOOM",
    "BusStateError",
    "ConfigurationError",
    "ConsumerNameInUse",
    "DecodeError",
    "EncodeError",
    "EventBusError",
    "InvalidTopic",
    "JobTimeout",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "RedisUnavailable",
    "SubscriberOverflow",
    "TLSError",
]


class EventBusError(Exception):
    """Root of every error eventbus raises on purpose."""


class ConfigurationError(EventBusError, ValueError):
    """The bus, a topic or a subscription was configured wrongly. Raised before any I/O."""


class InvalidTopic(ConfigurationError):
    """A topic name or pattern is not allowed.

    :ivar name: the rejected name (``repr``-escaped in the message, so control
        characters cannot forge log lines).
    :ivar reason: why it was rejected.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        shown = name if len(name) <= 80 else name[:80] + "..."
        super().__init__(f"invalid topic {shown!r}: {reason}")


class PayloadError(EventBusError, ValueError):
    """An event could not be encoded, decoded, or is too large.

    :ivar topic: the topic name.
    :ivar event_id: the event id, when one is known.
    """

    def __init__(self, message: str, *, topic: str, event_id: str | None = None) -> None:
        self.topic = topic
        self.event_id = event_id
        where = f"topic {topic!r}" + (f", event {event_id}" if event_id else "")
        super().__init__(f"{message} ({where})")


class PayloadTooLarge(PayloadError):
    """An encoded event is over the configured limit. Nothing was sent to Redis.

    :ivar size: the encoded size in bytes.
    :ivar limit: the configured limit in bytes.
    """

    def __init__(self, *, topic: str, size: int, limit: int, event_id: str | None = None) -> None:
        self.size = size
        self.limit = limit
        super().__init__(
            f"event of {size} bytes is over the limit of {limit} bytes",
            topic=topic,
            event_id=event_id,
        )


class EncodeError(PayloadError):
    """An event could not be turned into its wire form (not JSON-representable)."""


class DecodeError(PayloadError):
    """Bytes received could not be decoded or structured into the expected type.

    :ivar reason: a short machine-readable reason: ``decode_error``,
        ``validation_error``, ``unsupported_version``, ``too_large`` or
        ``too_many_fields`` (the last three for stream entries).
    """

    def __init__(
        self, message: str, *, topic: str, reason: str, event_id: str | None = None
    ) -> None:
        self.reason = reason
        super().__init__(message, topic=topic, event_id=event_id)


class JobTimeout(EventBusError, TimeoutError):
    """A queue job ran past its worker's ``timeout`` and was cancelled: a failed
    attempt, retried or dead-lettered like any other.

    .. versionadded:: 0.3
    """

    def __init__(self, message: str, *, queue: str, job_id: str) -> None:
        self.queue = queue
        self.job_id = job_id
        super().__init__(message)


class BusStateError(EventBusError, RuntimeError):
    """An operation does not fit the bus's lifecycle state (closed, already started)."""


class SubscriberOverflow(EventBusError):
    """A subscription with ``overflow="error"`` fell behind by more than its buffer.

    Raised from the subscription's iterator; the subscription is closed, and its
    neighbours are unaffected.

    :ivar topic: the topic (or pattern) of the subscription.
    :ivar buffer: the buffer size that was exceeded.
    """

    def __init__(self, *, topic: str, buffer: int) -> None:
        self.topic = topic
        self.buffer = buffer
        super().__init__(f"subscriber of {topic!r} overflowed its buffer of {buffer}")


class BackendError(EventBusError):
    """Redis refused an operation or could not be reached.

    :ivar topic: the topic concerned, when one is.
    :ivar receipts: raised by ``publish_many`` to a durable topic: one entry per
        event, in order, its :class:`~eventbus.Receipt` if Redis stored it, else
        ``None`` (refused, or not known to be stored). A batch is not all or
        nothing: the events before a refusal (Redis filling up mid-batch, say) are
        stored and will be delivered. Retry only the ``None`` ones, or they are
        stored twice. Empty for every other call.
    """

    receipts: Sequence[Receipt | None] = ()

    def __init__(self, message: str, *, topic: str | None = None) -> None:
        self.topic = topic
        super().__init__(message if topic is None else f"{message} (topic {topic!r})")


class RedisUnavailable(BackendError):
    """The connection to Redis was refused, reset, or timed out."""


class BackendOOM(BackendError):
    """Redis is out of memory: ``used_memory`` is over ``maxmemory`` and its
    ``maxmemory-policy`` (``noeviction``) refuses commands that add data, such as
    the ``XADD`` of a durable publish. Nothing of the refused event was stored.

    Not retried: it lasts until memory is freed (consumers ack and the streams are
    trimmed, or ``maxmemory`` is raised). Reads, acks and live ``PUBLISH`` still work.
    """


class TLSError(RedisUnavailable):
    """The TLS handshake failed: untrusted certificate, name mismatch, or a plaintext peer."""


class AuthenticationFailed(BackendError):
    """Redis rejected the credentials. Never retried, and never falls back to another user."""


class PermissionDenied(BackendError):
    """A Redis ACL refused a command, key or channel (``NOPERM``).

    :ivar command: the refused command, e.g. ``SUBSCRIBE``.
    :ivar channel: the channel or pattern refused, for pub/sub commands.
    :ivar hint: the ACL rule that would allow it.
    """

    def __init__(
        self,
        *,
        command: str,
        topic: str | None = None,
        channel: str | None = None,
        hint: str | None = None,
        detail: str = "",
    ) -> None:
        self.command = command
        self.channel = channel
        self.hint = hint
        parts = [f"Redis ACL refused {command}"]
        if channel is not None:
            parts.append(f"on channel {channel!r}")
        if detail:
            parts.append(f"({detail})")
        message = " ".join(parts)
        if hint:
            message += f"; grant it with {hint!r}"
        super().__init__(message, topic=topic)


class ConsumerNameInUse(BackendError):
    """Another live member of the consumer group runs under this consumer name.

    Two members with one name would share one pending list, and each would take
    the other's entries for its own; so a member holds a lease on its name while
    it runs, and a second one is refused when it starts. Raised by ``async with
    bus:`` (a ``bus.on(..., group=, consumer=)`` handler) or by entering
    ``bus.subscribe(..., group=, consumer=)``, within about one lease period.

    :ivar group: the consumer group.
    :ivar consumer: the consumer name.
    :ivar holder: who holds the name, as its lease says (``<host>/<pid>/<random>``),
        or ``None`` if it could not be read.

    .. versionadded:: 0.2
    """

    def __init__(self, *, topic: str, group: str, consumer: str, holder: str | None) -> None:
        self.group = group
        self.consumer = consumer
        self.holder = holder
        held = "" if holder is None else f", held by {holder[:120]!r}"
        super().__init__(
            f"consumer name {consumer!r} of group {group!r} is in use by a live member{held}:"
            " give each member its own consumer= name",
            topic=topic,
        )
