"""Inspection of durable topics: dead letters (list, replay, purge) and statistics."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any, Final

import attrs

from .._keys import TopicKeys
from .._scripts import REPLAY_DEAD_LETTERS
from .._stats import GroupStats, TopicStats

__all__ = [
    "DeadLetter",
    "list_dead_letters",
    "purge_dead_letters",
    "replay_dead_letters",
    "topic_stats",
]

_REPLAY_BATCH: Final = 100


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


def _text(fields: dict[bytes, bytes], name: bytes) -> str:
    value = fields.get(name)
    return value.decode("utf-8", "replace") if value is not None else ""


def _dead_letter(entry_id: bytes, fields: dict[bytes, bytes]) -> DeadLetter:
    failed_ms = int(fields.get(b"failed_at", b"0") or 0)
    return DeadLetter(
        id=entry_id.decode(),
        event_id=_text(fields, b"id"),
        topic=_text(fields, b"topic"),
        original_id=_text(fields, b"original_id"),
        group=_text(fields, b"group"),
        consumer=_text(fields, b"consumer"),
        attempts=int(fields.get(b"attempts", b"0") or 0),
        reason=_text(fields, b"reason"),
        error_type=_text(fields, b"error_type"),
        error_message=_text(fields, b"error_message"),
        traceback=_text(fields, b"traceback"),
        failed_at=datetime.fromtimestamp(failed_ms / 1000, tz=timezone.utc),
        envelope=fields.get(b"env"),
        raw=fields.get(b"raw"),
    )


async def list_dead_letters(
    client: Any, keys: TopicKeys, *, count: int, after: str | None
) -> list[DeadLetter]:
    start = "-" if after is None else "(" + after
    entries = await client.xrange(keys.dlq, min=start, count=count)
    return [_dead_letter(entry_id, fields) for entry_id, fields in entries]


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


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def topic_stats(client: Any, name: str, keys: TopicKeys) -> TopicStats:
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xrange(keys.stream, count=1)
        pipe.xrevrange(keys.stream, count=1)
        pipe.xlen(keys.dlq)
        pipe.hgetall(keys.dlq_count)
        pipe.time()
        length, first, last, dead, dead_counts, now = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    groups: list[GroupStats] = []
    if length or first or dead:
        try:
            infos = await client.xinfo_groups(keys.stream)
        except Exception:  # no stream: no groups
            infos = []
        counts = {_decode(k): int(v) for k, v in (dead_counts or {}).items()}
        for info in infos:
            group = _decode(info["name"])
            oldest: float | None = None
            if int(info["pending"]):
                summary = await client.xpending(keys.stream, group)
                if summary["min"] is not None:  # None: acked since XINFO
                    oldest_ms = int(_decode(summary["min"]).split("-")[0])
                    oldest = max(now_ms - oldest_ms, 0) / 1000
            lag = info.get("lag")
            groups.append(
                GroupStats(
                    name=group,
                    consumers=int(info["consumers"]),
                    pending=int(info["pending"]),
                    lag=None if lag is None else int(lag),
                    oldest_pending_age=oldest,
                    last_delivered_id=_decode(info["last-delivered-id"]),
                    dead_letters=counts.get(group, 0),
                )
            )
    return TopicStats(
        name=name,
        length=int(length),
        first_id=first[0][0].decode() if first else None,
        last_id=last[0][0].decode() if last else None,
        dead_letters=int(dead),
        groups=tuple(sorted(groups, key=lambda g: g.name)),
    )
