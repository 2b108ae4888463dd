"""Per-process reports: the counters that live only in a process (its subscribers'
drops and gaps, its group members' and queue workers' tallies), written now and
then to one Redis hash so that a look from outside (``eventbus top``) sees them.

One field per process, ``<host>:<pid>``, its value one JSON object::

    {"id": "web-1:4242", "host": "web-1", "pid": 4242,
     "at": 1767225600.25,          # the Redis server's clock when written
     "interval": 2.0,              # seconds between reports
     "subscriptions": [{"topic", "kind", "name", "received", "delivered",
                        "dropped", "buffered", "buffer_size", "gaps", "missed",
                        "reconnects", "errors"}],   # at most MAX_ROWS, worst first
     "totals": {"subscriptions", "received", "delivered", "dropped", "buffered",
                "gaps", "missed", "errors"},    # over all of them
     "consumers": [{"group", "consumer", "topic", "handled", "failed", ...}],
     "workers": [{"queue", "worker", "running", "started", "finished", ...}]}

A report is one ``TIME`` and one ``HSET`` (with an ``EXPIRE`` of the hash): cheap,
and nothing is written unless the bus was asked to report (``report_every=``,
or served by ``bus.serve()`` / ``eventbus run``). A reader ignores a report older
than ``STALE_AFTER`` of its intervals, and deletes it (its process is gone, or
stopped reporting); a process that stops reporting deletes its own field.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from contextlib import suppress
from typing import Any, Final

import anyio

__all__ = [
    "MAX_ROWS",
    "STALE_AFTER",
    "process_field",
    "read_reports",
    "report_loop",
]

logger = logging.getLogger("eventbus")

STALE_AFTER: Final = 3
"""A report older than this many of its intervals is ignored (and deleted)."""
MAX_ROWS: Final = 50
"""Subscriptions listed per report (those with the most drops and gaps first);
``totals`` count them all."""
_KEY_TTL_MIN: Final = 60.0
"""The hash expires this long (at least) after the last report of any process."""


def process_field() -> str:
    """This process's field: ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def _server_time(client: Any) -> float:
    seconds, micros = await client.time()
    return int(seconds) + int(micros) / 1_000_000


async def report_loop(
    client: Any, key: str, interval: float, collect: Callable[[], dict[str, Any]]
) -> None:
    """Write ``collect()`` (with ``id``, ``host``, ``pid``, ``at`` and ``interval``)
    to field ``<host>:<pid>`` of hash ``key`` every ``interval`` seconds, until
    cancelled; then delete the field (shielded, for at most a second).

    A failed write is logged at debug level and tried again at the next interval:
    reports are for looking, never a reason for the bus to stop."""
    field = process_field()
    host, _, pid = field.rpartition(":")
    ttl = max(_KEY_TTL_MIN, STALE_AFTER * interval)
    try:
        while True:
            try:
                report = collect()
                report.update(
                    id=field, host=host, pid=int(pid), interval=interval,
                    at=await _server_time(client),
                )  # fmt: skip
                async with client.pipeline(transaction=False) as pipe:
                    pipe.hset(key, field, json.dumps(report, separators=(",", ":")))
                    pipe.expire(key, int(ttl) + 1)
                    await pipe.execute()
            except Exception as exc:  # Redis away, refused (ACL): try again later
                logger.debug("eventbus: process report not written: %s", exc)
            await anyio.sleep(interval)
    finally:
        # Gone with the server, or refused: the field goes stale and the hash expires.
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0), suppress(Exception):
            await client.hdel(key, field)


async def read_reports(client: Any, key: str, now: float) -> list[dict[str, Any]]:
    """The current reports in hash ``key`` (by field), ``now`` the Redis clock;
    reports older than ``STALE_AFTER`` intervals, and unreadable ones, are
    deleted and left out. Each gets ``age``: seconds since it was written."""
    found = await client.hgetall(key)
    reports = []
    stale = []
    for raw_field, raw in sorted(found.items()):
        try:
            report = json.loads(raw)
            age = now - float(report["at"])
            fresh = age <= STALE_AFTER * float(report["interval"])
        except (ValueError, KeyError, TypeError):
            fresh = False
        if not fresh:
            stale.append(raw_field)
            continue
        report["age"] = max(age, 0.0)
        reports.append(report)
    if stale:
        await client.hdel(key, *stale)
    return reports
