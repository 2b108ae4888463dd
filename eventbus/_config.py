"""Value objects for configuration, with their defaults."""

from __future__ import annotations

import enum
from datetime import timedelta
from typing import Final, Literal

import attrs

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_BUFFER",
    "DEFAULT_LIMITS",
    "DEFAULT_LIVE_POLICY",
    "UNSET",
    "Limits",
    "LivePolicy",
    "Overflow",
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


@attrs.frozen(kw_only=True)
class Limits:
    """Size and shape limits, enforced before anything reaches Redis and again on receipt."""

    max_payload_bytes: int = attrs.field(default=1024 * 1024, validator=_positive)
    """Largest encoded event, in bytes (default 1 MiB; Redis itself allows 512 MB)."""
    max_topic_len: int = attrs.field(default=200, validator=_positive)
    """Longest topic name."""
    max_pattern_len: int = attrs.field(default=256, validator=_positive)
    """Longest subscription pattern (very long globs crash old redis-server, CVE-2024-31228)."""
    max_headers: int = attrs.field(default=32, validator=_positive)
    """Most headers on one event."""


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
