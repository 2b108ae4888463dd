"""Value objects for configuration, with their defaults."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import timedelta
from typing import Final, Literal

import attrs

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_CLAIM_POLICY",
    "DEFAULT_LIMITS",
    "DEFAULT_LIVE_POLICY",
    "DEFAULT_RETRY_POLICY",
    "MAX_PATTERN_LEN",
    "MAX_TOPIC_LEN",
    "UNSET",
    "ClaimPolicy",
    "Limits",
    "LivePolicy",
    "Overflow",
    "RetryPolicy",
    "Unset",
    "seconds",
]

Overflow = Literal["block", "drop_oldest", "drop_newest", "error"]
OVERFLOW_POLICIES: Final = ("block", "drop_oldest", "drop_newest", "error")

DEFAULT_BUFFER: Final = 1000


class Unset(enum.Enum):
    """Type of :data:`UNSET`, the "argument not given" marker where ``None`` means something."""

    UNSET = enum.auto()

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset.UNSET


def seconds(value: float | timedelta, *, name: str) -> float:
    """Normalise a duration given as float seconds or a ``timedelta``."""
    result = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if result < 0:
        raise ConfigurationError(f"{name} must not be negative, got {value!r}")
    return result


def _positive(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value < 1:
        raise ConfigurationError(f"{attribute.name} must be at least 1, got {value}")


MAX_TOPIC_LEN: Final = 200
"""Ceiling of ``Limits.max_topic_len``: a :class:`Topic` checks its name against it
when it is created, before it meets a bus, so a bus's limits can lower it only."""
MAX_PATTERN_LEN: Final = 256
"""Ceiling of ``Limits.max_pattern_len``, for the same reason."""


