"""Work queues: enqueueing, the workers of this bus, dead letters and statistics.

A queue's jobs wait in Redis lists, one per priority level (``_keys.QueueKeys``):
``LPUSH`` in, taken from the other end, so each level is FIFO and any system that
can ``LPUSH`` a JSON value onto ``{prefix}:{<queue>}:q`` is a producer. Enqueueing
a job that needs no check is a plain ``LPUSH``; concurrent callers share one
pipeline per round trip. A job with a ``job_id`` (deduplicated while it waits or
runs), a job of a higher level (which may have to wake a blocked worker) and a
delayed job go through a script (``QUEUE_ENQUEUE``, ``QUEUE_SCHEDULE``).

Delayed jobs and retry backoffs are held in the delayed-events schedule, one per
(queue, level), and released by whichever bus runs the scheduler (``_delayed``).
The workers are in ``_worker``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, Final

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import orjson
import redis.exceptions as rex

from .. import signals
from .._codec import field_map
from .._connection import map_exceptions, translate
from .._envelope import Envelope, Receipt
from .._feature import FeatureContext
from .._handlers import HandlerSpec
from .._keys import (
    NUDGE,
    QueueKeys,
    delayed_index,
    delayed_wake,
    queue_keys,
    queue_registry,
    schedule_member,
)
from .._scripts import (
    QUEUE_ACK,
    QUEUE_ADMIT,
    QUEUE_DEAD,
    QUEUE_ENQUEUE,
    QUEUE_GIVE_BACK,
    QUEUE_HEARTBEAT,
    QUEUE_REAP,
    QUEUE_REQUEUE_DEAD,
    QUEUE_RETRY,
    QUEUE_SCHEDULE,
    QUEUE_TAKE,
)
from .._stats import QueueStatistics, QueueStats
from ..errors import PayloadError
from ..signals import emit
from ._job import JobSubscription
from ._queue import Queue
from ._worker import QueueWorker, WorkerOptions, WorkerScripts

__all__ = ["JobDeadLetter", "QueueFeature", "read_job_dead_letter"]

logger = logging.getLogger("eventbus")

_SCRIPT_BATCH: Final = 500
"""Jobs one enqueue script call carries at most; more go as several calls in one
pipeline."""
_LPUSH_BATCH: Final = 1000
_MAX_JOB_ID: Final = 256


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


class QueueFeature:
    """Enqueues jobs, runs this bus's workers, reads queue statistics."""

    def __init__(self, *, on_schedule: Callable[[], None]) -> None:
        self._on_schedule = on_schedule
        self._ctx: FeatureContext | None = None
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._worker_scripts: WorkerScripts | None = None
        self._declared: list[tuple[Queue[Any], HandlerSpec, WorkerOptions]] = []
        self._workers: list[QueueWorker] = []
        self._registered: set[str] = set()
        self._known: dict[str, Queue[Any]] = {}
        self._pushes: list[tuple[str, bytes, asyncio.Future[Any]]] = []
        self._draining = False
        self.enqueued = self.duplicates = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, ctx: FeatureContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._ctx = ctx
        client = self._client = ctx.clients.command_client(ctx.publish_timeout, "publish_timeout")
        self._scripts["enqueue"] = client.register_script(QUEUE_ENQUEUE)
        self._scripts["schedule"] = client.register_script(QUEUE_SCHEDULE)
        self._scripts["requeue"] = client.register_script(QUEUE_REQUEUE_DEAD)
        self._worker_scripts = WorkerScripts(
            take=client.register_script(QUEUE_TAKE),
            admit=client.register_script(QUEUE_ADMIT),
            ack=client.register_script(QUEUE_ACK),
            dead=client.register_script(QUEUE_DEAD),
            retry=client.register_script(QUEUE_RETRY),
            heartbeat=client.register_script(QUEUE_HEARTBEAT),
            reap=client.register_script(QUEUE_REAP),
            give_back=client.register_script(QUEUE_GIVE_BACK),
        )
        declared, self._declared = self._declared, []
        for queue, spec, options in declared:
            await self.start_worker(queue, options, spec=spec)
        task_status.started()

    def declare_worker(self, queue: Queue[Any], spec: HandlerSpec, options: WorkerOptions) -> None:
        """A ``@bus.worker`` handler: started with the bus, or now if it is open."""
        self._known.setdefault(queue.name, queue)
        if self._ctx is None:
            self._declared.append((queue, spec, options))
            return
        self._ctx.task_group.start_soon(self._start_later, queue, spec, options)

    async def _start_later(
        self, queue: Queue[Any], spec: HandlerSpec, options: WorkerOptions
    ) -> None:
        try:
            await self.start_worker(queue, options, spec=spec)
        except Exception as exc:
            logger.error("queue %r: worker %s could not start: %s", queue.name, spec.name, exc)

    async def start_worker(
        self,
        queue: Queue[Any],
        options: WorkerOptions,
        *,
        spec: HandlerSpec | None = None,
        deliver: Callable[[Envelope, bytes, int, int], None] | None = None,
    ) -> QueueWorker:
        ctx = self._ctx
        assert ctx is not None
        assert self._worker_scripts is not None
        await self._register(queue)
        worker = QueueWorker(
            queue=queue,
            keys=self.keys(queue),
            prefix=ctx.prefix,
            options=options,
            codec=ctx.codec,
            client=self._client,
            blocking=ctx.clients.unretried_client(socket_timeout=options.block + 10),
            scripts=self._worker_scripts,
            sender=ctx.sender,
            spec=spec,
            deliver=deliver,
        )
        with map_exceptions(topic=queue.name, command="EVALSHA"):
            await ctx.task_group.start(worker.run)
        self._workers.append(worker)
        return worker

    def subscription(
        self, queue: Queue[Any], options: WorkerOptions, check_open: Callable[[], None]
    ) -> JobSubscription[Any]:
        async def start(deliver: Callable[[Envelope, bytes, int, int], None]) -> QueueWorker:
            check_open()
            return await self.start_worker(queue, options, deliver=deliver)

        async def stop(worker: QueueWorker) -> None:
            assert self._ctx is not None
            await worker.stop(anyio.current_time() + self._ctx.shutdown_grace)
            if worker in self._workers:
                self._workers.remove(worker)

        assert self._ctx is not None
        self._known.setdefault(queue.name, queue)
        return JobSubscription(start, stop, queue.type, self._ctx.codec.structure)

    def begin_drain(self) -> None:
        self._draining = True
        for worker in self._workers:
            worker.begin_stop()

    async def drain(self, deadline: float) -> None:
        """Every worker stops: running jobs finish by ``deadline``, the rest go back."""
        if self._workers:
            async with anyio.create_task_group() as stops:
                for worker in self._workers:
                    stops.start_soon(worker.stop, deadline)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def statistics(self) -> QueueStatistics:
        return QueueStatistics(
            workers=tuple(w.statistics() for w in self._workers),
            enqueued=self.enqueued,
            duplicates=self.duplicates,
        )

    def worker_statistics(self, fn: object) -> list[Any]:
        return [w.statistics() for w in self._workers if w.spec is not None and w.spec.runs(fn)]

    # -- enqueueing ---------------------------------------------------------------------

    def keys(self, queue: Queue[Any]) -> QueueKeys:
        assert self._ctx is not None
        return queue_keys(self._ctx.prefix, queue.name, queue.priorities)

    async def _register(self, queue: Queue[Any]) -> None:
        """Note the queue's settings under the prefix (for the scheduler, stats, the CLI)."""
        self._known.setdefault(queue.name, queue)
        if queue.name in self._registered:
            return
        assert self._ctx is not None
        settings = {"priorities": queue.priorities, "rate": queue.rate}
        with map_exceptions(topic=queue.name, command="HSET"):
            await self._client.hset(
                queue_registry(self._ctx.prefix), queue.name, orjson.dumps(settings)
            )
        self._registered.add(queue.name)

    def _encode(
        self, queue: Queue[Any], job: Any, headers: dict[str, str], job_id: str | None
    ) -> tuple[str, bytes, int]:
        ctx = self._ctx
        assert ctx is not None
        jid = ctx.ids.event_id() if job_id is None else job_id
        raw, ms = ctx.codec.encode(
            queue.name, job, event_id=jid, publisher=ctx.ids.publisher_id, seq=0, headers=headers
        )
        return jid, raw, ms

    async def enqueue_many(
        self,
        queue: Queue[Any],
        jobs: Sequence[Any],
        *,
        headers: dict[str, str],
        priority: int,
        due: tuple[str, int] | None,
        job_ids: Sequence[str | None] | None,
    ) -> list[Receipt]:
        """Enqueue ``jobs`` (all encoded first: a bad one raises before any I/O) in one
        round trip; receipts in order."""
        ctx = self._ctx
        assert ctx is not None
        ids: Sequence[str | None] = [None] * len(jobs) if job_ids is None else job_ids
        encoded = [
            self._encode(queue, job, headers, jid) for job, jid in zip(jobs, ids, strict=True)
        ]
        await self._register(queue)
        keys = self.keys(queue)
        level = keys.levels[priority]
        try:
            if due is not None:
                flags, due_ms = await self._schedule(queue, keys, priority, encoded, ids, due)
            elif job_ids is None and priority == 0:
                await self._lpush(level, [raw for _, raw, _ in encoded])
                flags, due_ms = [1] * len(encoded), None
            else:
                flags = await self._enqueue_script(keys, level, encoded, ids)
                due_ms = None
        except rex.RedisError as exc:
            raise translate(exc, topic=queue.name, command="EVALSHA") from exc
        due_at = None if due_ms is None else datetime.fromtimestamp(due_ms / 1000, tz=timezone.utc)
        receipts = []
        for (jid, _raw, ms), flag in zip(encoded, flags, strict=True):
            duplicate = not int(flag)
            if duplicate:
                self.duplicates += 1
            else:
                self.enqueued += 1
                if signals.published.receivers:
                    emit(signals.published, ctx.sender, topic=queue.name, event_id=jid)
            receipts.append(
                Receipt(
                    id=jid,
                    topic=queue.name,
                    published_at=datetime.fromtimestamp(ms / 1000, tz=timezone.utc),
                    receivers=0,
                    due=due_at,
                    duplicate=duplicate,
                )
            )
        return receipts

    async def _lpush(self, key: str, raws: list[bytes]) -> None:
        """``LPUSH`` of jobs that need no check. Concurrent callers share one pipeline
        per round trip (the first caller of a round sends what queued by its next
        checkpoint, shielded); a large batch is one ``LPUSH`` per 1,000 jobs."""
        if len(raws) > 1:
            async with self._client.pipeline(transaction=False) as pipe:
                for start in range(0, len(raws), _LPUSH_BATCH):
                    pipe.lpush(key, *raws[start : start + _LPUSH_BATCH])
                await pipe.execute()
            return
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pushes.append((key, raws[0], fut))
        if len(self._pushes) == 1:
            await anyio.lowlevel.checkpoint()  # let this round's neighbours queue
            batch, self._pushes = self._pushes, []
            with anyio.CancelScope(shield=True):
                await self._send_pushes(batch)
        await fut

    async def _send_pushes(self, batch: list[tuple[str, bytes, asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                key, raw, _fut = batch[0]
                await self._client.lpush(key, raw)
            else:
                by_key: dict[str, list[bytes]] = {}
                for key, raw, _fut in batch:
                    by_key.setdefault(key, []).append(raw)
                async with self._client.pipeline(transaction=False) as pipe:
                    for key, raws in by_key.items():
                        for start in range(0, len(raws), _LPUSH_BATCH):
                            pipe.lpush(key, *raws[start : start + _LPUSH_BATCH])
                    await pipe.execute()
        except BaseException as exc:
            for _key, _raw, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for _key, _raw, fut in batch:
            if not fut.done():
                fut.set_result(None)

    async def _enqueue_script(
        self,
        keys: QueueKeys,
        level: str,
        encoded: list[tuple[str, bytes, int]],
        ids: Sequence[str | None],
    ) -> list[int]:
        script = self._scripts["enqueue"]
        head = [keys.ids, level, keys.levels[0]]
        calls = []
        for start in range(0, len(encoded), _SCRIPT_BATCH):
            args: list[Any] = [NUDGE]
            for (jid, raw, _ms), given in zip(
                encoded[start : start + _SCRIPT_BATCH],
                ids[start : start + _SCRIPT_BATCH],
                strict=True,
            ):
                args += ("" if given is None else jid, raw)
            calls.append(args)
        if len(calls) == 1:
            replies = [await script(keys=head, args=calls[0])]
        else:
            async with self._client.pipeline(transaction=False) as pipe:
                for args in calls:
                    await script(keys=head, args=args, client=pipe)
                replies = await pipe.execute()
        return [int(flag) for reply in replies for flag in reply]

    async def _schedule(
        self,
        queue: Queue[Any],
        keys: QueueKeys,
        level: int,
        encoded: list[tuple[str, bytes, int]],
        ids: Sequence[str | None],
        due: tuple[str, int],
    ) -> tuple[list[int], int]:
        ctx = self._ctx
        assert ctx is not None
        script = self._scripts["schedule"]
        delayed, data = keys.delayed(level)
        head = [
            keys.ids,
            delayed,
            data,
            delayed_index(ctx.prefix),
            keys.levels[level],
            keys.levels[0],
        ]
        mode, value = due
        if mode == "in" and len(encoded) > _SCRIPT_BATCH:
            seconds_, micros = await self._client.time()
            mode, value = "at", int(seconds_) * 1000 + int(micros) // 1000 + value
        calls = []
        for start in range(0, len(encoded), _SCRIPT_BATCH):
            args: list[Any] = [
                mode,
                value,
                schedule_member(queue.name, level),
                delayed_wake(ctx.prefix),
                NUDGE,
            ]
            for (jid, raw, _ms), given in zip(
                encoded[start : start + _SCRIPT_BATCH],
                ids[start : start + _SCRIPT_BATCH],
                strict=True,
            ):
                args += (jid, "0" if given is None else "1", raw)
            calls.append(args)
        if len(calls) == 1:
            replies = [await script(keys=head, args=calls[0])]
        else:
            async with self._client.pipeline(transaction=False) as pipe:
                for args in calls:
                    await script(keys=head, args=args, client=pipe)
                replies = await pipe.execute()
        self._on_schedule()
        return [int(flag) for reply in replies for flag in reply[1:]], int(replies[0][0])

    # -- statistics and dead letters ----------------------------------------------------

    def known(self) -> list[Queue[Any]]:
        return [self._known[name] for name in sorted(self._known)]

    async def stats(self, queues: Iterable[Queue[Any]]) -> list[QueueStats]:
        """Read each queue's figures from Redis (one round trip per queue, plus one
        for the processing lists of its workers)."""
        ctx = self._ctx
        assert ctx is not None
        out = []
        for queue in queues:
            keys = self.keys(queue)
            with map_exceptions(topic=queue.name, command="stats"):
                async with self._client.pipeline(transaction=False) as pipe:
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
                async with self._client.pipeline(transaction=False) as pipe:
                    for wid, _until in workers:
                        pipe.llen(keys.processing(_text(wid)))
                    processing = sum(int(v) for v in await pipe.execute()) if workers else 0
            oldest: float | None = None
            for head in heads:
                if head is None:
                    continue
                try:
                    env = ctx.codec.decode(queue.name, head)
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
        self, queue: Queue[Any], *, count: int, after: str | None
    ) -> list[JobDeadLetter]:
        keys = self.keys(queue)
        start = "-" if after is None else f"({after}"
        with map_exceptions(topic=queue.name, command="XRANGE"):
            entries = await self._client.xrange(keys.dead, start, "+", count=count)
        return [read_job_dead_letter(queue.name, entry_id, fields) for entry_id, fields in entries]

    async def replay_dead_letters(self, queue: Queue[Any], ids: Sequence[str] | None) -> int:
        """Put dead letters back on the queue (their level's list, at the back), each
        with its attempts reset, and remove them from the dead letters; atomically
        per entry. Returns how many."""
        ctx = self._ctx
        assert ctx is not None
        keys = self.keys(queue)
        script = self._scripts["requeue"]
        done = 0
        cursor = "-"
        for _ in range(1_000_000):
            if ids is None:
                entries = await self._client.xrange(keys.dead, cursor, "+", count=100)
            else:
                chunk, ids = list(ids[:100]), ids[100:]
                entries = []
                for entry_id in chunk:
                    entries += await self._client.xrange(keys.dead, entry_id, entry_id)
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

    async def purge_dead_letters(self, queue: Queue[Any], ids: Sequence[str] | None) -> int:
        keys = self.keys(queue)
        with map_exceptions(topic=queue.name, command="XDEL"):
            if ids is None:
                async with self._client.pipeline(transaction=True) as pipe:
                    pipe.xlen(keys.dead)
                    pipe.delete(keys.dead)
                    n, _ = await pipe.execute()
                return int(n)
            removed = 0
            for start in range(0, len(ids), 1000):
                removed += int(await self._client.xdel(keys.dead, *ids[start : start + 1000]))
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
