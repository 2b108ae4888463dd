"""Delayed events: held in Redis, released on time by any number of schedulers, once.

``publish(topic, event, delay=...)`` (or ``at=``) stores the event, encoded as it
will be released, in the topic's schedule: a sorted set scored by due time and a
hash of the events (``_keys``: ``{prefix}:{<topic>}:delayed`` and
``...:delayed-data``). One script does it (``DELAYED_SCHEDULE``), and it reads the
due time off the Redis server's clock (``TIME``), so the clocks of the hosts
involved never matter: not at scheduling, not at release.

Any bus can run the scheduler (``EventBus(scheduler=...)``). It sleeps until the
earliest due time of all topics (an index: ``{prefix}:delayed``, topics scored by
their earliest due time), and is woken early through the bus's push connection
when any process schedules an earlier event (``{prefix}:delayed:wake``). Each
release is one script call per topic (``DELAYED_RELEASE``) moving at most
``_RELEASE_BATCH`` due events: each written to the topic first (``XADD``, or ``PUBLISH``
for a live topic), then removed from the schedule, so a failure never loses one;
and since a script runs alone, schedulers racing for the same events release each
exactly once. A backlog drains in such calls, back to back, ``_RELEASE_PIPELINE``
of them per round trip.

Several schedulers do not all race for every due time, though: one of them holds
a lease (``_lease``: ``{prefix}:delayed:lease``) and releases on time, the others
stand by and release only what it leaves overdue by more than ``STANDBY_LAG``,
and take the lease when it lapses. The lease makes releases punctual, never
exact: that is the scripts' work.

Why one module past 600 lines: it is one scheduler, one concept. Scheduling,
cancelling, declaring recurring events and the release loop share the same
state (the server clock as last seen, the scripts, the queue of schedule calls,
the topics backed off), and the loop releases both kinds of event in each round;
what stands alone (the occurrences of a recurring event) is in ``_recurring``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import redis.exceptions as rex

from .._connection import translate
from .._envelope import Receipt
from .._feature import FeatureContext, receipt
from .._hub import Receiver
from .._keys import (
    NUDGE,
    delayed_index,
    delayed_lease,
    delayed_wake,
    live_channel,
    queue_keys,
    recurring_keys,
    schedule_target,
    topic_keys,
)
from .._scripts import (
    DELAYED_CANCEL,
    DELAYED_RELEASE,
    DELAYED_SCHEDULE,
    RECURRING_DECLARE,
    RECURRING_FIRE,
)
from .._stats import DelayedStatistics
from .._topic import Topic
from ..errors import ConfigurationError, EventBusError, PermissionDenied
from ._lease import SchedulerLease
from ._recurring import Recurrence, ScheduleInfo, occurrence_id

__all__ = ["DelayedFeature", "due_args"]

logger = logging.getLogger("eventbus")

_RELEASE_BATCH: Final = 250
"""Due events one release call moves at most: 2-2.5 ms of Redis time here (7-10 us
an event: parse, XADD, and its share of one HMGET, HDEL and ZREM), so a backlog
never holds Redis for long."""
_RELEASE_PIPELINE: Final = 4
"""Release calls sent in one round trip for a topic whose last call found a full
batch (a backlog): the round trip, not Redis, would otherwise set the pace. Each
call is still its own script run; Redis runs the few of them back to back."""
_SCHEDULE_BATCH: Final = 500
"""Events one schedule call holds at most (HSET and ZADD each: a few milliseconds
of Redis time); a larger batch is several calls in one pipeline."""
_INDEX_PEEK: Final = 64
"""Topics read from the index per round, earliest due first."""
_MAX_SLEEP: Final = 5.0
"""Longest sleep between two looks at the index. Wake messages make it rarely
matter; it bounds the delay if one is lost while the push connection reconnects."""
_YIELD: Final = 0.003
"""Without the lease (an ACL refused its key): a scheduler that lost the last race
leaves the events due in the last 3 ms to the one that won, which releases them
on time; if that one died, this one releases them 3 ms late."""
_RETRY_MIN: Final = 0.1
_RETRY_MAX: Final = 5.0

Wake = Callable[[str, Receiver], Awaitable[Callable[[], None]]]
"""Subscribe a receiver to one of the bus's own channels; returns its detach."""