def _ceiling(ceiling: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def check(_inst: object, attribute: attrs.Attribute[int], value: int) -> None:
        if value > ceiling:
            raise ConfigurationError(
                f"{attribute.name} must be at most {ceiling} (a Topic checks its name"
                f" against {ceiling} when it is created; a bus's limits can only lower it),"
                f" got {value}"
            )

    return check


@attrs.frozen(kw_only=True)
class Limits:
    """Size and shape limits, enforced before anything reaches Redis and again on receipt."""

    max_payload_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    """Largest encoded event, in bytes (default 1 MiB; Redis itself allows 512 MB)."""
    max_topic_len: int = attrs.field(
        default=MAX_TOPIC_LEN, validator=[_positive, _ceiling(MAX_TOPIC_LEN)]
    )
    """Longest topic name (at most 200, the default: ``Topic`` checks that much)."""
    max_pattern_len: int = attrs.field(
        default=MAX_PATTERN_LEN, validator=[_positive, _ceiling(MAX_PATTERN_LEN)]
    )
    """Longest subscription pattern (very long globs crash old redis-server,
    CVE-2024-31228; at most 256, the default)."""
    max_headers: int = attrs.field(default=32, validator=_positive)
    """Most headers on one event."""
    max_entry_fields: int = attrs.field(default=32, validator=_positive)
    """Most fields of a stream entry a consumer will decode (more: dead-lettered)."""
    dead_letter_maxlen: int = attrs.field(default=100_000, validator=_positive)
    """About how many entries a topic's dead-letter stream keeps (``MAXLEN ~``)."""


DEFAULT_LIMITS: Final = Limits()


def _duration(value: float | timedelta) -> float:
    return seconds(value, name="duration")


@attrs.frozen(kw_only=True)
class LivePolicy:
    """How the single pub/sub connection is kept alive.

    Durations are seconds, or ``timedelta``.

    A pub/sub reader blocked on a read never notices a half-open TCP connection
    (redis-py's health check only runs before a command), so the bus PINGs on the
    push connection itself and reconnects when the PONG is late.
    """

    ping_interval: float = attrs.field(default=5.0, converter=_duration)
    """Seconds between keepalive PINGs on the push connection."""
    ping_timeout: float = attrs.field(default=2.0, converter=_duration)
    """Seconds to wait for the PONG before the connection is declared dead."""
    reconnect_backoff: float = attrs.field(default=0.05, converter=_duration)
    """First reconnect delay in seconds; doubles per failed attempt, with jitter."""
    reconnect_backoff_max: float = attrs.field(default=2.0, converter=_duration)
    """Cap of the reconnect delay in seconds."""
    connect_timeout: float = attrs.field(default=5.0, converter=_duration)
    """Seconds allowed for connecting and (re)subscribing before trying again."""


DEFAULT_LIVE_POLICY: Final = LivePolicy()


def _at_least_one(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 1:
        raise ConfigurationError(f"{attribute.name} must be at least 1, got {value}")


def _fraction(_inst: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0 <= value <= 1:
        raise ConfigurationError(f"{attribute.name} must be within [0, 1], got {value}")


@attrs.frozen(kw_only=True)
class RetryPolicy:
    """How a consumer group retries an event whose handler raised.

    Attempt ``n`` (``n >= 1``) that fails is retried after
    ``min(backoff * multiplier ** (n - 1), backoff_max)`` seconds, stretched by a
    random factor in ``[1, 1 + jitter]`` so failing consumers do not retry in step.
    Each retry goes through Redis (``XCLAIM`` by the same consumer), so the attempt
    number is Redis's delivery count and survives a crash. After ``max_attempts``
    the event goes to the topic's dead-letter stream, atomically with its ack.

    A delay up to half of the group's ``claim_idle`` is waited out in the member;
    a longer one is noted in Redis with the event, so a member that dies during
    the backoff loses nothing and whoever claims the event waits for its retry
    time instead of running it early.

    .. versionadded:: 0.2
    """

    max_attempts: int = attrs.field(default=5, validator=_positive)
    """Handler invocations before the event is dead-lettered (1: never retry)."""
    backoff: float = attrs.field(default=0.2, converter=_duration)
    """Delay before the first retry, in seconds."""
    multiplier: float = attrs.field(default=2.0, validator=_at_least_one)
    """Factor applied to the delay per further attempt."""
    backoff_max: float = attrs.field(default=30.0, converter=_duration)
    """Cap of the delay, in seconds."""
    jitter: float = attrs.field(default=0.1, validator=_fraction)
    """Random stretch of each delay, as a fraction of it."""

    def delay(self, attempt: int, rand: float) -> float:
        """Seconds to wait after failed attempt ``attempt``; ``rand`` in ``[0, 1)``."""
        base = min(self.backoff * self.multiplier ** (attempt - 1), self.backoff_max)
        return base * (1.0 + self.jitter * rand)


@attrs.frozen(kw_only=True)
class ClaimPolicy:
    """When a consumer takes over entries stuck with crashed or hung consumers.

    Every ``interval`` seconds a consumer runs ``XAUTOCLAIM`` for entries idle
    longer than ``idle`` (following its cursor through the whole pending list, at
    most ``count`` entries per call). A running member keeps what it holds from
    being claimed, however long its handler takes: on the same timer it resets the
    idle time of its entries, at most every ``idle / 3``, so keep ``interval``
    well below ``idle``. Only a member that stalls (frozen process, blocked event
    loop, lost connection) past ``idle`` has its entries handed to another.

    .. versionadded:: 0.2
    """

    idle: float = attrs.field(default=30.0, converter=_duration)
    """Seconds an entry may stay unacknowledged before others may claim it."""
    interval: float = attrs.field(default=5.0, converter=_duration)
    """Seconds between claim passes."""
    count: int = attrs.field(default=100, validator=_positive)
    """``COUNT`` of one ``XAUTOCLAIM`` call (it scans up to 10x that many entries)."""


DEFAULT_RETRY_POLICY: Final = RetryPolicy()
DEFAULT_CLAIM_POLICY: Final = ClaimPolicy()
