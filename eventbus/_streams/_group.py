"""One member of a consumer group of a durable topic.

Tasks of one :class:`GroupConsumer` (all in its own task group):

* the reader: first this consumer's own pending entries (what it held when it
  last stopped or crashed), then ``XREADGROUP ... >`` batches with ``BLOCK``;
  it reads only while the prefetch buffer has room;
* ``concurrency`` workers: decode, run the handler, ack (or retry, or
  dead-letter);
* the claimer (:class:`~._claim.Claimer`, which sees this member only as its
  ``ClaimHost``): every ``claim.interval``, a heartbeat of the entries held here
  and ``XAUTOCLAIM`` of entries idle past ``claim.idle`` in crashed or hung
  consumers, following the cursor;
* the acker: ``XACK`` of everything handled since its last flush, in one call;
* the lease (:class:`~._lease.MemberLease`): taken on the consumer name before
  anything is read, renewed until :meth:`GroupConsumer.stop` has flushed the
  acks, then deleted; if another member took the name, this one stops reading.

The member also holds a :class:`~._deadletter.DeadLetterWriter` (giving up on an
entry), a :class:`~._chain.Chainer` (``publish_to=``) and a
:class:`~._dedupe.Dedupe` (``dedupe=``); all of them count in the one
:class:`~eventbus._stats.ConsumerCounters` it owns.

Every entry this consumer holds (buffered, running, waiting for a retry or for
its ack) is in ``_held``, so a re-read of its own pending list or a claim never
starts a second copy of an entry already in progress here.

Delivery counts come from Redis (``XPENDING``), never from memory: they survive
crashes, and a retry is an ``XCLAIM`` by the same consumer, which Redis counts.

Why one module past 600 lines: what is left is the member's core, one concept.
The reader, the prefetch buffer with its worker wake-up, the workers, the
retries, the acker and the hand-back on stop all keep the same two invariants
(an entry is in ``_held`` from the read that brought it until its ack or its
hand-back; no worker starts an entry once ``begin_stop`` ran) over the same
state; split further, each part would reach into the others' state, which is
what the claimer, the dead-letter writer and the chainer were moved out to stop.
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.abc
import attrs
import redis.asyncio as aioredis
import redis.exceptions as rex

from .. import signals
from .._codec import Codec
from .._config import Limits
from .._connection import CONNECTION_ERRORS, is_busygroup, is_nogroup, is_unblocked
from .._envelope import Envelope
from .._handlers import HandlerSpec, invoke
from .._keys import TopicKeys, member_lease
from .._scripts import CONSUMER_REMOVE, RETRY_DEFER
from .._stats import ConsumerCounters, ConsumerStatistics
from .._topic import Topic
from ..errors import DecodeError
from ..signals import emit
from ._chain import Chainer
from ._claim import Claimer
from ._deadletter import DeadLetterWriter
from ._dedupe import Dedupe
from ._entry import Work, entries_as_sent
from ._ids import id_key, previous_id
from ._lease import MemberLease
from ._options import GroupOptions

__all__ = ["GroupConsumer", "Release"]

logger = logging.getLogger("eventbus")

_RELEASE_IDLE_MS: Final = 10**12
"""``XCLAIM ... IDLE`` of a released entry: idle past any ``claim_idle``."""


class Release(Exception):
    """Raised by a handler to hand its entry back to the group instead of finishing it.

    ``charge``: whether this counts as a delivery (the event was started).
    """

    def __init__(self, *, charge: bool) -> None:
        super().__init__("released")
        self.charge = charge


class GroupConsumer:
    """A consumer-group member feeding one handler (see the module doc)."""

    def __init__(
        self,
        *,
        topic: Topic[Any],
        keys: TopicKeys,
        options: GroupOptions,
        spec: HandlerSpec,
        codec: Codec,
        limits: Limits,
        client: aioredis.Redis,
        blocking_client: aioredis.Redis,
        encode_output: Callable[[Topic[Any], Any, str, Envelope], list[bytes]],
        target_keys: TopicKeys | None,
        publish_output: Callable[[Topic[Any], Any], Awaitable[object]],
        note_output: Callable[[Topic[Any], int], None],
        sender: object,
    ) -> None:
        self.topic = topic
        self.keys = keys
        self.options = options
        self.spec = spec
        self._codec = codec
        self._client: Any = client  # redis-py's stubs type replies as unions
        self._blocking: Any = blocking_client
        blocking_client.set_response_callback("XREADGROUP", entries_as_sent)
        self._sender = sender
        self._rand = random.Random()
        self._counters = ConsumerCounters()
        self._dead_letters = DeadLetterWriter(
            client=client,
            keys=keys,
            topic=topic.name,
            group=options.group,
            consumer=options.consumer,
            codec=codec,
            maxlen=limits.dead_letter_maxlen,
            counters=self._counters,
            sender=sender,
        )
        # Looked up once: _process runs per entry.
        self._payload_type = spec.payload_type
        self._passthrough = spec.payload_type is object or spec.payload_type is Any
        self._max_attempts = options.retry.max_attempts
        self._decode = codec.decode_entry
        self._dedupe = (
            None if options.dedupe is None else Dedupe(client, keys, options.group, options.dedupe)
        )

        self._lease = MemberLease(
            client=client,
            key=member_lease(keys, options.group, options.consumer),
            topic=topic.name,
            group=options.group,
            consumer=options.consumer,
            on_lost=self._name_taken,
        )
        self._name_lost = False
        self._claimer = Claimer(
            client=client,
            keys=keys,
            group=options.group,
            consumer=options.consumer,
            policy=options.claim,
            batch=options.batch,
            host=self,
            counters=self._counters,
            remove=self._remove_consumer,
        )
        self._remove_script = client.register_script(CONSUMER_REMOVE)
        self._chainer = (
            None
            if options.publish_to is None
            else Chainer(
                client=client,
                keys=keys,
                group=options.group,
                target=options.publish_to,
                target_keys=target_keys,
                encode_output=encode_output,
                publish_output=publish_output,
                note_output=note_output,
                dedupe=self._dedupe,
                counters=self._counters,
                ack=self._ack,
                forget=self._forget,
            )
        )
        self._buffer: deque[Work] = deque()
        self._held: dict[str, Work] = {}
        self._running: dict[str, Work] = {}
        self._retrying: dict[str, Work] = {}
        self._deferred: set[str] = set()
        """Those of ``_retrying`` waiting out a long backoff noted in Redis (see
        :meth:`_schedule_retry`): kept alive by the heartbeat, unlike short ones."""
        self._retry_key = keys.retry_at + options.group
        self._defer_script = client.register_script(RETRY_DEFER)
        self._handed_back: list[tuple[Work, bool]] = []
        self._acks: list[str] = []
        self._marks: list[str] = []
        self._idle: list[anyio.Event] = []
        """One event per worker waiting for work; the most recent idle worker is woken first."""
        self._waking = False
        """A worker was woken and has not run yet (see ``_wake_one``)."""
        self._space = anyio.Event()
        self._space_wanted = False
        """The reader (or a claim) waits for ``_space``: set it when the buffer drains."""
        self._ack_ready = anyio.Event()
        self._ack_waiting = False
        """The ack loop waits for ``_ack_ready``: set it with the next ack."""
        self._ack_idle = anyio.Event()
        self._ack_idle.set()
        self._stopping = False
        self._closed = False
        self._unstarted: list[Work] = []
        """What was prefetched and not started when :meth:`begin_stop` ran."""
        self._acks_closed = False
        self._read_scope = anyio.CancelScope()
        self._retry_scope = anyio.CancelScope()
        self._worker_scope = anyio.CancelScope()
        self._ack_scope = anyio.CancelScope()
        self._retry_tg: anyio.abc.TaskGroup | None = None
        self._reader_done = anyio.Event()
        self._workers_done = anyio.Event()
        self._acker_done = anyio.Event()
        self._last_read_id: str | None = None
        self._cursor_written = 0.0
        self._recreate_times: deque[float] = deque(maxlen=5)
        self._nogroup_logged = False
        self._read_count = 0
        self._capacity = 0
        self._refill_at = 0
        self._set_read_count(options.batch)
        self._primed = False  # a batch was read: an empty buffer now means the handlers keep up

    def _set_read_count(self, count: int) -> None:
        # Double buffering: the next batch is read while the workers still have
        # one, and a read always asks for a whole batch (no trickle of tiny reads).
        unit = max(count, self.options.concurrency)
        self._read_count = count
        self._capacity = 2 * unit
        self._refill_at = unit

    def statistics(self) -> ConsumerStatistics:
        return ConsumerStatistics(
            group=self.options.group,
            consumer=self.options.consumer,
            topic=self.topic.name,
            **attrs.asdict(self._counters),
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the group (and the stream) unless it exists."""
        start = "0" if self.options.start == "earliest" else "$"
        try:
            await self._client.xgroup_create(
                self.keys.stream, self.options.group, id=start, mkstream=True
            )
        except rex.ResponseError as exc:
            if not is_busygroup(exc):
                raise

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Consume until :meth:`stop` has finished; closes the blocking connection."""
        try:
            await self._run(task_status)
        finally:
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(1.0):
                    await self._lease.release()
                await self._blocking.aclose()

    async def _run(self, task_status: anyio.abc.TaskStatus[None]) -> None:
        await self._lease.acquire()  # before anything is read under the name
        await self.ensure_group()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._lease.run)
            tg.start_soon(self._ack_loop)
            tg.start_soon(self._retries)
            tg.start_soon(self._workers)
            tg.start_soon(self._read_loop)
            tg.start_soon(self._claimer.run)
            task_status.started()

    def begin_stop(self) -> None:
        """Stop reading, claiming and retrying; no worker starts another prefetched
        entry once this returns (it takes them before any await). Idempotent."""
        if self._stopping:
            return
        self._stopping = True
        self._closed = True
        self._unstarted = list(self._buffer)
        self._buffer.clear()
        self._wake_all()
        self._read_scope.cancel()
        self._claimer.stop()
        self._retry_scope.cancel()

    async def stop(self, deadline: float) -> None:
        """:meth:`begin_stop`, release what was prefetched, let running handlers finish
        until ``deadline`` (``anyio.current_time()`` based), then flush acks."""
        self.begin_stop()
        await self._reader_done.wait()
        unstarted = self._unstarted + list(self._buffer)  # and what a returning read added
        self._buffer.clear()
        retrying = list(self._retrying.values())
        self._retrying.clear()
        self._deferred.clear()
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            await self._release(unstarted, retrying)
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
            await self._workers_done.wait()
        if not self._workers_done.is_set():
            abandoned = sorted(self._running)
            logger.warning(
                "group %r of topic %r: %d handlers still running after the shutdown grace;"
                " cancelled, their entries stay pending for another consumer: %s",
                self.options.group,
                self.topic.name,
                len(abandoned),
                ", ".join(abandoned[:20]) + (" ..." if len(abandoned) > 20 else ""),
            )
            self._worker_scope.cancel()
            await self._workers_done.wait()
        if self._handed_back:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                await self._release(
                    [w for w, charge in self._handed_back if not charge],
                    [w for w, charge in self._handed_back if charge],
                )
        self._acks_closed = True
        self._ack_ready.set()
        with anyio.move_on_after(max(deadline - anyio.current_time(), 1.0)):
            await self._acker_done.wait()
        if not self._acker_done.is_set():
            logger.warning(
                "group %r: %d acks could not be sent before shutdown; those entries stay"
                " pending and are handled again by another consumer",
                self.options.group,
                len(self._acks),
            )
            self._ack_scope.cancel()
        # Held until here, so the last acks are written under the name; then freed,
        # so a successor under the same name starts at once.
        self._lease.stop()
        with anyio.CancelScope(shield=True), anyio.move_on_after(1.0):
            await self._lease.release()
            if not self._name_lost:
                # Leaving cleanly: with nothing pending under the name (what was
                # handed back stays pending here, claimable at once), leave the
                # group too, so restarts under new names do not pile up consumers.
                try:
                    await self._remove_consumer(self.options.consumer)
                except (rex.ResponseError, *CONNECTION_ERRORS) as exc:
                    logger.debug("group %r: leaving the group: %s", self.options.group, exc)

    async def _remove_consumer(self, name: str) -> bool:
        """``XGROUP DELCONSUMER`` ``name``, only if nothing is pending under it and no
        member holds its lease (``CONSUMER_REMOVE``: checked and done atomically)."""
        removed = await self._remove_script(
            keys=[self.keys.stream, member_lease(self.keys, self.options.group, name)],
            args=[self.options.group, name],
        )
        return bool(removed)

    async def _release(self, unstarted: list[Work], retrying: list[Work]) -> None:
        """Hand entries back to the group, claimable by others at once, without
        charging a delivery to the unstarted ones (``RETRYCOUNT`` = count - 1)."""
        if self._name_lost:
            return  # pending under a name another member holds now: they are its entries
        by_count: dict[int, list[str]] = {}
        for work in unstarted:
            by_count.setdefault(max(work.count - 1, 0), []).append(work.id)
        for work in retrying:
            by_count.setdefault(work.count, []).append(work.id)
        for count, ids in by_count.items():
            try:
                await self._client.xclaim(
                    self.keys.stream,
                    self.options.group,
                    self.options.consumer,
                    0,
                    ids,
                    idle=_RELEASE_IDLE_MS,
                    retrycount=count,
                    justid=True,
                )
            except Exception as exc:
                logger.warning(
                    "group %r: could not release %d entries on shutdown (others claim them"
                    " after claim_idle): %s",
                    self.options.group,
                    len(ids),
                    exc,
                )
                continue
            self._counters.released += len(ids)
            for entry_id in ids:
                self._held.pop(entry_id, None)

    def _name_taken(self, holder: str) -> None:
        """Another member took this consumer name while this one was silent past its
        lease: from now on the name's pending list is that member's. Stop reading,
        claiming and retrying under it; handlers already running finish and ack."""
        logger.error(
            "group %r of topic %r: consumer name %r was taken by %r while this member was"
            " frozen or cut off past its lease; this member stops reading. Running handlers"
            " finish and ack; its prefetched entries are left to the new holder",
            self.options.group,
            self.topic.name,
            self.options.consumer,
            holder,
        )
        self._name_lost = True
        self.begin_stop()
        for work in [*self._unstarted, *self._retrying.values()]:
            self._held.pop(work.id, None)
        self._unstarted = []
        self._retrying.clear()
        self._deferred.clear()

    # -- reading ------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            with self._read_scope:
                await self._read_own_pending()
                backoff = 0.05
                failures = 0
                while not self._stopping:
                    if len(self._buffer) > self._refill_at:
                        if self._read_count > self.options.batch:  # handlers fall behind
                            self._set_read_count(max(self._read_count // 2, self.options.batch))
                        await self._wait_space()
                        continue
                    count = min(self._read_count, self._capacity - len(self._buffer))
                    try:
                        self._counters.reads += 1
                        response = await self._blocking.xreadgroup(
                            self.options.group,
                            self.options.consumer,
                            {self.keys.stream: ">"},
                            count=count,
                            block=max(int(self.options.block * 1000), 1),
                        )
                    except rex.ResponseError as exc:
                        # NOGROUP: the group is gone. UNBLOCKED: the stream was
                        # deleted (DEL, FLUSHALL) under a blocked read (Redis >= 7).
                        if is_nogroup(exc) or is_unblocked(exc):
                            await self._recreate_group()
                            continue
                        # E.g. an ACL changed under a running member: say so, keep
                        # trying (bounded rate), do not bring the bus down.
                        logger.error(
                            "group %r of topic %r: XREADGROUP refused: %s",
                            self.options.group,
                            self.topic.name,
                            exc,
                        )
                        await anyio.sleep(backoff * (1 + self._rand.random()))
                        backoff = min(backoff * 2, 5.0)
                        continue
                    except CONNECTION_ERRORS as exc:
                        failures += 1
                        logger.warning(
                            "group %r of topic %r: read failed (%s); reconnecting",
                            self.options.group,
                            self.topic.name,
                            exc,
                        )
                        if failures > 1:  # the first reconnect is immediate
                            await anyio.sleep(backoff * (1 + self._rand.random()))
                            backoff = min(backoff * 2, 2.0)
                        # A reply lost with the connection may have put entries in
                        # this consumer's pending list that it never saw.
                        await self._read_own_pending()
                        continue
                    backoff = 0.05
                    failures = 0
                    if (
                        self._read_count < self.options.max_batch
                        and self._primed
                        and not self._buffer
                        and len(response) == count
                    ):
                        # More was waiting, and the handlers had finished the last
                        # batch before this one arrived: read more per round trip.
                        self._set_read_count(min(self._read_count * 2, self.options.max_batch))
                    self._primed = True
                    self._add_read(response)
        finally:
            self._reader_done.set()

    async def _wait_space(self) -> None:
        """Wait until the workers drained the buffer to the refill mark (reader and
        claimer share the event)."""
        space = self._space
        if space.is_set():
            self._space = space = anyio.Event()
        self._space_wanted = True
        await space.wait()

    def _add_read(self, response: list[Any]) -> None:
        """Queue the entries of an XREADGROUP reply (new entries: first delivery)."""
        if not response:
            return
        held = self._held
        buffer = self._buffer
        entry_id = ""
        for raw_id, flat in response:
            entry_id = raw_id.decode()
            if entry_id in held:
                continue  # already here (running, or waiting for its ack)
            work = held[entry_id] = Work(entry_id, flat or {}, 1)
            buffer.append(work)
        self._last_read_id = entry_id
        self._wake_one()

    def _wake_one(self) -> None:
        """Wake an idle worker, unless one was woken and has not run yet: that one
        takes the next entry, and wakes the next worker if more wait. Handlers that
        suspend thus fill every slot, while a batch handled by one worker whose
        handler never suspends costs one wake-up, not one per idle worker."""
        if self._idle and not self._waking:
            self._waking = True
            self._idle.pop().set()

    def _wake_all(self) -> None:
        for ready in self._idle:
            ready.set()
        self._idle.clear()

    def _add(self, work: Work, *, front: bool = False) -> None:
        if work.id in self._held and self._held[work.id] is not work:
            return  # already here (running, or waiting for its ack)
        self._held[work.id] = work
        if front:
            self._buffer.appendleft(work)
        else:
            self._buffer.append(work)
        self._wake_one()

    async def _read_own_pending(self) -> None:
        """Take back this consumer's own pending entries (after a restart or a lost reply)."""
        start = "-"
        page = max(self.options.batch, 10)
        while not self._stopping:
            try:
                self._counters.reads += 1
                pending = await self._client.xpending_range(
                    self.keys.stream,
                    self.options.group,
                    min=start,
                    max="+",
                    count=page,
                    consumername=self.options.consumer,
                )
            except rex.ResponseError as exc:
                if is_nogroup(exc):
                    await self._recreate_group()
                else:
                    logger.error(
                        "group %r: reading own pending entries: %s", self.options.group, exc
                    )
                return
            except CONNECTION_ERRORS:
                await anyio.sleep(0.2)
                continue
            counts = {
                p["message_id"].decode(): int(p["times_delivered"])
                for p in pending
                if p["message_id"].decode() not in self._held
            }
            if counts:
                try:
                    await self._take(list(counts), counts)
                except CONNECTION_ERRORS:
                    await anyio.sleep(0.2)
                    continue
            if len(pending) < page:
                return
            start = "(" + pending[-1]["message_id"].decode()

    async def _take(self, ids: list[str], counts: dict[str, int]) -> None:
        """XCLAIM ``ids`` to this consumer (a new delivery: Redis counts it) and queue them."""
        while len(self._buffer) >= self._capacity and not self._stopping:
            await self._wait_space()
        claimed = await self._client.xclaim(
            self.keys.stream, self.options.group, self.options.consumer, 0, ids
        )
        got = set()
        waits = await self.retry_times(
            [e.decode() for e, fields in claimed if e is not None and fields]
        )
        for entry_id, fields in claimed:
            if entry_id is None:  # Redis 6.2: a deleted entry comes back as nil
                continue
            eid = entry_id.decode()
            got.add(eid)
            if not fields:
                await self.count_trimmed([eid])
                continue
            work = Work(eid, fields, counts.get(eid, 0) + 1)
            if eid in waits:
                self.add_deferred(work, waits[eid])  # taken back during a long backoff
            else:
                self._add(work)
        gone = [i for i in ids if i not in got]
        if gone:
            # Redis >= 7 drops deleted entries from the pending list on XCLAIM.
            await self.count_trimmed(gone)

    # The claimer's view of this member (ClaimHost).

    def holds(self, entry_id: str) -> bool:
        return entry_id in self._held

    def heartbeat_ids(self) -> list[str]:
        return [i for i in self._held if i not in self._retrying or i in self._deferred]

    def claim_space(self) -> int:
        return self._capacity - len(self._buffer)

    def add_claimed(self, work: Work) -> None:
        self._add(work, front=True)

    async def retry_times(self, ids: list[str]) -> dict[str, float]:
        """Seconds each of ``ids`` must still wait for a long retry noted in Redis
        (only those whose retry time is still ahead, by the server's clock)."""
        if not ids:
            return {}
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zmscore(self._retry_key, ids)
            (seconds, micros), scores = await pipe.execute()
        now = int(seconds) * 1000 + int(micros) // 1000
        return {
            entry_id: (score - now) / 1000
            for entry_id, score in zip(ids, scores, strict=True)
            if score is not None and score > now
        }

    def add_deferred(self, work: Work, wait: float) -> None:
        """Take an entry claimed (or taken back) while it waits out a long retry:
        run it once its retry time comes, not before (the claim counted the attempt)."""
        if work.id in self._held:
            return
        self._held[work.id] = work
        self._schedule_retry(work, wait=wait, was_claimed=True)

    def _forget(self, entry_id: str) -> None:
        self._held.pop(entry_id, None)

    async def count_trimmed(self, ids: list[str]) -> None:
        """Count and report entries trimmed while pending, and clear what they left
        behind: their long-retry time (``retry-at``), which nothing else removes once
        the entry cannot be retried, and on Redis 6.2 their pending-list entry
        (which XCLAIM keeps there, unlike Redis 7; nothing is left to deliver)."""
        self._counters.lost_to_trim += len(ids)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._retry_key, *ids)
                pipe.xack(self.keys.stream, self.options.group, *ids)
                await pipe.execute()
        except (rex.RedisError, OSError) as exc:
            logger.warning(
                "group %r: could not clear what trimmed entries left in Redis (%s)",
                self.options.group,
                exc,
            )
        logger.error(
            "topic %r group %r: %d pending entries were trimmed before they were handled: %s",
            self.topic.name,
            self.options.group,
            len(ids),
            ", ".join(ids[:10]),
        )
        if signals.trimmed.receivers:
            emit(
                signals.trimmed,
                self._sender,
                topic=self.topic.name,
                group=self.options.group,
                entry_ids=tuple(ids),
            )

    async def _recreate_group(self) -> None:
        """The group vanished (FLUSHALL, failover): recreate it at the durable cursor."""
        now = time.monotonic()
        if len(self._recreate_times) == self._recreate_times.maxlen:
            wait = self._recreate_times[0] + 1.0 - now
            if wait > 0:  # at most 5 attempts per second
                await anyio.sleep(wait)
        self._recreate_times.append(time.monotonic())
        candidates: list[str] = []
        try:
            stored = await self._client.hget(self.keys.cursors, self.options.group)
        except CONNECTION_ERRORS:
            stored = None
        if stored:
            candidates.append(stored.decode())
        own = self._watermark()
        if own is not None:
            candidates.append(own)
        start = min(candidates, key=id_key) if candidates else "0"
        if not self._nogroup_logged:
            self._nogroup_logged = True
            logger.error(
                "consumer group %r of topic %r vanished (NOGROUP: flushed, deleted, or lost in a"
                " failover); recreating it at %s",
                self.options.group,
                self.topic.name,
                start,
            )
        try:
            await self._client.xgroup_create(
                self.keys.stream, self.options.group, id=start, mkstream=True
            )
        except rex.ResponseError as exc:
            if not is_busygroup(exc):
                logger.error("group %r: recreating failed: %s", self.options.group, exc)
        except CONNECTION_ERRORS as exc:
            logger.warning("group %r: recreating failed: %s", self.options.group, exc)
        else:
            self._counters.group_recreated += 1

    def _watermark(self) -> str | None:
        """An id at or below which everything this consumer read is handled."""
        if self._held:
            return previous_id(min(self._held, key=id_key))
        return self._last_read_id

    # -- handling ------------------------------------------------------------------------

    async def _workers(self) -> None:
        try:
            with self._worker_scope:
                async with anyio.create_task_group() as tg:
                    for _ in range(self.options.concurrency):
                        tg.start_soon(self._worker)
        finally:
            self._workers_done.set()

    async def _worker(self) -> None:
        buffer = self._buffer
        while True:
            if buffer:
                work = buffer.popleft()
                if buffer and self._idle and not self._waking:
                    self._wake_one()  # more waits: for when this handler suspends
                if self._space_wanted and len(buffer) <= self._refill_at:
                    self._space_wanted = False
                    self._space.set()
            elif self._closed:
                return
            else:
                ready = anyio.Event()
                self._idle.append(ready)
                await ready.wait()
                self._waking = False
                # One more turn of the event loop before taking entries: what was
                # scheduled with this wake-up runs first. That is the reader's
                # next XREADGROUP (redis-py sends through asyncio.wait_for, a new
                # task before Python 3.12): without this turn, a handler that
                # never suspends holds the loop for the whole batch, and the next
                # read leaves only when the batch is done.
                await anyio.lowlevel.checkpoint()
                continue
            self._running[work.id] = work
            try:
                await self._process(work)
            except (rex.RedisError, OSError) as exc:
                # Redis failed us mid-way (after the bounded retries of the command
                # client): the entry stays pending and comes back, by a re-read of
                # this member's pending list or a claim. Never fatal for the bus.
                self._held.pop(work.id, None)
                logger.error(
                    "group %r of topic %r: entry %s left pending: %s",
                    self.options.group,
                    self.topic.name,
                    work.id,
                    exc,
                )
            finally:
                self._running.pop(work.id, None)

    async def _process(self, work: Work) -> None:
        spec = self.spec
        try:
            env = self._decode(self.topic.name, work.id, work.fields)
            payload = (
                env.data if self._passthrough else self._codec.structure(env, self._payload_type)
            )
        except DecodeError as exc:
            await self._dead_letter(work, None, reason=exc.reason, error=exc)
            return
        max_attempts = self._max_attempts
        if work.count > max_attempts:
            # Delivered more often than allowed without a verdict: the handler
            # keeps crashing (or hanging) its process. Do not run it again.
            await self._dead_letter(work, env, reason="max_deliveries", error=None)
            return
        dedupe = self._dedupe
        if dedupe is not None and env.id and await dedupe.seen(env.id):
            self._counters.deduplicated += 1
            self._ack(work.id, None)
            return
        try:
            result = invoke(spec, payload, env, self.options.group, work.count)
            if spec.awaits:
                result = await result
        except Release as release:
            self._handed_back.append((work, release.charge))
            return
        except Exception as exc:
            self._counters.failed += 1
            self._report(env, exc, work.count)
            if work.count >= max_attempts:
                await self._dead_letter(work, env, reason="handler_error", error=exc)
            else:
                self._schedule_retry(work)
            return
        if result is not None and self._chainer is not None:
            await self._chainer.chain(work, env, result)
        else:
            self._ack(work.id, env.id)
        self._counters.handled += 1
        if signals.delivered.receivers:
            emit(
                signals.delivered,
                self._sender,
                topic=self.topic.name,
                event_id=env.id,
                subscription=spec.user_fn,
            )

    def _report(self, env: Envelope, error: BaseException, attempt: int) -> None:
        if self._counters.failed == 1 or self._counters.failed % 100 == 0:
            logger.error(
                "handler %s of %r (group %r) failed on attempt %d (%d failures so far;"
                " logged once per 100): %s",
                self.spec.name,
                self.topic.name,
                self.options.group,
                attempt,
                self._counters.failed,
                error,
                exc_info=error if self._counters.failed == 1 else None,
            )
        if signals.failed.receivers:
            emit(
                signals.failed,
                self._sender,
                topic=self.topic.name,
                event_id=env.id,
                subscription=self.spec.user_fn,
                error=error,
            )

    def _ack(self, entry_id: str, event_id: str | None) -> None:
        self._acks.append(entry_id)
        if event_id and self._dedupe is not None:
            self._marks.append(event_id)
        if self._ack_waiting:
            self._ack_waiting = False
            self._ack_ready.set()

    def _schedule_retry(
        self, work: Work, *, wait: float | None = None, was_claimed: bool = False
    ) -> None:
        """Retry ``work`` after its backoff.

        A short backoff (up to half of ``claim_idle``) is waited out here: the
        entry's idle time grows meanwhile, and the retry's ``XCLAIM`` (min idle 80%
        of the backoff) finds it still unclaimed. A longer one is noted in Redis
        (``RETRY_DEFER``) and the heartbeat keeps the entry: if this member dies,
        whoever claims the entry reads the retry time and waits for it, so the
        event is neither lost nor retried early. ``wait``/``was_claimed``: an entry
        claimed or taken back during its long backoff (its claim counted the
        attempt: no ``XCLAIM`` again).
        """
        attempt = work.count
        delay = self.options.retry.delay(attempt, self._rand.random()) if wait is None else wait
        long = wait is not None or delay > self.options.claim.idle / 2
        self._retrying[work.id] = work
        if long:
            self._deferred.add(work.id)

        async def retry() -> None:
            if long and wait is None:
                try:
                    await self._defer_script(
                        keys=[self._retry_key], args=[work.id, int(delay * 1000)]
                    )
                except Exception as exc:  # it still waits here
                    logger.warning(
                        "group %r: could not note the retry time of %s in Redis (%s); it"
                        " waits in this process",
                        self.options.group,
                        work.id,
                        exc,
                    )
            await anyio.sleep(delay)
            if self._stopping or work.id not in self._retrying:
                return
            if long:
                await self._run_deferred(work, claimed=was_claimed)
                return
            try:
                claimed = await self._client.xclaim(
                    self.keys.stream,
                    self.options.group,
                    self.options.consumer,
                    max(int(delay * 1000 * 0.8), 0),
                    [work.id],
                )
            except Exception as exc:
                logger.warning(
                    "group %r: retry of %s failed (%s); another consumer claims it after"
                    " claim_idle",
                    self.options.group,
                    work.id,
                    exc,
                )
                self._retrying.pop(work.id, None)
                self._held.pop(work.id, None)
                return
            self._retrying.pop(work.id, None)
            if not claimed:
                # Claimed by another consumer meanwhile, or acked: not ours now.
                self._held.pop(work.id, None)
                return
            entry_id, fields = claimed[0]
            if entry_id is None or not fields:
                self._held.pop(work.id, None)
                await self.count_trimmed([work.id])
                return
            self._counters.retried += 1
            work.fields = fields
            work.count = attempt + 1
            self._add(work, front=True)

        assert self._retry_tg is not None
        self._retry_tg.start_soon(retry)

    async def _run_deferred(self, work: Work, *, claimed: bool) -> None:
        """The end of a long backoff: still this member's? Then retry it now."""
        self._retrying.pop(work.id, None)
        self._deferred.discard(work.id)
        try:
            if not claimed:
                pending = await self._client.xpending_range(
                    self.keys.stream, self.options.group, min=work.id, max=work.id, count=1
                )
                if not pending:
                    # Acked elsewhere, or trimmed: Redis >= 7 drops a trimmed entry
                    # from the pending list when an XCLAIM (this member's heartbeat)
                    # meets it.
                    self._held.pop(work.id, None)
                    await self._settle_gone(work.id)
                    return
                if pending[0]["consumer"].decode() != self.options.consumer:
                    self._held.pop(work.id, None)  # claimed by another member
                    return
                got = await self._client.xclaim(
                    self.keys.stream, self.options.group, self.options.consumer, 0, [work.id]
                )
                if not got or got[0][0] is None or not got[0][1]:
                    # Pending here a moment ago, not claimable now: trimmed (Redis 7
                    # drops it and returns nothing, 6.2 returns nil and keeps it).
                    self._held.pop(work.id, None)
                    await self.count_trimmed([work.id])
                    return
                work.fields = got[0][1]
                work.count += 1
            await self._client.zrem(self._retry_key, work.id)
        except Exception as exc:  # the entry stays pending for a claim
            logger.warning(
                "group %r: retry of %s failed (%s); another consumer claims it after claim_idle",
                self.options.group,
                work.id,
                exc,
            )
            self._held.pop(work.id, None)
            return
        self._counters.retried += 1
        self._add(work, front=True)

    async def _settle_gone(self, entry_id: str) -> None:
        """A long retry found its entry no longer pending: remove its retry time,
        and count it trimmed if the stream no longer holds it and no one ran the
        retry (whoever does removes the retry time first)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.zrem(self._retry_key, entry_id)
            pipe.xrange(self.keys.stream, entry_id, entry_id, count=1)
            removed, entry = await pipe.execute()
        if int(removed) and not entry:
            await self.count_trimmed([entry_id])

    async def _retries(self) -> None:
        """Owns the tasks waiting out a retry's backoff (cancelled together on stop)."""
        with self._retry_scope:
            async with anyio.create_task_group() as tg:
                self._retry_tg = tg
                await anyio.sleep_forever()

    async def _dead_letter(
        self, work: Work, env: Envelope | None, *, reason: str, error: BaseException | None
    ) -> None:
        await self._dead_letters.write(work, env, reason=reason, error=error)
        self._forget(work.id)

    # -- acking --------------------------------------------------------------------------

    async def _ack_loop(self) -> None:
        try:
            with self._ack_scope:
                await self._ack_until_closed()
        finally:
            self._acker_done.set()

    async def _ack_until_closed(self) -> None:
        while True:
            if not self._acks:
                if self._acks_closed:
                    return
                self._ack_ready = anyio.Event()
                self._ack_waiting = True
                await self._ack_ready.wait()
                continue
            ids, self._acks = self._acks, []
            marks, self._marks = self._marks, []
            await self._flush(ids, marks)

    async def _flush(self, ids: list[str], marks: list[str]) -> None:
        backoff = 0.05
        retried = False
        while True:
            extra: list[tuple[Any, ...]] = []
            if marks and self._dedupe is not None:
                extra += self._dedupe.mark_commands(marks)
            now = time.monotonic()
            if now - self._cursor_written >= 1.0:
                # The durable cursor trails by up to a second: it only bounds
                # what a recreated group re-delivers.
                watermark = self._watermark()
                if watermark is not None:
                    self._cursor_written = now
                    extra.append(("HSET", self.keys.cursors, self.options.group, watermark))
            try:
                if extra:
                    async with self._client.pipeline(transaction=False) as pipe:
                        pipe.xack(self.keys.stream, self.options.group, *ids)
                        for command in extra:
                            pipe.execute_command(*command)
                        result = (await pipe.execute(raise_on_error=False))[0]
                else:  # the usual flush: one command, no Pipeline object
                    try:
                        result = await self._client.xack(self.keys.stream, self.options.group, *ids)
                    except rex.ResponseError as exc:
                        result = exc
                # Held until the ack is through: a re-read of this member's pending
                # list meanwhile must not take them for new (or trimmed) entries.
                self._held_after_ack(ids)
                break
            except CONNECTION_ERRORS as exc:
                logger.warning("group %r: ack failed (%s); retrying", self.options.group, exc)
                retried = True
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        if isinstance(result, BaseException):
            # NOGROUP: the group vanished with its pending list; the reader recreates it.
            logger.warning("group %r: ack failed: %s", self.options.group, result)
            acked = 0
        else:
            acked = int(result)
        self._counters.acked += acked
        if acked < len(ids) and not retried:
            # After a failed attempt, a shortfall is ambiguous: the attempt whose reply
            # was lost (a timeout after the process was frozen, a dropped connection)
            # may have acked them itself. Only a first attempt's shortfall is another
            # member's doing (F3: it claimed them and acked first).
            self._counters.ack_lost_ownership += len(ids) - acked

    def _held_after_ack(self, ids: list[str]) -> None:
        for entry_id in ids:
            self._held.pop(entry_id, None)
