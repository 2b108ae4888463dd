"""One look at everything a prefix holds in Redis, as plain JSON-ready data: what
``eventbus top`` draws and ``eventbus dashboard`` serves.

A snapshot holds counts and totals; rates are the difference of two snapshots
(:func:`rates`), so the one who looks twice computes them, and nothing runs in the
services to produce them. Every figure is read from Redis: the counters that live
only in a process (a subscriber's drops and gaps) are here only as the reports
that processes write (``processes``, below).

Shape (every time a float of epoch seconds, every duration in seconds)::

    {
      "at": 1767225600.25,                  # the Redis server's clock
      "prefix": "eb",
      "topics": [{"name", "length", "added", "last_id", "dead_letters",
                  "groups": [{"name", "consumers", "pending", "lag", "read",
                              "oldest_pending_age", "dead_letters"}]}],
      "queues": [{"name", "waiting": [...], "length", "scheduled", "processing",
                  "workers", "dead_letters", "oldest_waiting_age", "started",
                  "finished", "failed", "started_per_s", "finished_per_s",
                  "failed_per_s"}],
      "delayed": {"pending", "next_due_in", "overdue_by",
                  "topics": [{"name", "pending", "next_due_in"}]},
      "schedules": [{"name", "topic", "next_due_in", "last_released_ago"}],
      "processes": [{"id", "host", "pid", "at", "age", "interval", "subscriptions",
                     "totals", "consumers", "workers"}],
    }

``added`` (entries ever added to the stream) and a group's ``read`` (entries
delivered to it) need Redis 7.0; they are ``None`` before it. ``overdue_by``: how
long the earliest delayed event has been due and not released (0 when nothing is
late): the schedulers' lateness, seen from outside.

``processes``: the reports of the processes that write them (buses served by
``bus.serve()`` / ``eventbus run``, or with ``report_every=``): the counters that
live only in a process, such as a subscriber's drops and gaps; shape in
``eventbus._procs``. Stale reports are left out (and deleted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._delayed._pending import delayed_topics
from .._keys import process_reports, schedule_target
from .._procs import read_reports
from .._topic import Topic
from ._reads import durable_topics, group_json, queue_json, registered_queues
from ._session import Session

__all__ = ["rates", "snapshot"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(reply: Any) -> dict[str, Any]:
    """An ``XINFO`` reply (RESP2 flat list or RESP3 map) as a dict of str keys."""
    if isinstance(reply, Mapping):
        return {_text(k): v for k, v in reply.items()}
    items = list(reply)
    return {_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


async def _stream_counters(s: Session, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per topic: entries ever added, and per group the entries read (Redis 7+)."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        key = f"{s.prefix}:{{{name}}}:stream"
        try:
            stream = _info(await s.client.execute_command("XINFO", "STREAM", key))
            groups = [_info(g) for g in await s.client.execute_command("XINFO", "GROUPS", key)]
        except Exception:  # gone meanwhile, or not a stream: no counters
            continue
        added = stream.get("entries-added")
        out[name] = {
            "added": None if added is None else int(added),
            "read": {
                _text(g.get("name")): (
                    None if g.get("entries-read") is None else int(g["entries-read"])
                )
                for g in groups
            },
        }
    return out


async def snapshot(s: Session) -> dict[str, Any]:
    """Everything under ``s.prefix``, read from Redis now (see the module doc)."""

    seconds_, micros = await s.client.time()
    now = int(seconds_) + int(micros) / 1_000_000
    names = await durable_topics(s)
    found = await s.bus.stats(*(Topic(n, durable=True) for n in names)) if names else None
    counters = await _stream_counters(s, names)
    topics = []
    for t in found.topics if found is not None else ():
        c = counters.get(t.name, {"added": None, "read": {}})
        topics.append(
            {
                "name": t.name,
                "length": t.length,
                "added": c["added"],
                "last_id": t.last_id,
                "dead_letters": t.dead_letters,
                "groups": [group_json(g, read=c["read"].get(g.name)) for g in t.groups],
            }
        )
    queue_list = await registered_queues(s, ())
    queue_stats = (await s.bus.stats(*queue_list)).queues if queue_list else ()
    members = await delayed_topics(s.client, s.prefix)
    delayed_rows = []
    total = 0
    earliest: float | None = None
    for member in members:
        target = schedule_target(s.prefix, member)
        async with s.client.pipeline(transaction=False) as pipe:
            pipe.zcard(target.delayed)
            pipe.zrange(target.delayed, 0, 0, withscores=True)
            pending, first = await pipe.execute()
        if not pending:
            continue
        due = first[0][1] / 1000 if first else None
        total += int(pending)
        if due is not None:
            earliest = due if earliest is None else min(earliest, due)
        delayed_rows.append(
            {
                "name": member,
                "pending": int(pending),
                "next_due_in": None if due is None else due - now,
            }
        )
    schedules = [
        {
            "name": sch.name,
            "topic": sch.topic,
            "next_due_in": None if sch.next_due is None else sch.next_due.timestamp() - now,
            "last_released_ago": (
                None if sch.last_release is None else now - sch.last_release.timestamp()
            ),
        }
        for sch in await s.bus.schedules()
    ]
    return {
        "at": now,
        "prefix": s.prefix,
        "topics": topics,
        "queues": [queue_json(q) for q in queue_stats],
        "delayed": {
            "pending": total,
            "next_due_in": None if earliest is None else earliest - now,
            "overdue_by": 0.0 if earliest is None else max(now - earliest, 0.0),
            "topics": delayed_rows,
        },
        "schedules": schedules,
        "processes": await read_reports(s.client, process_reports(s.prefix), now),
    }


def rates(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """Per second between two snapshots: each topic's publish rate (``added``, else
    its length) and each group's consume rate (``read``); ``{"topics": {name: rate},
    "groups": {(topic, group) as "topic/group": rate}}``. Missing: not in both."""
    span = float(after["at"]) - float(before["at"])
    out: dict[str, dict[str, float]] = {"topics": {}, "groups": {}}
    if span <= 0:
        return out
    old = {t["name"]: t for t in before["topics"]}
    for topic in after["topics"]:
        prev = old.get(topic["name"])
        if prev is None:
            continue
        key = "added" if topic["added"] is not None and prev["added"] is not None else "length"
        out["topics"][topic["name"]] = max(topic[key] - prev[key], 0) / span
        prev_groups = {g["name"]: g for g in prev["groups"]}
        for group in topic["groups"]:
            p = prev_groups.get(group["name"])
            if p is None or group["read"] is None or p["read"] is None:
                continue
            out["groups"][f"{topic['name']}/{group['name']}"] = (
                max(group["read"] - p["read"], 0) / span
            )
    return out
