"""Recurring events: a definition by name, its occurrences, and the catch-up policy.

A definition is stored as canonical JSON (sorted keys) in ``{prefix}:recurring``, so
declaring it again with the same arguments writes the same bytes and changes
nothing. Its next occurrence is a score in ``{prefix}:recurring:due``. A scheduler
fires an occurrence with a compare-and-set script (``RECURRING_FIRE``): only the
call that finds the score it read advances it, so across any number of
schedulers each occurrence is released once. An occurrence's event id derives
from the schedule's name and the occurrence time: the same occurrence always has
the same id, and two occurrences never share one.

Occurrences: ``every=`` is aligned to the Unix epoch (``every=timedelta(minutes=5)``
fires at :00, :05, ... UTC), so a definition declared again later keeps its
times; ``cron=`` is read by croniter in the ``tz`` time zone.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timedelta, timezone
from typing import Any, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import orjson

from ..errors import ConfigurationError

__all__ = ["CATCH_UP", "CatchUp", "Recurrence", "ScheduleInfo", "occurrence_id"]

CatchUp = Literal["skip", "once", "all"]
CATCH_UP: Final = ("skip", "once", "all")
DEFAULT_MAX_CATCH_UP: Final = 100


def occurrence_id(name: str, occurrence_ms: int) -> str:
    """The event id of one occurrence: 32 hex digits, like every event id."""
    return hashlib.sha256(f"{name}\x00{occurrence_ms}".encode()).hexdigest()[:32]


@attrs.frozen
class Recurrence:
    """A recurring event's definition, as stored in Redis (canonical JSON)."""

    name: str
    topic: str
    durable: bool
    maxlen: int | None
    """The topic's MAXLEN for a hard-trimmed durable topic, else None."""
    every_ms: int | None
    cron: str | None
    tz: str
    catch_up: str
    max_catch_up: int
    content_type: str
    data: Any
    """The event, unstructured (``Codec.unstructure``): JSON, or base64 text for bytes."""
    headers: dict[str, str]

    def to_json(self) -> bytes:
        return orjson.dumps(attrs.asdict(self), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, raw: bytes | str) -> Recurrence:
        doc = orjson.loads(raw)
        return cls(**{f.name: doc[f.name] for f in attrs.fields(cls)})

    def digest(self) -> str:
        """What the fire script compares (``redis.sha1hex`` of the stored JSON)."""
        return hashlib.sha1(self.to_json(), usedforsecurity=False).hexdigest()

    def event(self) -> Any:
        """The event to encode for an occurrence (bytes back from base64)."""
        if self.content_type == "application/octet-stream":
            return base64.b64decode(self.data)
        return self.data

    # -- occurrences ----------------------------------------------------------------

    def _zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def next_after(self, ms: int) -> int:
        """The first occurrence strictly after ``ms`` (epoch ms)."""
        if self.every_ms is not None:
            return (ms // self.every_ms + 1) * self.every_ms
        from croniter import croniter

        assert self.cron is not None
        start = datetime.fromtimestamp(ms / 1000, tz=self._zone())
        nxt: datetime = croniter(self.cron, start).get_next(datetime)
        return int(nxt.timestamp() * 1000)

    def prev_before(self, ms: int) -> int:
        """The last occurrence strictly before ``ms`` (epoch ms)."""
        if self.every_ms is not None:
            return ((ms - 1) // self.every_ms) * self.every_ms
        from croniter import croniter

        assert self.cron is not None
        start = datetime.fromtimestamp(ms / 1000, tz=self._zone())
        prev: datetime = croniter(self.cron, start).get_prev(datetime)
        return int(prev.timestamp() * 1000)

    def to_fire(self, due: int, now: int) -> tuple[list[int], int]:
        """What a scheduler releases for the occurrence due at ``due`` (<= ``now``):
        the occurrence times to release, and the next occurrence after ``now``.

        One occurrence due: it is released, whatever the policy (late or not).
        Several (the schedulers were down while later ones fell due): ``skip``
        releases none of them, ``once`` the latest, ``all`` each of the latest
        ``max_catch_up``, oldest first.
        """
        latest = max(self.prev_before(now + 1), due)
        following = self.next_after(latest)
        if latest == due:
            return [due], following
        if self.catch_up == "skip":
            return [], following
        if self.catch_up == "once":
            return [latest], following
        found = [latest]
        at = latest
        for _ in range(self.max_catch_up - 1):
            at = self.prev_before(at)
            if at < due:
                break
            found.append(at)
        return found[::-1], following


def build(
    *,
    name: str,
    topic: str,
    durable: bool,
    maxlen: int | None,
    every: float | timedelta | None,
    cron: str | None,
    tz: str,
    catch_up: str,
    max_catch_up: int,
    content_type: str,
    data: Any,
    headers: dict[str, str],
) -> Recurrence:
    """A checked definition.

    :raises eventbus.errors.ConfigurationError: naming what is wrong.
    """
    if not isinstance(name, str) or not name or len(name) > 200:
        raise ConfigurationError(f"a schedule name is 1-200 characters, got {name!r}")
    if (every is None) == (cron is None):
        raise ConfigurationError(f"schedule {name!r}: give every= or cron=, one of them")
    every_ms: int | None = None
    if every is not None:
        if not isinstance(every, int | float | timedelta):
            raise ConfigurationError(f"schedule {name!r}: every= is seconds or a timedelta")
        seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
        every_ms = round(seconds * 1000)
        if every_ms < 1:
            raise ConfigurationError(f"schedule {name!r}: every= must be at least 1 ms")
    if cron is not None:
        from croniter import croniter

        if not isinstance(cron, str) or not croniter.is_valid(cron):
            raise ConfigurationError(f"schedule {name!r}: {cron!r} is not a cron expression")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"schedule {name!r}: unknown time zone {tz!r}") from exc
    if catch_up not in CATCH_UP:
        raise ConfigurationError(
            f"schedule {name!r}: catch_up must be one of {', '.join(CATCH_UP)}, got {catch_up!r}"
        )
    if not isinstance(max_catch_up, int) or max_catch_up < 1:
        raise ConfigurationError(f"schedule {name!r}: max_catch_up must be a positive int")
    return Recurrence(
        name=name,
        topic=topic,
        durable=durable,
        maxlen=maxlen,
        every_ms=every_ms,
        cron=cron,
        tz=tz,
        catch_up=catch_up,
        max_catch_up=max_catch_up,
        content_type=content_type,
        data=data,
        headers=headers,
    )


def _when(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=timezone.utc)


@attrs.frozen
class ScheduleInfo:
    """One recurring event, as :meth:`EventBus.schedules` lists it.

    .. versionadded:: 0.2
    """

    name: str
    topic: str
    every: timedelta | None
    cron: str | None
    tz: str
    catch_up: str
    """``"skip"``, ``"once"`` or ``"all"``: see :meth:`EventBus.schedule`."""
    next_due: datetime | None
    """The next occurrence (UTC); None if it vanished (being removed)."""
    last_release: datetime | None
    """The occurrence released last (UTC), None before the first."""

    @classmethod
    def of(cls, rec: Recurrence, next_ms: int | None, last_ms: int | None) -> ScheduleInfo:
        return cls(
            name=rec.name,
            topic=rec.topic,
            every=None if rec.every_ms is None else timedelta(milliseconds=rec.every_ms),
            cron=rec.cron,
            tz=rec.tz,
            catch_up=rec.catch_up,
            next_due=_when(next_ms),
            last_release=_when(last_ms),
        )
