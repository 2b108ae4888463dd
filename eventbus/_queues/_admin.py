"""A queue read back from Redis: its statistics and its dead letters (list, replay,
purge), for ``QueueFeature`` and the command line."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from .._codec import field_map
from .._connection import map_exceptions
from .._keys import NUDGE, queue_keys
from .._stats import QueueStats
from ..errors import PayloadError
from ._queue import Queue

if TYPE_CHECKING:
    from .._codec import Codec

__all__ = [
    "JobDeadLetter",
    "dead_letters",
    "purge_dead_letters",
    "read_job_dead_letter",
    "replay_dead_letters",
    "stats",
]


@attrs.frozen
class JobDeadLetter:
    """One entry of a queue's dead letters.

    .. versionadded:: 0.3
    """

    id: str
    """The dead-letter entry id (what ``replay_dead_letters`` and ``purge_dead_letters`` take)."""
    job_id: str
    """The job's id (empty for a raw job)."""
    queue: str
    reason: str
    """``handler_error`` (failed ``max_attempts`` times), ``rejected``
    (``nack(requeue=False)``), ``worker_lost`` (workers died holding it
    ``max_attempts`` times), or a decode reason (``decode_error``,
    ``validation_error``, ``too_large``): dead-lettered at once."""
    error_type: str
    error_message: str
    traceback: str
    attempts: int
    level: int
    """The priority level it was taken from."""
    worker: str
    failed_at: datetime
    job: bytes
    """The job exactly as it was in the queue."""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


async def stats(
    client: Any, codec: Codec, prefix: str, queues: Iterable[Queue[Any]]
) -> list[QueueStats]:
    """Read each queue's figures from Redis (one round trip per queue, plus one
    for the processing lists of its workers)."""
    out = []
    for queue in queues:
        keys = queue_keys(prefix, queue.name, queue.priorities)
        with map_exceptions(topic=queue.name, command="stats"):
            async with client.pipeline(transaction=False) as pipe:
                pipe.time()
                for key in keys.levels:
                    pipe.llen(key)
                for level in range(queue.priorities):
                    pipe.zcard(keys.delayed(level)[0])
                for key in keys.levels:
                    pipe.lindex(key, -1)
                pipe.zrange(keys.workers, 0, -1, withscores=True)
                pipe.xlen(keys.dead)
                pipe.hgetall(keys.counts)
                pipe.hgetall(keys.info)
                replies = await pipe.execute()
            n = queue.priorities
            server_s, micros = replies[0]
            now_ms = int(server_s) * 1000 + int(micros) // 1000
            waiting = tuple(int(v) for v in replies[1 : 1 + n])
            scheduled = sum(int(v) for v in replies[1 + n : 1 + 2 * n])
            heads = replies[1 + 2 * n : 1 + 3 * n]
            workers, dead, counts, info = replies[1 + 3 * n :]
            alive = [_text(wid) for wid, until in workers if until > now_ms]
            async with client.pipeline(transaction=False) as pipe:
                for wid, _until in workers:
                    pipe.llen(keys.processing(_text(wid)))
                processing = sum(int(v) for v in await pipe.execute()) if workers else 0
        oldest: float | None = None
        for head in heads:
            if head is None:
                continue
            try:
                env = codec.decode(queue.name, head)
            except PayloadError:
                continue
            if env.published_ms is not None:
                age = max((now_ms - env.published_ms) / 1000, 0.0)
                oldest = age if oldest is None else max(oldest, age)
        rates = [0.0, 0.0, 0.0]
        for wid, raw in info.items():
            if _text(wid) in alive:
                try:
                    values = orjson.loads(raw)
                    for i in range(3):
                        rates[i] += float(values[i])
                except (orjson.JSONDecodeError, TypeError, ValueError, IndexError):
                    continue
        count = {_text(k): int(v) for k, v in counts.items()}
        out.append(
            QueueStats(
                name=queue.name,
                waiting=waiting,
                scheduled=scheduled,
                processing=processing,
                workers=len(alive),
                dead_letters=int(dead),
                oldest_waiting_age=oldest,
                started=count.get("started", 0),
                finished=count.get("finished", 0),
                failed=count.get("failed", 0),
                started_per_s=rates[0],
                finished_per_s=rates[1],
                failed_per_s=rates[2],
            )
        )
    return out


