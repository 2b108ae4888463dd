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
The workers are in ``_worker``; statistics and dead letters read back, in ``_admin``.
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
import orjson
import redis.exceptions as rex

from .. import signals
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
from ..signals import emit
from . import _admin
from ._admin import JobDeadLetter
from ._job import JobSubscription
from ._queue import Queue
from ._worker import QueueWorker, WorkerOptions, WorkerScripts

__all__ = ["QueueFeature"]

logger = logging.getLogger("eventbus")

_SCRIPT_BATCH: Final = 500
"""Jobs one enqueue script call carries at most; more go as several calls in one
pipeline."""
_LPUSH_BATCH: Final = 1000
_MAX_JOB_ID: Final = 256


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

    async def _call_all(self, script: Any, keys: list[str], calls: list[list[Any]]) -> list[Any]:
        """One call of ``script`` per argument list, in one round trip (a pipeline
        when there are several); their replies in order."""
        if len(calls) == 1:
            return [await script(keys=keys, args=calls[0])]
        async with self._client.pipeline(transaction=False) as pipe:
            for args in calls:
                await script(keys=keys, args=args, client=pipe)
            return list(await pipe.execute())

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
        replies = await self._call_all(script, head, calls)
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
        replies = await self._call_all(script, head, calls)
        self._on_schedule()
        return [int(flag) for reply in replies for flag in reply[1:]], int(replies[0][0])

    # -- statistics and dead letters ----------------------------------------------------

    def known(self) -> list[Queue[Any]]:
        return [self._known[name] for name in sorted(self._known)]

    async def stats(self, queues: Iterable[Queue[Any]]) -> list[QueueStats]:
        """Read each queue's figures from Redis (``_admin.stats``)."""
        assert self._ctx is not None
        return await _admin.stats(self._client, self._ctx.codec, self._ctx.prefix, queues)

    async def dead_letters(
        self, queue: Queue[Any], *, count: int, after: str | None
    ) -> list[JobDeadLetter]:
        assert self._ctx is not None
        return await _admin.dead_letters(
            self._client, self._ctx.prefix, queue, count=count, after=after
        )

    async def replay_dead_letters(self, queue: Queue[Any], ids: Sequence[str] | None) -> int:
        assert self._ctx is not None
        return await _admin.replay_dead_letters(
            self._client, self._scripts["requeue"], self._ctx.prefix, queue, ids
        )

    async def purge_dead_letters(self, queue: Queue[Any], ids: Sequence[str] | None) -> int:
        assert self._ctx is not None
        return await _admin.purge_dead_letters(self._client, self._ctx.prefix, queue, ids)
