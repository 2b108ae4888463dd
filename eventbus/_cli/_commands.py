"""What each command does, once its options are parsed: an async function that opens
a :class:`~._session.Session`, does the work, and prints the result (rich tables
and progress bars for people, one JSON document or JSON lines with ``--json``).

Imported by a command when it runs, never by ``eventbus --help``.

Why one module past 600 lines: it is the command line's work, one function per
command, each short; what they share (the table and JSON output, the dead-letter
and queue records, the topic discovery) is here once, and ``top``, ``dashboard``
and the snapshot they draw from each have their own module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any, Final

import anyio
import click
import orjson

from .._delayed._pending import delayed_topics, pending_delayed
from .._envelope import Delivery, Receipt
from .._keys import queue_keys, topic_keys
from .._queues import JobDeadLetter, Queue
from .._queues._admin import read_job_dead_letter
from .._stats import BusStats, QueueStats
from .._streams._deadletter import DeadLetter, read_dead_letter
from .._topic import Topic
from ..errors import DecodeError
from ._reads import durable_topics, group_json, queue_json, registered_queues
from ._session import Session, dumps, echo_json, note, session, topic_kind

__all__ = [
    "dlq_list",
    "dlq_purge",
    "dlq_replay",
    "dlq_show",
    "groups",
    "publish",
    "queues",
    "scheduled_cancel",
    "scheduled_list",
    "schedules_list",
    "schedules_remove",
    "stats",
    "tail",
]

_STDIN_BATCH: Final = 1000
"""Lines of stdin published per ``publish_many`` call."""
_REPLAY_CHUNK: Final = 100
_PURGE_CHUNK: Final = 500


# -- output ---------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return _when(value)
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    return str(value)


def _table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left", title_style="bold")
    for column in columns:
        # Ids are copied into the next command: never folded (other columns give way).
        table.add_column(column, overflow="fold", no_wrap=column.endswith("id"))
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    Console(highlight=False).print(table)


@contextmanager
def _progress(total: int, what: str) -> Iterator[Any]:
    """A progress bar on stderr when it is a terminal (nothing otherwise); yields
    ``advance(n)``."""
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(what, total=total)
        yield lambda n: progress.advance(task, n)


def _preview(data: object, limit: int = 60) -> str:
    text = dumps(data)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decoded(s: Session, topic: str, envelope: bytes | None) -> Any:
    if envelope is None:
        return None
    try:
        return s.codec.decode(topic, envelope).data
    except DecodeError:
        return None


# -- publish and tail -----------------------------------------------------------------


def _receipt_line(r: Receipt) -> str:
    line = r.id
    if r.stream_id:
        line += f" {r.stream_id}"
    if r.due is not None:
        line += f" due {_when(r.due)}"
    return line


def _receipt_json(r: Receipt) -> dict[str, Any]:
    return {
        "id": r.id,
        "topic": r.topic,
        "stream_id": r.stream_id,
        "due": r.due,
        "receivers": r.receivers,  # a live topic's PUBLISH count; 0 for a durable one
    }


def _read_lines(stream: Any, n: int) -> list[str]:
    lines = []
    for _ in range(n):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
    return lines


async def publish(
    url: str | None,
    prefix: str,
    topic: str,
    payload: object,
    from_stdin: bool,
    durable: bool | None,
    headers: dict[str, str],
    delay: float | None,
    at: datetime | None,
    as_json: bool,
) -> None:
    import json

    async with session(url, prefix) as s:
        t = await topic_kind(s, topic, durable)
        options: dict[str, Any] = {"headers": headers or None, "delay": delay, "at": at}

        def show(receipts: list[Receipt]) -> None:
            for r in receipts:
                if as_json:
                    echo_json(_receipt_json(r))
                else:
                    click.echo(_receipt_line(r))

        if not from_stdin:
            show([await s.bus.publish(t, payload, **options)])
            return
        sent = lineno = 0
        while lines := await anyio.to_thread.run_sync(_read_lines, sys.stdin, _STDIN_BATCH):
            events = []
            for line in lines:
                lineno += 1
                if not line.strip():
                    continue
                try:
                    events.append(json.loads(line))
                except ValueError as exc:
                    raise click.ClickException(
                        f"stdin line {lineno} is not JSON ({exc}); {sent} event(s) published"
                        " before it"
                    ) from None
            if events:
                show(await s.bus.publish_many(t, events, **options))
                sent += len(events)
        kind = "durable" if t.durable else "live"
        note(f"eventbus: published {sent} event(s) to {kind} topic {topic!r}")


def _delivery_json(data: object, d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "topic": d.topic,
        "stream_id": d.stream_id or None,
        "published_at": d.published_at,
        "headers": d.headers,
        "due": d.due,
        "data": data,
    }


def _position(text: str) -> object:
    """``--from``: latest, earliest, an ISO 8601 time (UTC if it names no zone), or an
    event or stream id (passed on as it is)."""
    if text in ("latest", "earliest"):
        return text
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return text
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


async def tail(
    url: str | None,
    prefix: str,
    topic: str,
    durable: bool | None,
    from_: str | None,
    until_caught_up: bool,
    count: int | None,
    as_json: bool,
) -> None:
    async with session(url, prefix) as s:
        t = await topic_kind(s, topic, durable)
        options: dict[str, Any] = {"buffer": 1000}
        if t.durable:
            start = _position(from_) if from_ else "earliest" if until_caught_up else "latest"
            options.update(from_=start, overflow="block")
            if until_caught_up:
                options["until"] = "latest"
            where = f"durable, from {from_ or start}" + (
                ", until caught up" if until_caught_up else ""
            )
        elif from_ is not None or until_caught_up:
            raise click.UsageError(
                f"topic {topic!r} is live: it keeps no history, so --from and"
                " --until-caught-up need a durable topic (--durable)"
            )
        else:
            where = "live"
        seen = 0
        async with s.bus.subscribe(t, **options) as sub:
            note(f"eventbus: tailing {topic!r} ({where}); Ctrl-C to stop")
            if count == 0:
                return
            async for data, d in sub.deliveries():
                if as_json:
                    echo_json(_delivery_json(data, d))
                else:
                    click.echo(f"{_when(d.published_at)} {d.id or '-'} {dumps(data)}")
                seen += 1
                if count is not None and seen >= count:
                    break
            dropped = sub.statistics().dropped
        if dropped:
            note(f"eventbus: {dropped} event(s) dropped: the terminal was slower than the topic")


# -- stats and groups -----------------------------------------------------------------


async def _delayed_counts(s: Session, names: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        keys = topic_keys(s.prefix, name)
        async with s.client.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.delayed)
            pipe.zrange(keys.delayed, 0, 0, withscores=True)
            pending, first = await pipe.execute()
        if pending:
            due = datetime.fromtimestamp(first[0][1] / 1000, tz=timezone.utc) if first else None
            rows.append({"topic": name, "pending": int(pending), "next_due": due})
    return rows


async def stats(url: str | None, prefix: str, topics: Sequence[str], as_json: bool) -> None:
    async with session(url, prefix) as s:
        names = list(topics) or await durable_topics(s)
        found = (
            await s.bus.stats(*(Topic(n, durable=True) for n in names)) if names else BusStats(())
        )
        delayed_names = list(topics) or await delayed_topics(s.client, s.prefix)
        delayed = await _delayed_counts(s, delayed_names)
        schedules = await s.bus.schedules()
        queue_list = [] if topics else await registered_queues(s, ())
        queue_stats = (await s.bus.stats(*queue_list)).queues if queue_list else ()
    if topics:
        schedules = [sch for sch in schedules if sch.topic in topics]
    if as_json:
        echo_json(
            {
                "topics": [
                    {
                        "name": t.name,
                        "length": t.length,
                        "first_id": t.first_id,
                        "last_id": t.last_id,
                        "dead_letters": t.dead_letters,
                        "groups": [group_json(g) for g in t.groups],
                    }
                    for t in found.topics
                ],
                "queues": [queue_json(q) for q in queue_stats],
                "delayed": delayed,
                "schedules": [_schedule_json(sch) for sch in schedules],
            }
        )
        return
    if not (found.topics or delayed or schedules or queue_stats):
        click.echo(
            f"no durable topics, queues, delayed events or schedules under prefix {prefix!r}"
        )
        return
    if queue_stats:
        _queues_table(queue_stats)
    if found.topics:
        _table(
            "Topics",
            ["topic", "length", "first id", "last id", "dead letters", "groups"],
            [
                (t.name, t.length, t.first_id, t.last_id, t.dead_letters, len(t.groups))
                for t in found.topics
            ],
        )
    groups = [(t.name, g) for t in found.topics for g in t.groups]
    if groups:
        _table(
            "Groups",
            ["topic", "group", "consumers", "pending", "lag", "oldest pending (s)", "dead letters"],
            [
                (name, g.name, g.consumers, g.pending, g.lag, g.oldest_pending_age, g.dead_letters)
                for name, g in groups
            ],
        )
    if delayed:
        _table(
            "Delayed events",
            ["topic", "pending", "next due"],
            [(d["topic"], d["pending"], d["next_due"]) for d in delayed],
        )
    if schedules:
        _schedules_table(schedules)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def _require_stream(s: Session, topic: str) -> str:
    stream = topic_keys(s.prefix, topic).stream
    kind = await s.redis(s.client.type(stream), command="TYPE", topic=topic)
    if _text(kind) != "stream":
        raise click.ClickException(
            f"topic {topic!r} has no stream under prefix {s.prefix!r}: it is not a durable"
            " topic, or nothing was published to it yet"
        )
    return stream


async def groups(url: str | None, prefix: str, topic: str, as_json: bool) -> None:
    async with session(url, prefix) as s:
        stream = await _require_stream(s, topic)
        infos = await s.redis(s.client.xinfo_groups(stream), command="XINFO", topic=topic)
        result: list[dict[str, Any]] = []
        for info in infos:
            name = _text(info["name"])
            members = await s.redis(
                s.client.xinfo_consumers(stream, name), command="XINFO", topic=topic
            )
            lag = info.get("lag")
            result.append(
                {
                    "name": name,
                    "consumers": int(info["consumers"]),
                    "pending": int(info["pending"]),
                    "lag": None if lag is None else int(lag),
                    "last_delivered_id": _text(info["last-delivered-id"]),
                    "members": [
                        {
                            "name": _text(m["name"]),
                            "pending": int(m["pending"]),
                            "idle_ms": int(m["idle"]),
                            "inactive_ms": None
                            if m.get("inactive") is None
                            else int(m["inactive"]),
                        }
                        for m in members
                    ],
                }
            )
    result.sort(key=lambda g: g["name"])
    if as_json:
        echo_json({"topic": topic, "groups": result})
        return
    if not result:
        click.echo(f"topic {topic!r} has no consumer groups")
        return
    _table(
        f"Groups of {topic!r}",
        ["group", "members", "pending", "lag", "last delivered id"],
        [
            (g["name"], g["consumers"], g["pending"], g["lag"], g["last_delivered_id"])
            for g in result
        ],
    )
    _table(
        "Members",
        ["group", "consumer", "pending", "idle (s)", "inactive (s)"],
        [
            (
                g["name"],
                m["name"],
                m["pending"],
                m["idle_ms"] / 1000,
                None
                if m["inactive_ms"] is None or m["inactive_ms"] < 0
                else m["inactive_ms"] / 1000,
            )
            for g in result
            for m in g["members"]
        ],
    )


# -- work queues ------------------------------------------------------------------------


async def _queue(s: Session, name: str) -> Queue[Any]:
    return (await registered_queues(s, [name]))[0]


def _queues_table(found: Sequence[QueueStats]) -> None:
    _table(
        "Queues",
        [
            "queue",
            "waiting (by priority)",
            "scheduled",
            "processing",
            "workers",
            "dead letters",
            "oldest wait (s)",
            "started/s",
            "finished/s",
            "failed/s",
        ],
        [
            (
                q.name,
                " / ".join(str(n) for n in q.waiting),
                q.scheduled,
                q.processing,
                q.workers,
                q.dead_letters,
                None if q.oldest_waiting_age is None else round(q.oldest_waiting_age, 1),
                round(q.started_per_s, 1),
                round(q.finished_per_s, 1),
                round(q.failed_per_s, 1),
            )
            for q in found
        ],
    )


async def queues(url: str | None, prefix: str, names: Sequence[str], as_json: bool) -> None:
    async with session(url, prefix) as s:
        found = await registered_queues(s, names)
        stats = (await s.bus.stats(*found)).queues if found else ()
    if as_json:
        echo_json([queue_json(q) for q in stats])
        return
    if not stats:
        click.echo(f"no work queues under prefix {prefix!r}")
        return
    _queues_table(stats)


def _job_dead_letter_json(d: JobDeadLetter, *, full: bool) -> dict[str, Any]:
    try:
        data: Any = orjson.loads(d.job)
    except orjson.JSONDecodeError:
        data = d.job.decode(errors="replace")
    if isinstance(data, dict) and "eventbus" in data and "data" in data:
        data = data["data"]
    doc: dict[str, Any] = {
        "id": d.id,
        "job_id": d.job_id,
        "queue": d.queue,
        "level": d.level,
        "worker": d.worker,
        "attempts": d.attempts,
        "reason": d.reason,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "failed_at": d.failed_at,
        "data": data,
    }
    if full:
        doc["traceback"] = d.traceback
        doc["job"] = d.job.decode(errors="replace")
    return doc


# -- dead letters ---------------------------------------------------------------------


def _dead_letter_json(s: Session, d: DeadLetter, *, full: bool) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": d.id,
        "event_id": d.event_id,
        "topic": d.topic,
        "original_id": d.original_id,
        "group": d.group,
        "consumer": d.consumer,
        "attempts": d.attempts,
        "reason": d.reason,
        "error_type": d.error_type,
        "error_message": d.error_message,
        "failed_at": d.failed_at,
        "data": _decoded(s, d.topic, d.envelope),
        "replayable": d.envelope is not None,
    }
    if full:
        doc["traceback"] = d.traceback
        doc["raw"] = d.raw
    return doc


async def dlq_list(
    url: str | None,
    prefix: str,
    topic: str,
    count: int,
    after: str | None,
    as_json: bool,
    is_queue: bool = False,
) -> None:
    if is_queue:
        async with session(url, prefix) as s:
            queue = await _queue(s, topic)
            jobs = await s.bus.dead_letters(queue, count=count, after=after)
        job_docs = [_job_dead_letter_json(d, full=False) for d in jobs]
        if as_json:
            echo_json(job_docs)
            return
        if not job_docs:
            click.echo(f"no dead letters in queue {topic!r}")
            return
        _table(
            f"Dead letters of queue {topic!r}",
            ["id", "job id", "reason", "attempts", "failed at", "error", "job"],
            [
                (
                    d["id"],
                    d["job_id"],
                    d["reason"],
                    d["attempts"],
                    d["failed_at"],
                    _preview(f"{d['error_type']}: {d['error_message']}" if d["error_type"] else ""),
                    _preview(dumps(d["data"])),
                )
                for d in job_docs
            ],
        )
        return
    async with session(url, prefix) as s:
        letters = await s.bus.dead_letters(Topic(topic, durable=True), count=count, after=after)
        docs = [_dead_letter_json(s, d, full=False) for d in letters]
    if as_json:
        echo_json(docs)
        return
    if not docs:
        click.echo(f"no dead letters in topic {topic!r}")
        return
    _table(
        f"Dead letters of {topic!r}",
        ["id", "event id", "group", "reason", "attempts", "failed at", "error"],
        [
            (
                d["id"],
                d["event_id"],
                d["group"],
                d["reason"],
                d["attempts"],
                d["failed_at"],
                _preview(f"{d['error_type']}: {d['error_message']}" if d["error_type"] else ""),
            )
            for d in docs
        ],
    )


async def dlq_show(
    url: str | None, prefix: str, topic: str, dlq_id: str, as_json: bool, is_queue: bool = False
) -> None:
    if is_queue:
        async with session(url, prefix) as s:
            queue = await _queue(s, topic)
            dead = queue_keys(s.prefix, queue.name, queue.priorities).dead
            entries = await s.redis(
                s.client.xrange(dead, min=dlq_id, max=dlq_id, count=1),
                command="XRANGE",
                topic=topic,
            )
            if not entries:
                raise click.ClickException(f"no dead letter {dlq_id!r} in queue {topic!r}")
            job_doc = _job_dead_letter_json(read_job_dead_letter(topic, *entries[0]), full=True)
        if as_json:
            echo_json(job_doc)
            return
        for key in (
            "id", "job_id", "queue", "level", "worker", "attempts", "reason", "failed_at",
            "error_type", "error_message",
        ):  # fmt: skip
            click.echo(f"{key + ':':<15}{_cell(job_doc[key])}")
        click.echo(f"{'job:':<15}{job_doc['job']}")
        if job_doc["traceback"]:
            click.echo("traceback:")
            click.echo(job_doc["traceback"].rstrip())
        return
    async with session(url, prefix) as s:
        dlq = topic_keys(s.prefix, topic).dlq
        entries = await s.redis(
            s.client.xrange(dlq, min=dlq_id, max=dlq_id, count=1), command="XRANGE", topic=topic
        )
        if not entries:
            raise click.ClickException(f"no dead letter {dlq_id!r} in topic {topic!r}")
        entry_id, fields = entries[0]
        doc = _dead_letter_json(s, read_dead_letter(entry_id, fields), full=True)
    if as_json:
        echo_json(doc)
        return
    for key in (
        "id", "event_id", "topic", "original_id", "group", "consumer", "attempts", "reason",
        "failed_at", "error_type", "error_message", "replayable",
    ):  # fmt: skip
        click.echo(f"{key + ':':<15}{_cell(doc[key])}")
    click.echo(f"{'data:':<15}{dumps(doc['data']) if doc['replayable'] else '-'}")
    if doc["raw"] is not None:
        click.echo(f"{'raw:':<15}{_cell(doc['raw'])}")
    if doc["traceback"]:
        click.echo("traceback:")
        click.echo(doc["traceback"].rstrip())


async def _all_dead_letter_ids(s: Session, t: Topic[Any]) -> list[str]:
    ids: list[str] = []
    after = None
    while True:
        page = await s.bus.dead_letters(t, count=1000, after=after)
        ids += [d.id for d in page]
        if len(page) < 1000:
            return ids
        after = page[-1].id


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def dlq_replay(
    url: str | None,
    prefix: str,
    topic: str,
    ids: Sequence[str],
    as_json: bool,
    is_queue: bool = False,
) -> None:
    if is_queue:
        async with session(url, prefix) as s:
            queue = await _queue(s, topic)
            requeued = await s.bus.replay_dead_letters(queue, list(ids) or None)
        if as_json:
            echo_json({"queue": topic, "replayed": requeued})
        else:
            click.echo(f"put {requeued} dead job(s) back on queue {topic!r}")
        return
    async with session(url, prefix) as s:
        t = Topic(topic, durable=True)
        todo = list(ids) or await _all_dead_letter_ids(s, t)
        replayed = 0
        with _progress(len(todo), f"replaying dead letters of {topic!r}") as advance:
            for chunk in _chunks(todo, _REPLAY_CHUNK):
                replayed += await s.bus.replay_dead_letters(t, chunk)
                advance(len(chunk))
    skipped = len(todo) - replayed
    if as_json:
        echo_json({"topic": topic, "replayed": replayed, "skipped": skipped})
        return
    click.echo(f"replayed {replayed} dead letter(s) into topic {topic!r}")
    if skipped:
        note(
            f"eventbus: {skipped} not replayed: undecodable (nothing to publish),"
            " or not in the dead-letter stream"
        )


async def dlq_purge(
    url: str | None,
    prefix: str,
    topic: str,
    ids: Sequence[str],
    yes: bool,
    as_json: bool,
    is_queue: bool = False,
) -> None:
    async with session(url, prefix) as s:
        t: Any = Topic(topic, durable=True)
        dlq = topic_keys(s.prefix, topic).dlq
        if is_queue:
            t = await _queue(s, topic)
            dlq = queue_keys(s.prefix, t.name, t.priorities).dead
        total = len(ids) or int(await s.redis(s.client.xlen(dlq), command="XLEN", topic=topic))
        if not total:
            if as_json:
                echo_json({"topic": topic, "purged": 0})
            else:
                click.echo(f"no dead letters in topic {topic!r}")
            return
        if not yes:
            what = f"{total} dead letter(s)" if ids else f"all {total} dead letter(s)"
            question = f"Delete {what} of topic {topic!r}? This cannot be undone"
            if not await anyio.to_thread.run_sync(
                lambda: click.confirm(question, default=False, err=True)
            ):
                raise click.ClickException("nothing purged")
        if not ids:
            purged = await s.bus.purge_dead_letters(t)  # one atomic DEL, and the counts
        else:
            purged = 0
            with _progress(total, f"purging dead letters of {topic!r}") as advance:
                for chunk in _chunks(list(ids), _PURGE_CHUNK):
                    purged += await s.bus.purge_dead_letters(t, chunk)
                    advance(len(chunk))
    if as_json:
        echo_json({"topic": topic, "purged": purged})
    else:
        click.echo(f"purged {purged} dead letter(s) of topic {topic!r}")


# -- delayed and recurring events ------------------------------------------------------


async def scheduled_list(
    url: str | None, prefix: str, topic: str | None, count: int, as_json: bool
) -> None:
    async with session(url, prefix) as s:
        names = [topic] if topic else await delayed_topics(s.client, s.prefix)
        pending = []
        for name in names:
            pending += await pending_delayed(s.client, s.prefix, s.codec, name, count=count)
    pending.sort(key=lambda p: p.due)
    pending = pending[:count]
    if as_json:
        echo_json(
            [
                {
                    "id": p.id,
                    "topic": p.topic,
                    "due": p.due,
                    "durable": p.durable,
                    "headers": p.headers,
                    "data": p.data,
                }
                for p in pending
            ]
        )
        return
    if not pending:
        click.echo("no delayed events pending" + (f" in topic {topic!r}" if topic else ""))
        return
    _table(
        "Delayed events",
        ["id", "topic", "kind", "due", "event"],
        [
            (p.id, p.topic, "durable" if p.durable else "live", p.due, _preview(p.data))
            for p in pending
        ],
    )


async def scheduled_cancel(
    url: str | None, prefix: str, event_id: str, topic: str | None, as_json: bool
) -> None:
    async with session(url, prefix) as s:
        cancelled = await s.bus.cancel(event_id, topic=topic)
    if as_json:
        echo_json({"id": event_id, "cancelled": cancelled})
    elif cancelled:
        click.echo(f"cancelled {event_id}")
    if not cancelled:
        raise click.ClickException(
            f"delayed event {event_id!r} is not pending: released, cancelled, or never scheduled"
        )


def _schedule_json(sch: Any) -> dict[str, Any]:
    return {
        "name": sch.name,
        "topic": sch.topic,
        "every": sch.every,
        "cron": sch.cron,
        "tz": sch.tz,
        "catch_up": sch.catch_up,
        "next_due": sch.next_due,
        "last_release": sch.last_release,
    }


def _schedules_table(schedules: Sequence[Any]) -> None:
    _table(
        "Recurring events",
        ["name", "topic", "every / cron", "tz", "catch up", "next due", "last release"],
        [
            (
                sch.name,
                sch.topic,
                sch.every if sch.every is not None else sch.cron,
                sch.tz,
                sch.catch_up,
                sch.next_due,
                sch.last_release,
            )
            for sch in schedules
        ],
    )


async def schedules_list(url: str | None, prefix: str, as_json: bool) -> None:
    async with session(url, prefix) as s:
        schedules = await s.bus.schedules()
    if as_json:
        echo_json([_schedule_json(sch) for sch in schedules])
    elif schedules:
        _schedules_table(schedules)
    else:
        click.echo(f"no recurring events under prefix {prefix!r}")


async def schedules_remove(url: str | None, prefix: str, name: str, as_json: bool) -> None:
    async with session(url, prefix) as s:
        removed = await s.bus.unschedule(name)
    if as_json:
        echo_json({"name": name, "removed": removed})
    elif removed:
        click.echo(f"removed recurring event {name!r}")
    if not removed:
        raise click.ClickException(f"no recurring event named {name!r}")


async def top(url: str | None, prefix: str, interval: float, once: bool) -> None:
    from ._top import top as draw

    await draw(url, prefix, interval, once)