def due_args(delay: float | None, at: datetime | None) -> tuple[str, int]:
    """The schedule script's (mode, value) for ``delay`` seconds or an ``at`` time.

    :raises eventbus.errors.ConfigurationError: both given, a naive ``at``, a
        negative or non-finite ``delay``.
    """
    if at is not None:
        if delay is not None:
            raise ConfigurationError("give delay= or at=, not both")
        if not isinstance(at, datetime):
            raise ConfigurationError(f"at= must be a datetime, got {at!r}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ConfigurationError(
                f"at= must be timezone-aware (a naive datetime is ambiguous), got {at!r}:"
                " use datetime(..., tzinfo=timezone.utc) or datetime.now(timezone.utc)"
            )
        return "at", math.floor(at.timestamp() * 1000)
    assert delay is not None
    if not math.isfinite(delay) or delay < 0:
        raise ConfigurationError(f"delay must be zero or more seconds, got {delay!r}")
    return "in", math.ceil(delay * 1000)


class DelayedFeature:
    """Schedules, cancels and (when asked) releases delayed events."""

    def __init__(self, *, scheduler: bool | None, wake: Wake) -> None:
        if scheduler not in (True, False, None):
            raise ConfigurationError(f"scheduler must be True, False or None, got {scheduler!r}")
        self._mode = scheduler
        self._wake = wake
        self._ctx: FeatureContext | None = None
        self._client: Any = None
        self._scheduler_client: Any = None
        self._scripts: dict[str, Any] = {}
        self._scope: anyio.CancelScope | None = None
        self._server_ms = 0.0
        self._server_at = 0.0
        self._queued: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        """Schedule calls waiting for the next round trip (see :meth:`_call_schedule`)."""
        self._lease: SchedulerLease | None = None
        """The schedulers' lease as this one sees it (see ``_lease``); made when
        the scheduler starts."""
        self._behind = False
        """Without the lease only: this scheduler's last release found its events
        taken by another: it looks a little later next time, so racing schedulers
        do not all hit Redis for every due time (the first one still releases on
        time)."""
        self._failing: dict[str, tuple[float, float]] = {}
        """Topic -> (retry at (monotonic), backoff): releases Redis refused."""
        self.scheduled = self.cancelled = self.released = self.release_errors = 0

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, ctx: FeatureContext, *, serves_handlers: bool) -> None:
        """Ready to schedule; start the scheduler now if it is on (``True``), or on
        by default (``None``) in a bus that serves handlers."""
        self._ctx = ctx
        self._client = ctx.clients.command_client(ctx.publish_timeout, "publish_timeout")
        self._scripts["schedule"] = self._client.register_script(DELAYED_SCHEDULE)
        self._scripts["release"] = self._client.register_script(DELAYED_RELEASE)
        self._scripts["cancel"] = self._client.register_script(DELAYED_CANCEL)
        self._scripts["declare"] = self._client.register_script(RECURRING_DECLARE)
        self._scripts["fire"] = self._client.register_script(RECURRING_FIRE)
        if self._mode is True or (self._mode is None and serves_handlers):
            self._start_scheduler()

    def note_scheduled(self) -> None:
        """Another feature scheduled something (a delayed queue job): release it
        from this bus too, if the scheduler is on by default."""
        if self._mode is None and self._ctx is not None:
            self._start_scheduler()

    def begin_drain(self) -> None:
        if self._scope is not None:
            self._scope.cancel()

    async def aclose(self) -> None:
        for client in (self._client, self._scheduler_client):
            if client is not None:
                await client.aclose()

    def statistics(self) -> DelayedStatistics:
        return DelayedStatistics(
            scheduled=self.scheduled,
            cancelled=self.cancelled,
            released=self.released,
            release_errors=self.release_errors,
            scheduler_running=self._scope is not None and not self._scope.cancel_called,
            scheduler_leader=self._lease is not None and self._lease.leader,
        )

    # -- scheduling ---------------------------------------------------------------------

    def _blob(self, topic: Topic[Any], event: Any, headers: dict[str, str], event_id: str) -> bytes:
        """The event as the release will write it (see ``_scripts``, "delayed events").

        Sequence number 0: released in due order, not in publish order, so
        subscribers do not count it in a publisher's sequence (no false gaps).
        """
        ctx = self._ctx
        assert ctx is not None
        publisher = ctx.ids.publisher_id
        if not topic.durable:
            raw, _ms = ctx.codec.encode(
                topic.name, event, event_id=event_id, publisher=publisher, seq=0, headers=headers
            )
            return b"l" + raw
        fields = ctx.codec.encode_entry(
            topic.name, event, event_id=event_id, publisher=publisher, seq=0, headers=headers
        )
        maxlen = b"%d" % topic.maxlen if topic.trim == "hard" and topic.maxlen else b""
        parts = [b"d"]
        for item in (maxlen, *fields):
            parts += (b"%d:" % len(item), item)
        return b"".join(parts)

    async def schedule(
        self, topic: Topic[Any], event: Any, headers: dict[str, str], due: tuple[str, int]
    ) -> Receipt:
        """Hold ``event`` until ``due`` (from :func:`due_args`); at once if already due."""
        ctx = self._ctx
        assert ctx is not None
        event_id = ctx.ids.event_id()
        blob = self._blob(topic, event, headers, event_id)
        return (await self._schedule(topic, [(event_id, blob)], due))[0]

    async def schedule_many(
        self,
        topic: Topic[Any],
        events: Iterable[Any],
        headers: dict[str, str],
        due: tuple[str, int],
    ) -> list[Receipt]:
        """:meth:`schedule` for a batch, one due time for all: all encoded first (a
        bad event raises before anything is sent), then one script call per
        ``_SCHEDULE_BATCH`` events, all in one round trip."""
        ctx = self._ctx
        assert ctx is not None
        encoded = []
        for event in events:
            event_id = ctx.ids.event_id()
            encoded.append((event_id, self._blob(topic, event, headers, event_id)))
        return await self._schedule(topic, encoded, due)

    async def _schedule(
        self, topic: Topic[Any], encoded: list[tuple[str, bytes]], due: tuple[str, int]
    ) -> list[Receipt]:
        ctx = self._ctx
        assert ctx is not None
        keys = topic_keys(ctx.prefix, topic.name)
        head = [keys.delayed, keys.delayed_data, keys.stream, delayed_index(ctx.prefix)]
        mode, value = due
        if mode == "in" and len(encoded) > _SCHEDULE_BATCH:
            # Several calls, one due time: fixed here, by the server's clock as last
            # seen (asked once, then advanced by the monotonic clock), so that the
            # calls go out together, in one round trip.
            mode, value = "at", round(await self._server_time()) + value
        chunks = [
            encoded[start : start + _SCHEDULE_BATCH]
            for start in range(0, len(encoded), _SCHEDULE_BATCH)
        ]

        async def call(chunk: list[tuple[str, bytes]]) -> Any:
            args: list[Any] = [
                mode,
                value,
                topic.name,
                live_channel(ctx.prefix, topic.name),
                delayed_wake(ctx.prefix),
            ]
            for event_id, blob in chunk:
                args += (event_id, blob)
            return await self._call_schedule(
                head + [keys.delayed_done + event_id for event_id, _ in chunk], args
            )

        try:
            if len(chunks) == 1:
                replies = [await call(chunks[0])]
            else:
                replies = list(await asyncio.gather(*(call(chunk) for chunk in chunks)))
        except rex.RedisError as exc:
            raise translate(exc, topic=topic.name, command="EVALSHA") from exc
        receipts: list[Receipt] = []
        now_ms = time.time_ns() // 1_000_000
        for chunk, reply in zip(chunks, replies, strict=True):
            due_ms, server_ms = int(reply[0]), int(reply[1])
            self._note_server_time(server_ms)
            due_at = datetime.fromtimestamp(due_ms / 1000, tz=timezone.utc)
            for i, (event_id, _blob) in enumerate(chunk):
                stream_id, scheduled = reply[2 + 2 * i], int(reply[3 + 2 * i])
                sid = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
                self.scheduled += scheduled
                r = receipt(ctx.sender, topic.name, event_id, now_ms)
                receipts.append(attrs.evolve(r, stream_id=sid or None, due=due_at))
        if self._mode is None and self.scheduled:
            self._start_scheduler()  # a bus that schedules releases too, by default
        return receipts

    async def _call_schedule(self, keys: list[str], args: list[Any]) -> Any:
        """One schedule script call, sent with the calls queued beside it.

        Concurrent callers (a thousand tasks each scheduling one event) share one
        pipeline per round trip instead of one connection each: the first caller
        of a round sends what has queued by its next checkpoint; the others wait
        for their own reply. The send is shielded (bounded by ``publish_timeout``),
        so cancelling the caller that sends does not fail its neighbours.
        """
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((keys, args, fut))
        if len(self._queued) == 1:
            await anyio.lowlevel.checkpoint()  # let this round's neighbours queue
            batch, self._queued = self._queued, []
            with anyio.CancelScope(shield=True):
                await self._send_batch(batch)
        return await fut

    async def _send_batch(
        self, batch: list[tuple[list[str], list[Any], asyncio.Future[Any]]]
    ) -> None:
        script = self._scripts["schedule"]
        try:
            if len(batch) == 1:
                keys, args, fut = batch[0]
                replies: list[Any] = [await script(keys=keys, args=args)]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for keys, args, _fut in batch:
                        await script(keys=keys, args=args, client=pipe)
                    replies = await pipe.execute(raise_on_error=False)
        except BaseException as exc:
            for _keys, _args, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_keys, _args, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                continue
            if isinstance(reply, Exception):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def cancel(self, event_id: str, name: str | None) -> bool:
        """Remove a pending delayed event (or queue job); whether this call removed
        it (it was still pending). ``name``: its topic or queue, else every schedule
        is searched (one round trip either way).

        :raises eventbus.errors.RedisUnavailable: Redis unreachable after bounded
            retries (the event may or may not have been cancelled).
        """
        try:
            return await self._cancel(event_id, name)
        except rex.RedisError as exc:
            raise translate(exc, topic=name) from exc

    async def _cancel(self, event_id: str, name: str | None) -> bool:
        ctx = self._ctx
        assert ctx is not None
        index = delayed_index(ctx.prefix)
        members = [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in await self._client.zrange(index, 0, -1)
        ]
        if name is not None:
            members = [n for n in members if schedule_target(ctx.prefix, n).name == name]
        if not members:
            return False
        async with self._client.pipeline(transaction=False) as pipe:
            for n in members:
                pipe.zscore(schedule_target(ctx.prefix, n).delayed, event_id)
            scores = await pipe.execute()
        found = [n for n, score in zip(members, scores, strict=True) if score is not None]
        if not found:
            return False
        target = schedule_target(ctx.prefix, found[0])
        keys = [target.delayed, target.delayed_data, index, target.cancelled + event_id]
        if target.kind == "list":  # a queue job: its id is free again
            keys.append(queue_keys(ctx.prefix, target.name, 1).ids)
        # The token tells this call's runs apart from any other cancel's: redis-py
        # sends the script again after a lost reply (a dropped connection), and that
        # run, finding the event gone, answers from the tombstone the first one left.
        token = secrets.token_hex(8)
        removed = await self._scripts["cancel"](keys=keys, args=[event_id, found[0], token])
        if int(removed):
            self.cancelled += 1
            return True
        return False

    # -- the scheduler ------------------------------------------------------------------

    def _start_scheduler(self) -> None:
        if self._scope is not None:
            return
        ctx = self._ctx
        assert ctx is not None
        self._scope = scope = anyio.CancelScope()
        self._scheduler_client = ctx.clients.command_client(
            ctx.clients.command_timeout, "command_timeout"
        )
        self._lease = SchedulerLease(self._scheduler_client, delayed_lease(ctx.prefix))

        async def run() -> None:
            with scope:
                await self._run()

        ctx.task_group.start_soon(run)

    def _note_server_time(self, server_ms: int) -> None:
        self._server_ms = float(server_ms)
        self._server_at = time.monotonic()

    def _server_now(self) -> float:
        """The Redis server's clock (ms) as last seen, advanced by our monotonic clock."""
        return self._server_ms + (time.monotonic() - self._server_at) * 1000

    def _lag(self) -> float:
        """How overdue (ms) an event must be before this scheduler releases it: 0 for
        the leader, ``STANDBY_LAG`` for a standby; without the lease, ``_YIELD``
        after a lost race."""
        lease = self._lease
        if lease is not None and lease.enabled:
            return lease.lag_ms
        return _YIELD * 1000 if self._behind else 0.0

    async def _run(self) -> None:
        ctx = self._ctx
        lease = self._lease
        assert ctx is not None
        assert lease is not None
        client = self._scheduler_client
        kick = Receiver(label="eventbus.delayed.wake", capacity=1, overflow="drop_oldest")
        detach: Callable[[], None] | None = None
        retry = _RETRY_MIN
        kicked = True  # the first round looks, and tries for the lease
        next_due: float | None = None
        look_at = 0.0
        """Server ms of the next look at the schedule (the wake time it set)."""
        try:
            while True:
                try:
                    if detach is None:
                        try:
                            detach = await self._wake(delayed_wake(ctx.prefix), kick)
                        except PermissionDenied as exc:
                            # Released all the same, looking every _MAX_SLEEP seconds
                            # for what other processes schedule: later, never lost.
                            logger.warning(
                                "delayed-event scheduler: cannot subscribe to %s (%s); it"
                                " looks for newly scheduled events every %.0fs instead",
                                delayed_wake(ctx.prefix),
                                exc,
                                _MAX_SLEEP,
                            )
                            detach = _no_wake
                            # The refused one was closed with the error: a quiet one.
                            kick = Receiver(
                                label="eventbus.delayed.wake", capacity=1, overflow="drop_oldest"
                            )
                    await self._server_time()  # the clock the release loop sleeps by
                    # A standby woken by the wake channel tries for the lease at once:
                    # the message may be a leader's goodbye.
                    changed = await lease.hold(client, force=kicked and not lease.leader)
                    if kicked or changed or self._server_now() >= look_at - 1:
                        next_due = await self._release_due(client)
                        next_occurrence = await self._fire_recurring(client)
                        if next_occurrence is not None:
                            next_due = (
                                next_occurrence
                                if next_due is None
                                else min(next_due, next_occurrence)
                            )
                        wait = _MAX_SLEEP
                        if next_due is not None:
                            wait = min(max((next_due - self._server_now()) / 1000, 0.0), wait)
                        look_at = self._server_now() + wait * 1000
                    retry = _RETRY_MIN
                except (EventBusError, rex.RedisError, OSError, TimeoutError) as exc:
                    logger.warning("delayed-event scheduler: %s; retrying in %.1fs", exc, retry)
                    await anyio.sleep(retry)
                    retry = min(retry * 2, _RETRY_MAX)
                    kicked = True
                    continue
                # Asleep until the next look, or the lease's next renewal or attempt,
                # or a message on the wake channel, whichever comes first.
                wait = max((look_at - self._server_now()) / 1000, 0.0)
                if lease.enabled:
                    wait = min(wait, max(lease.next_attempt - time.monotonic(), 0.0))
                kicked = False
                if wait > 0:
                    with anyio.move_on_after(wait):
                        if kick.take() is None:
                            await kick.waiter()
                        else:
                            kicked = True
                while kick.take() is not None:
                    kicked = True  # woken: look again (whatever the message said)
        finally:
            if detach is not None:
                detach()
            await self._step_down(client)

    async def _step_down(self, client: Any) -> None:
        """A stopping leader deletes its lease and says so on the wake channel: a
        standby takes over at once, not when the lease lapses."""
        lease = self._lease
        ctx = self._ctx
        if lease is None or ctx is None or not lease.leader:
            return
        with anyio.move_on_after(1.0, shield=True):
            try:
                if await lease.release(client):
                    await client.publish(delayed_wake(ctx.prefix), "0")
            except (rex.RedisError, OSError) as exc:
                logger.debug("delayed-event scheduler: releasing its lease failed: %s", exc)

    async def _release_due(self, client: Any) -> float | None:
        """Release every due event of every topic (a standby: every overdue one); when
        to look next (server ms), or None if nothing is scheduled."""
        ctx = self._ctx
        lease = self._lease
        assert ctx is not None
        assert lease is not None
        index = delayed_index(ctx.prefix)
        full: set[str] = set()
        """Topics whose last call found a full batch: several calls next time."""
        while True:
            await lease.hold(client)  # a long backlog: renewed between calls
            heads = await client.zrange(index, 0, _INDEX_PEEK - 1, withscores=True)
            now = self._server_now()
            # A standby (or, without the lease, one behind another scheduler) leaves
            # the leader what it is about to release, and takes only what it left
            # overdue (it may have died, or be stuck).
            lag = self._lag()
            horizon = now - lag
            mono = time.monotonic()
            next_due: float | None = None
            more = len(heads) == _INDEX_PEEK  # more topics past these: look again
            backlog = False
            for raw_name, score in heads:
                name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
                failing = self._failing.get(name)
                if failing is not None and failing[0] > mono:
                    continue
                if score > horizon:
                    score += lag
                    next_due = score if next_due is None else min(next_due, score)
                    more = False
                    break
                target = schedule_target(ctx.prefix, name)
                calls = _RELEASE_PIPELINE if name in full else 1
                full.discard(name)
                replies = await self._release_calls(
                    client,
                    calls,
                    keys=[
                        target.delayed,
                        target.delayed_data,
                        target.destination,
                        index,
                        target.nudge,
                    ],
                    args=[
                        name,
                        live_channel(ctx.prefix, target.name),
                        _RELEASE_BATCH,
                        target.kind,
                        NUDGE,
                    ],
                )
                released = missing = 0
                topic_next = -1
                error: rex.ResponseError | None = None
                for reply in replies:
                    if isinstance(reply, rex.ResponseError):
                        error = reply  # the calls after it met the same (it stays first)
                        break
                    done, server_now, topic_next, lost = (int(x) for x in reply)
                    self._note_server_time(server_now)
                    released += done
                    missing += lost
                    if done + lost >= _RELEASE_BATCH:
                        full.add(name)  # a backlog: go round again at once
                    else:
                        full.discard(name)
                backlog = backlog or name in full
                self.released += released
                if missing:
                    logger.error(
                        "%d delayed event(s) of topic %r had no data in %s and were dropped",
                        missing,
                        name,
                        target.delayed_data,
                    )
                if error is not None:
                    self.release_errors += 1
                    full.discard(name)
                    backoff = min(failing[1] * 2, 30.0) if failing else 1.0
                    self._failing[name] = (mono + backoff, backoff)
                    logger.error(
                        "delayed events of topic %r could not be released (retrying in"
                        " %.0fs; they stay scheduled): %s",
                        name,
                        backoff,
                        error,
                    )
                    continue
                if not replies:
                    backlog = True  # the script was flushed as the calls went: again
                    continue
                self._failing.pop(name, None)
                if not lease.enabled:
                    # Released something: the one that did (if any) is gone or slow.
                    # Found nothing: another got there first; stay behind it.
                    self._behind = released == 0 and missing == 0
                if name not in full and topic_next >= 0:
                    due = float(topic_next) + self._lag()
                    next_due = due if next_due is None else min(next_due, due)
            if not (more or backlog):
                return next_due

    async def _release_calls(
        self, client: Any, calls: int, *, keys: list[str], args: list[Any]
    ) -> list[Any]:
        """``calls`` release script calls for one topic in one round trip: each reply
        (a ``ResponseError`` for a call Redis refused), in order.

        Pipelined calls are separate script runs: each atomic on its own, none
        waiting on the others, so two schedulers racing still release each event
        once. A call that found the script flushed (``NOSCRIPT``) ran nothing and
        has no reply here: the next round loads it again.
        """
        release = self._scripts["release"]
        if calls == 1:
            try:
                return [await release(keys=keys, args=args, client=client)]
            except rex.ResponseError as exc:
                return [exc]
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(calls):
                await release(keys=keys, args=args, client=pipe)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return [r for r in replies if not isinstance(r, rex.NoScriptError)]

    # -- recurring events ---------------------------------------------------------------

    async def _server_time(self) -> float:
        """The Redis server's clock (ms): asked once, then advanced locally."""
        if not self._server_at:
            seconds_, micros = await self._client.time()
            self._note_server_time(int(seconds_) * 1000 + int(micros) // 1000)
        return self._server_now()

    async def declare(self, rec: Recurrence) -> bool:
        """Declare (or replace) a recurring event; whether anything changed."""
        ctx = self._ctx
        assert ctx is not None
        keys = recurring_keys(ctx.prefix)
        self._occurrence_blob(rec, 0)  # too large, or not encodable: refused before Redis
        first = rec.next_after(int(await self._server_time()))
        try:
            changed = await self._scripts["declare"](
                keys=[keys.due, keys.definitions],
                args=[rec.name, rec.to_json(), first, delayed_wake(ctx.prefix)],
            )
        except rex.RedisError as exc:
            raise translate(exc, topic=rec.topic, command="EVALSHA") from exc
        if self._mode is None:
            self._start_scheduler()  # a bus that declares releases too, by default
        return bool(int(changed))

    async def remove(self, name: str) -> bool:
        """Remove a recurring event; whether it existed."""
        ctx = self._ctx
        assert ctx is not None
        keys = recurring_keys(ctx.prefix)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.definitions, name)
            pipe.zrem(keys.due, name)
            pipe.hdel(keys.last, name)
            removed, _, _ = await pipe.execute()
        return bool(int(removed))

    async def listing(self) -> list[ScheduleInfo]:
        """Every recurring event of this prefix, by name."""
        ctx = self._ctx
        assert ctx is not None
        keys = recurring_keys(ctx.prefix)
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(keys.definitions)
            pipe.zrange(keys.due, 0, -1, withscores=True)
            pipe.hgetall(keys.last)
            definitions, due, last = await pipe.execute()
        next_of = {_text(name): int(score) for name, score in due}
        last_of = {_text(name): int(ms) for name, ms in last.items()}
        infos = []
        for raw in definitions.values():
            rec = Recurrence.from_json(raw)
            infos.append(ScheduleInfo.of(rec, next_of.get(rec.name), last_of.get(rec.name)))
        return sorted(infos, key=lambda info: info.name)

    def _occurrence_blob(self, rec: Recurrence, occurrence: int) -> bytes:
        topic: Topic[Any] = Topic(
            rec.topic,
            durable=rec.durable,
            maxlen=rec.maxlen,
            trim="hard" if rec.maxlen else "acked",
        )
        return self._blob(topic, rec.event(), rec.headers, occurrence_id(rec.name, occurrence))

    async def _fire_recurring(self, client: Any) -> float | None:
        """Fire every recurring event due now (a standby: every overdue one); when to
        look next (server ms), or None if none is declared."""
        ctx = self._ctx
        assert ctx is not None
        keys = recurring_keys(ctx.prefix)
        fire = self._scripts["fire"]
        heads = await client.zrange(keys.due, 0, _INDEX_PEEK - 1, withscores=True)
        now = self._server_now()
        lag = self._lag()  # as in _release_due: a standby fires what the leader left
        next_due: float | None = None
        for raw_name, score in heads:
            if score > now - lag:
                score += lag
                next_due = score if next_due is None else min(next_due, score)
                break
            name = _text(raw_name)
            raw = await client.hget(keys.definitions, name)
            if raw is None:
                continue  # removed meanwhile
            rec = Recurrence.from_json(raw)
            occurrences, following = rec.to_fire(int(score), int(now))
            args: list[Any] = [
                name,
                int(score),
                hashlib.sha1(raw, usedforsecurity=False).hexdigest(),
                following,
                live_channel(ctx.prefix, rec.topic),
            ]
            for occurrence in occurrences:
                args += (occurrence, self._occurrence_blob(rec, occurrence))
            stream = topic_keys(ctx.prefix, rec.topic).stream
            try:
                released = int(
                    await fire(
                        keys=[keys.due, keys.definitions, stream, keys.last],
                        args=args,
                        client=client,
                    )
                )
            except rex.ResponseError as exc:
                self.release_errors += 1
                logger.error("recurring event %r could not be released: %s", name, exc)
                continue
            if released > 0:
                self.released += released
            wake = following + lag
            next_due = wake if next_due is None else min(next_due, wake)
        else:
            if len(heads) == _INDEX_PEEK:
                return self._server_now()  # more due past these: go round again now
        return next_due


def _no_wake() -> None:
    """The detach of a wake subscription that was refused."""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
