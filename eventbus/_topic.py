"""Topics: a validated name, the event type it carries, and how it is delivered."""

from __future__ import annotations

import builtins
import re
from datetime import timedelta
from typing import Any, Final, Generic, Literal, TypeVar, final, overload

from ._config import DEFAULT_LIMITS, Limits, seconds
from .errors import ConfigurationError, InvalidTopic

__all__ = [
    "Topic",
    "TopicLike",
    "Trim",
    "as_topic",
    "validate_name",
    "validate_pattern",
    "within_limits",
]

Trim = Literal["acked", "hard"]

T = TypeVar("T")

# A name is an allow-list, not a deny-list: letters, digits, ".", "_", "-".
# ":" is the key delimiter, "{}" change the Cluster slot, "*?[]\" are glob syntax.
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# A pattern adds the glob characters Redis understands, but not "\" (escapes make
# patterns ambiguous) and never the delimiter or braces.
_PATTERN_RE: Final = re.compile(r"[A-Za-z0-9._\-*?\[\]^]+")
_GLOB_CHARS: Final = frozenset("*?[")


def validate_name(name: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """Return ``name`` if it is a valid topic name, else raise :class:`InvalidTopic`."""
    if not isinstance(name, str):
        raise InvalidTopic(repr(name), "a topic name must be a str")
    if not name:
        raise InvalidTopic(name, "empty name")
    if len(name) > limits.max_topic_len:
        raise InvalidTopic(name, f"longer than {limits.max_topic_len} characters")
    if _NAME_RE.fullmatch(name) is None:
        if _GLOB_CHARS.intersection(name):
            reason = "glob characters are only allowed in a pattern (Topic(..., pattern=True))"
        else:
            reason = "use letters, digits, '.', '_' and '-', starting with a letter or digit"
        raise InvalidTopic(name, reason)
    return name


def validate_pattern(pattern: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """Return ``pattern`` if it is a valid subscription pattern, else raise ``InvalidTopic``."""
    if not isinstance(pattern, str):
        raise InvalidTopic(repr(pattern), "a pattern must be a str")
    if not pattern:
        raise InvalidTopic(pattern, "empty pattern")
    if len(pattern) > limits.max_pattern_len:
        raise InvalidTopic(pattern, f"pattern longer than {limits.max_pattern_len} characters")
    if _PATTERN_RE.fullmatch(pattern) is None:
        raise InvalidTopic(
            pattern, "a pattern may use letters, digits, '.', '_', '-' and the globs * ? [ ] ^"
        )
    if not _GLOB_CHARS.intersection(pattern):
        raise InvalidTopic(pattern, "a pattern needs a glob character (* ? [)")
    if pattern.count("[") != pattern.count("]"):
        raise InvalidTopic(pattern, "unbalanced [ ] in pattern")
    return pattern


@final
class Topic(Generic[T]):
    """A named stream of events of type ``T``.

    ``Topic("prices", PriceTick)`` is a *live* topic: Redis pub/sub, delivered to
    every subscriber connected at publish time, at most once.
    ``Topic("audit", AuditEntry, local=True)`` never leaves the process.
    ``Topic("prices.*", PriceTick, pattern=True)`` can be subscribed to (it matches
    every live topic whose name matches the glob) but not published to.

    A plain string can stand wherever a topic is expected: it is an untyped live
    topic whose payload is the JSON value (or ``bytes``) as published.

    Topics are immutable, hashable and compare by value.

    :param name: topic name, 1 to ``Limits.max_topic_len`` of ``[A-Za-z0-9._-]``.
    :param type: the event type: an attrs class, a dataclass, or any type cattrs
        can structure; ``object`` (the default) means the raw JSON value.
    :param local: deliver within this process only, with no Redis round trip.
    :param pattern: ``name`` is a glob pattern (``*``, ``?``, ``[...]``).
    :param durable: store events in a Redis Stream (``Topic("orders", Order,
        durable=True)``): consumer groups get every event at least once, live
        subscribers can replay, nothing is lost while a consumer is down.
    :param maxlen: durable only: keep about this many entries (``XTRIM MAXLEN ~``).
    :param retention: durable only: keep entries about this long (``XTRIM MINID ~``).
    :param trim: durable only: ``"acked"`` (default) never trims an entry some
        consumer group has not acknowledged yet, so the stream may exceed
        ``maxlen`` while a group lags; ``"hard"`` trims on every publish
        regardless, and consumers count (and signal) pending entries it removed.
    :raises eventbus.errors.InvalidTopic: the name is not allowed.
    :raises eventbus.errors.ConfigurationError: contradictory options.

    .. versionadded:: 0.1
    .. versionchanged:: 0.2 ``durable``, ``maxlen``, ``retention``, ``trim``.
    """

    __slots__ = ("durable", "local", "maxlen", "name", "pattern", "retention", "trim", "type")
    name: str
    type: builtins.type[T]
    local: bool
    pattern: bool
    durable: bool
    maxlen: int | None
    retention: float | None
    trim: Trim

    @overload
    def __init__(
        self: Topic[Any],
        name: str,
        *,
        local: bool = ...,
        pattern: bool = ...,
        durable: bool = ...,
        maxlen: int | None = ...,
        retention: float | timedelta | None = ...,
        trim: Trim = ...,
    ) -> None: ...
    @overload
    def __init__(
        self,
        name: str,
        type: builtins.type[T],
        *,
        local: bool = ...,
        pattern: bool = ...,
        durable: bool = ...,
        maxlen: int | None = ...,
        retention: float | timedelta | None = ...,
        trim: Trim = ...,
    ) -> None: ...
    def __init__(
        self,
        name: str,
        type: builtins.type[T] | None = None,
        *,
        local: bool = False,
        pattern: bool = False,
        durable: bool = False,
        maxlen: int | None = None,
        retention: float | timedelta | None = None,
        trim: Trim = "acked",
    ) -> None:
        if pattern:
            validate_pattern(name)
        else:
            validate_name(name)
        if durable and (local or pattern):
            raise ConfigurationError(
                f"topic {name!r}: a durable topic cannot be local or a pattern"
            )
        if not durable and (maxlen is not None or retention is not None):
            raise ConfigurationError(f"topic {name!r}: maxlen and retention need durable=True")
        if maxlen is not None and (not isinstance(maxlen, int) or maxlen < 1):
            raise ConfigurationError(f"topic {name!r}: maxlen must be a positive int")
        if trim not in ("acked", "hard"):
            raise ConfigurationError(f"topic {name!r}: trim must be 'acked' or 'hard'")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "type", object if type is None else type)
        object.__setattr__(self, "local", bool(local))
        object.__setattr__(self, "pattern", bool(pattern))
        object.__setattr__(self, "durable", bool(durable))
        object.__setattr__(self, "maxlen", maxlen)
        object.__setattr__(
            self, "retention", None if retention is None else seconds(retention, name="retention")
        )
        object.__setattr__(self, "trim", trim)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Topic is immutable")

    def _key(self) -> tuple[object, ...]:
        return (
            self.name,
            self.type,
            self.local,
            self.pattern,
            self.durable,
            self.maxlen,
            self.retention,
            self.trim,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Topic):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        tp = getattr(self.type, "__qualname__", repr(self.type))
        flags = "".join(
            f", {flag}=True" for flag in ("local", "pattern", "durable") if getattr(self, flag)
        )
        if self.maxlen is not None:
            flags += f", maxlen={self.maxlen}"
        if self.retention is not None:
            flags += f", retention={self.retention}"
        return f"Topic({self.name!r}, {tp}{flags})"


TopicLike = Topic[T] | str


def as_topic(topic: Topic[T] | str) -> Topic[Any]:
    """Coerce a plain string into an untyped live topic."""
    if isinstance(topic, Topic):
        return topic
    if isinstance(topic, str):
        return Topic(topic)
    raise ConfigurationError(f"expected a Topic or a topic name, got {topic!r}")


def within_limits(topic: Topic[T], limits: Limits) -> Topic[T]:
    """``topic`` if its name fits a bus's ``limits``, else raise :class:`InvalidTopic`.

    ``Topic`` checked the name against the default (and highest) limits when it
    was created; a bus configured with lower ones checks again here, before any I/O.
    """
    name = topic.name
    if topic.pattern:
        if len(name) > limits.max_pattern_len:
            raise InvalidTopic(name, f"pattern longer than {limits.max_pattern_len} characters")
    elif len(name) > limits.max_topic_len:
        raise InvalidTopic(name, f"longer than {limits.max_topic_len} characters")
    return topic
