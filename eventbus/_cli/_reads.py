"""What several commands read from Redis and how they show it: the durable topics
and the registered queues of a prefix, a group's and a queue's figures as JSON.
Shared by ``_commands`` and ``_snapshot`` (so that neither imports the other)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from .._keys import queue_registry
from .._queues import Queue
from .._stats import GroupStats, QueueStats
from ._session import Session, note

__all__ = ["durable_topics", "group_json", "queue_json", "registered_queues"]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def durable_topics(s: Session) -> list[str]:
    head, tail_ = f"{s.prefix}:{{", "}:stream"
    names = set()
    async for key in s.client.scan_iter(match=f"{head}*{tail_}", count=1000, _type="stream"):
        text = key.decode() if isinstance(key, bytes) else str(key)
        if text.startswith(head) and text.endswith(tail_):
            names.add(text[len(head) : -len(tail_)])
    return sorted(names)


async def registered_queues(s: Session, names: Sequence[str]) -> list[Queue[Any]]:
    """The queues registered under the prefix (their priorities and rate), by name;
    ``names``: only these (an unregistered one as a plain one-level queue)."""
    registry = await s.redis(
        s.client.hgetall(queue_registry(s.prefix)), command="HGETALL", topic=None
    )
    settings = {_text(k): v for k, v in registry.items()}
    found = []
    for name in list(names) or sorted(settings):
        priorities, rate = 1, None
        raw = settings.get(name)
        if raw is not None:
            try:
                doc = orjson.loads(raw)
                priorities = int(doc.get("priorities") or 1)
                if doc.get("rate"):
                    rate = (int(doc["rate"][0]), float(doc["rate"][1]))
            except (orjson.JSONDecodeError, TypeError, ValueError, KeyError, IndexError):
                note(f"eventbus: queue {name!r} has unreadable settings in the registry")
        found.append(Queue(name, priorities=priorities, rate=rate))
    return found


def group_json(g: GroupStats, **extra: Any) -> dict[str, Any]:
    """A consumer group's figures as ``stats --json``, the snapshot and the
    dashboard give them (``extra``: fields one of them adds)."""
    return {
        "name": g.name,
        "consumers": g.consumers,
        "pending": g.pending,
        "lag": g.lag,
        "oldest_pending_age": g.oldest_pending_age,
        "last_delivered_id": g.last_delivered_id,
        "dead_letters": g.dead_letters,
        **extra,
    }


def queue_json(q: QueueStats) -> dict[str, Any]:
    return {
        "name": q.name,
        "waiting": list(q.waiting),
        "length": q.length,
        "scheduled": q.scheduled,
        "processing": q.processing,
        "workers": q.workers,
        "dead_letters": q.dead_letters,
        "oldest_waiting_age": q.oldest_waiting_age,
        "started": q.started,
        "finished": q.finished,
        "failed": q.failed,
        "started_per_s": q.started_per_s,
        "finished_per_s": q.finished_per_s,
        "failed_per_s": q.failed_per_s,
    }
