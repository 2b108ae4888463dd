"""Claiming for one consumer-group member: heartbeat its own entries, take over others'.

Every ``claim.interval``, a member's :class:`Claimer`:

* heartbeats: resets the idle time of the entries the member holds (``XCLAIM
  ... JUSTID`` to itself), so a live member's slow handler or long prefetch queue
  is never taken by others; only a crashed or hung member stops doing this;
* claims: follows the ``XAUTOCLAIM`` cursor over entries idle past ``claim.idle``
  (those of crashed or hung members), and hands them to the member, first in line;
* sweeps, at most every ``claim.idle``: removes from the group the consumers idle
  past ten times ``claim.idle`` with nothing pending and no lease on their name
  (members that crashed, or ran under a name that is never used again), so
  ``XINFO CONSUMERS`` does not grow with every restart.

Delivery counts come from Redis (``XPENDING``), never from memory: they survive
crashes. The claimer knows the member only through :class:`ClaimHost`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, Protocol

import anyio
import redis.exceptions as rex

from .._config import ClaimPolicy
from .._connection import CONNECTION_ERRORS, is_nogroup
from .._keys import TopicKeys
from .._stats import ConsumerCounters
from ._entry import Work
from ._ids import id_key

__all__ = ["ClaimHost", "Claimer"]

logger = logging.getLogger("eventbus")

_CLAIM_CALLS_PER_TICK: Final = 10
_HEARTBEAT_CHUNK: Final = 500
STALE_FACTOR: Final = 10
"""A consumer idle past this many times ``claim.idle``, with nothing pending and no
lease, is stale: a live member removes it from the group."""
_SWEEP_MAX: Final = 100
"""Stale consumers removed per sweep at most (the next sweep takes the rest)."""


class ClaimHost(Protocol):
    """What a :class:`Claimer` needs of the member it claims for."""

    def holds(self, entry_id: str) -> bool:
        """Whether the member holds ``entry_id`` (buffered, running, retrying, acking)."""

    def heartbeat_ids(self) -> list[str]:
        """The ids to keep alive: held, except those waiting out a retry's backoff
        (their idle time lets the retry's ``XCLAIM`` find them unclaimed)."""

    def claim_space(self) -> int:
        """How many entries the member can take now without exceeding its buffer."""

    def add_claimed(self, work: Work) -> None:
        """Take a claimed entry, to be handled before those read."""

    async def retry_times(self, ids: list[str]) -> dict[str, float]:
        """Seconds each of ``ids`` must still wait for a long retry noted in Redis."""

    def add_deferred(self, work: Work, wait: float) -> None:
        """Take a claimed entry that waits out a long retry: run it in ``wait`` seconds."""

    async def count_trimmed(self, ids: list[str]) -> None:
        """Report pending entries that were trimmed before they were handled, and
        clear what they left in Redis (their retry time, a 6.2 pending entry)."""


class Claimer:
    """The claim and heartbeat loop of one group member (see the module doc)."""

    def __init__(
        self,
        *,
        client: Any,
        keys: TopicKeys,
        group: str,
        consumer: str,
        policy: ClaimPolicy,
        batch: int,
        host: ClaimHost,
        counters: ConsumerCounters,
        remove: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._group = group
        self._consumer = consumer
        self._policy = policy
        self._batch = batch
        self._host = host
        self._counters = counters
        self._scope = anyio.CancelScope()
        self._stopping = False
        self._last_heartbeat = time.monotonic()
        self._cursor = "0-0"
        self._remove = remove
        self._last_sweep = time.monotonic()

    def stop(self) -> None:
        """End :meth:`run` (at once, even mid-call: a claim pass is safe to cut)."""
        self._stopping = True
        self._scope.cancel()

    async def run(self) -> None:
        """Heartbeat and claim every ``policy.interval`` until :meth:`stop`."""
        with self._scope:
            while not self._stopping:
                await anyio.sleep(self._policy.interval)
                try:
                    await self._heartbeat()
                    await self._claim_pass()
                    await self._sweep()
                except rex.ResponseError as exc:
                    # NOGROUP: the member's reader recreates the group.
                    if not is_nogroup(exc):
                        logger.warning("group %r: claim failed: %s", self._group, exc)
                except CONNECTION_ERRORS as exc:
                    logger.debug("group %r: claim failed: %s", self._group, exc)

    async def _heartbeat(self) -> None:
        """Reset the idle time of entries the member holds, at most every third of
        ``policy.idle``. ``JUSTID`` leaves delivery counts alone; entries other
        members claimed meanwhile are left to them."""
        now = time.monotonic()
        if now - self._last_heartbeat < self._policy.idle / 3:
            return
        self._last_heartbeat = now
        ids = self._host.heartbeat_ids()
        if not ids:
            return
        held = set(ids)
        mine = [i for i in await self._counts(ids, slack=1000) if i in held]
        # min-idle: an entry another member claimed since the XPENDING above has
        # just had its idle time reset, and is left to that member.
        min_idle = int(self._policy.idle * 1000 / 6)
        for i in range(0, len(mine), _HEARTBEAT_CHUNK):
            await self._client.xclaim(
                self._keys.stream,
                self._group,
                self._consumer,
                min_idle,
                mine[i : i + _HEARTBEAT_CHUNK],
                justid=True,
            )

    async def _claim_pass(self) -> None:
        """Follow the XAUTOCLAIM cursor for up to ``_CLAIM_CALLS_PER_TICK`` calls."""
        host = self._host
        min_idle = int(self._policy.idle * 1000)
        # At least a batch per pass, even over a full buffer: a crashed member's
        # entries are already late, and they go to the front of the queue.
        budget = max(host.claim_space(), self._batch)
        for _ in range(_CLAIM_CALLS_PER_TICK):
            space = budget
            if space <= 0:
                return
            reply = await self._client.xautoclaim(
                self._keys.stream,
                self._group,
                self._consumer,
                min_idle,
                self._cursor,
                count=min(self._policy.count, space),
            )
            # Redis >= 7 adds the ids it found deleted (trimmed); 6.2 returns two
            # elements and hands deleted entries back with no fields.
            cursor, entries = reply[0], reply[1]
            deleted = reply[2] if len(reply) > 2 else []
            self._cursor = cursor.decode()
            if deleted:
                await host.count_trimmed([d.decode() for d in deleted])
            fresh = [
                (e.decode(), f) for e, f in entries if e is not None and not host.holds(e.decode())
            ]
            if fresh:
                counts = await self._counts([e for e, _ in fresh])
                waits = await host.retry_times([e for e, f in fresh if f])
                self._counters.claimed += len(fresh)
                budget -= len(fresh)
                for entry_id, fields in reversed(fresh):
                    if not fields:
                        await host.count_trimmed([entry_id])
                        continue
                    work = Work(entry_id, fields, counts.get(entry_id, 1))
                    if entry_id in waits:
                        host.add_deferred(work, waits[entry_id])  # its member died mid-backoff
                    else:
                        host.add_claimed(work)
            if self._cursor == "0-0":
                return

    async def _sweep(self) -> None:
        """Remove stale consumers of the group (see the module doc), at most every
        ``policy.idle``. The idle time comes from ``XINFO CONSUMERS``; the removal
        itself (``CONSUMER_REMOVE``) checks again, atomically, that nothing is pending
        and that no member holds the name, so a live member is never removed."""
        if self._remove is None:
            return
        now = time.monotonic()
        if now - self._last_sweep < self._policy.idle:
            return
        self._last_sweep = now
        stale_ms = self._policy.idle * 1000 * STALE_FACTOR
        rows = await self._client.xinfo_consumers(self._keys.stream, self._group)
        removed = 0
        for row in rows:
            name = row["name"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name == self._consumer or int(row["pending"]) or int(row["idle"]) < stale_ms:
                continue
            if await self._remove(name):
                removed += 1
                logger.info(
                    "group %r: removed stale consumer %r (idle %.0fs, nothing pending)",
                    self._group,
                    name,
                    int(row["idle"]) / 1000,
                )
            if removed >= _SWEEP_MAX:
                return

    async def _counts(self, ids: list[str], *, slack: int = 100) -> dict[str, int]:
        """Redis's delivery counts of those of ``ids`` still pending with this consumer
        (one XPENDING over their range, reading up to ``slack`` other entries in it)."""
        first, last = min(ids, key=id_key), max(ids, key=id_key)
        pending = await self._client.xpending_range(
            self._keys.stream,
            self._group,
            min=first,
            max=last,
            count=len(ids) + slack,
            consumername=self._consumer,
        )
        return {p["message_id"].decode(): int(p["times_delivered"]) for p in pending}