async def dead_letters(
    client: Any, prefix: str, queue: Queue[Any], *, count: int, after: str | None
) -> list[JobDeadLetter]:
    """Up to ``count`` dead letters of ``queue``, oldest first, after entry ``after``."""
    keys = queue_keys(prefix, queue.name, queue.priorities)
    start = "-" if after is None else f"({after}"
    with map_exceptions(topic=queue.name, command="XRANGE"):
        entries = await client.xrange(keys.dead, start, "+", count=count)
    return [read_job_dead_letter(queue.name, entry_id, fields) for entry_id, fields in entries]


async def replay_dead_letters(
    client: Any, script: Any, prefix: str, queue: Queue[Any], ids: Sequence[str] | None
) -> int:
    """Put dead letters back on the queue (their level's list, at the back), each
    with its attempts reset, and remove them from the dead letters; atomically
    per entry. Returns how many."""
    keys = queue_keys(prefix, queue.name, queue.priorities)
    done = 0
    cursor = "-"
    for _ in range(1_000_000):
        if ids is None:
            entries = await client.xrange(keys.dead, cursor, "+", count=100)
        else:
            chunk, ids = list(ids[:100]), ids[100:]
            entries = []
            for entry_id in chunk:
                entries += await client.xrange(keys.dead, entry_id, entry_id)
        if not entries:
            return done
        args: list[Any] = [NUDGE]
        for entry_id, fields in entries:
            letter = read_job_dead_letter(queue.name, entry_id, fields)
            level = min(max(letter.level, 0), queue.priorities - 1)
            args += (letter.id, level, letter.job_id, _fresh(letter.job))
        with map_exceptions(topic=queue.name, command="EVALSHA"):
            done += int(await script(keys=[keys.dead, keys.ids, *keys.levels], args=args))
        cursor = f"({_text(entries[-1][0])}"
        if ids is not None and not ids:
            return done
    return done


async def purge_dead_letters(
    client: Any, prefix: str, queue: Queue[Any], ids: Sequence[str] | None
) -> int:
    """Delete ``queue``'s dead letters (``ids``, or all); how many."""
    keys = queue_keys(prefix, queue.name, queue.priorities)
    with map_exceptions(topic=queue.name, command="XDEL"):
        if ids is None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.xlen(keys.dead)
                pipe.delete(keys.dead)
                n, _ = await pipe.execute()
            return int(n)
        removed = 0
        for start in range(0, len(ids), 1000):
            removed += int(await client.xdel(keys.dead, *ids[start : start + 1000]))
        return removed


def read_job_dead_letter(queue: str, entry_id: bytes | str, fields: Any) -> JobDeadLetter:
    """One entry of a queue's dead-letter stream, as redis-py returns it."""
    f = field_map(fields) if isinstance(fields, list) else dict(fields)
    g = {(_text(k)): v for k, v in f.items()}

    def num(name: str) -> int:
        try:
            return int(g.get(name) or 0)
        except ValueError:
            return 0

    return JobDeadLetter(
        id=_text(entry_id),
        job_id=_text(g.get("job_id")),
        queue=queue,
        reason=_text(g.get("reason")),
        error_type=_text(g.get("error_type")),
        error_message=_text(g.get("error")),
        traceback=_text(g.get("traceback")),
        attempts=num("attempts"),
        level=num("level"),
        worker=_text(g.get("worker")),
        failed_at=datetime.fromtimestamp(num("at") / 1000, tz=timezone.utc),
        job=bytes(g.get("job") or b""),
    )


def _fresh(raw: bytes) -> bytes:
    """A dead job for a new start: an eventbus envelope loses its failed attempts."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw
    if type(doc) is dict and "eventbus" in doc and "att" in doc:
        del doc["att"]
        return orjson.dumps(doc)
    return raw
