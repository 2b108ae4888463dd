"""One worker of one work queue in this bus: takes jobs, runs them, settles them.

A worker owns a processing list in Redis (``{prefix}:{<queue>}:q-active:<worker id>``).
Every job it takes is moved there by the same command that takes it (``QUEUE_TAKE``:
``LMOVE`` level by level, most urgent first; or ``BLMOVE`` from the level-0 list
when nothing waits), and leaves it only when it is settled: acked (``QUEUE_ACK``,
batched), put back for a retry (``QUEUE_RETRY``, at once or through the schedule),
or dead-lettered (``QUEUE_DEAD``). So a job is never only in a process's memory.

Recovery:

* every ``heartbeat / 3`` seconds the worker renews its entry in the queue's
  workers zset (``QUEUE_HEARTBEAT``, by the Redis clock) and learns which workers'
  heartbeats lapsed; it puts their jobs back at the front of the most urgent level
  (``QUEUE_REAP``), or dead-letters a job that workers died holding
  ``max_attempts`` times (a job that kills its worker must not kill them all);
  it reaps only when its previous heartbeat went through too: after Redis refused
  or lost every write for a while (OOM, a restart), the live workers get one
  interval to renew theirs before any is taken for dead;
* on the same timer it reads its own processing list and puts back what it does
  not hold (a reply lost with a connection: the job moved, the worker never saw
  it), once the job was seen there, unheld, twice in a row;
* on shutdown, what it did not finish goes back at the front (``QUEUE_REAP`` on its
  own list).

Why one module past 600 lines: it is one worker, one concept. Taking, running,
settling, the heartbeat, reaping and the orphan check share the same state (what
the worker holds, its free slots, its acks in flight), and the orphan check is
only right because it reads that state in the same event loop as the settling
code that changes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import socket
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs
import orjson
import redis.exceptions as rex

from .. import signals
from .._config import RetryPolicy
from .._connection import translate
from .._envelope import CONTENT_BYTES, CONTENT_JSON, WIRE_VERSION, Envelope
from .._handlers import HandlerSpec, invoke
from .._keys import NUDGE, QueueKeys, delayed_index, delayed_wake, schedule_member
from .._stats import WorkerStatistics
from ..errors import BusStateError, DecodeError, JobTimeout, PayloadError, PayloadTooLarge
from ..signals import emit

if TYPE_CHECKING:
    from .._codec import Codec
    from ._queue import Queue

__all__ = ["QueueWorker", "WorkerOptions", "WorkerScripts"]

logger = logging.getLogger("eventbus")

_NUDGE_BYTES: Final = NUDGE.encode()
_REAP_BATCH: Final = 100
_LAPSED_PER_BEAT: Final = 10
_ACK_BATCH: Final = 500
_ERROR_MAX: Final = 1024
_TRACEBACK_MAX: Final = 4096
_RATE_WINDOW: Final = 60.0
CONNECTION_ERRORS: Final = (rex.ConnectionError, rex.TimeoutError, OSError)


@attrs.frozen(kw_only=True)
class WorkerOptions:
    """How one worker runs (``EventBus.worker`` / ``EventBus.jobs`` arguments)."""

    concurrency: int
    max_attempts: int
    timeout: float | None
    retry: RetryPolicy
    heartbeat: float
    """Seconds without a heartbeat after which a worker counts as dead."""
    block: float
    dead_maxlen: int = 100_000


@attrs.frozen
class WorkerScripts:
    """The queue scripts, registered once per bus."""

    take: Any
    admit: Any
    ack: Any
    dead: Any
    retry: Any
    heartbeat: Any
    reap: Any
    give_back: Any


def worker_id() -> str:
    """A worker id unique to this run: host, process, random."""
    host = socket.gethostname().replace(":", "_")[:64] or "host"
    return f"{host}:{os.getpid()}:{os.urandom(4).hex()}"


class QueueWorker:
    """Runs jobs of ``queue`` with ``spec`` (a handler), or hands them to ``deliver``
    (an iterator's buffer) to be settled by the caller."""

    def __init__(
        self,
        *,
        queue: Queue[Any],
        keys: QueueKeys,
        prefix: str,
        options: WorkerOptions,
        codec: Codec,
        client: Any,
        blocking: Any,
        scripts: WorkerScripts,
        sender: object,
        spec: HandlerSpec | None = None,
        deliver: Callable[[Envelope, bytes, int, int], None] | None = None,
    ) -> None:
        self.queue = queue
        self.keys = keys
        self.options = options
        self.spec = spec
        self.id = worker_id()
        self.processing = keys.processing(self.id)
        self._acked = keys.acked(self.id)
        self._prefix = prefix
        self._codec = codec
        self._client = client
        self._blocking = blocking
        self._scripts = scripts
        self._sender = sender
        self._deliver = deliver
        self._rand = random.Random()
        self._outstanding = 0
        self._held: collections.Counter[bytes] = collections.Counter()
        """Jobs in the processing list that this worker knows of: taken, not yet
        removed by a settling script whose reply came back."""
        self._suspects: dict[bytes, int] = {}
        self._acks: list[tuple[str, bytes]] = []
        self._ack_seq = 0
        self._ack_retry: tuple[str, list[tuple[str, bytes]]] | None = None
        """An ack batch whose call failed, with its token: sent again as it was, so
        that the script knows a run of its own if the first one went through."""
        self._ack_wake = anyio.Event()
        self._ack_lock = anyio.Lock()
        self._settled_all = False
        """Stopped and put back: a job settled from now on would be settled twice."""
        self._space = anyio.Event()
        self._idle = anyio.Event()
        self._stopping = False
        self._take_scope = anyio.CancelScope()
        self._ready: collections.deque[tuple[bytes, int, int]] = collections.deque()
        """Jobs taken, waiting for a slot (never more than the free slots)."""
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._jobs_done = anyio.Event()
        self._tg: anyio.abc.TaskGroup | None = None
        self._calls = 0
        self._beat_wrote = False
        """Whether the last heartbeat went through (Redis took a write)."""
        self._rates: collections.deque[tuple[float, int, int, int]] = collections.deque()
        self.started = self.finished = self.failed = self.retried = 0
        self.dead_lettered = self.reaped = self.orphans = self.lost_ownership = 0

    # -- lifecycle --------------------------------------------------------------------

    async def run(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Register (first heartbeat), then take jobs until stopped."""
        await self._beat()
        async with anyio.create_task_group() as tg:
            self._tg = tg
            await tg.start(self._host_jobs)
            tg.start_soon(self._heartbeat_loop)
            tg.start_soon(self._ack_loop)
            tg.start_soon(self._take_loop)
            task_status.started()

    async def _host_jobs(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The slots: ``concurrency`` long-lived tasks taking jobs from ``_ready``
        (a task per job cost more than the rest of a no-op job's handling)."""
        slots = self.options.concurrency if self._deliver is None else 1
        async with anyio.create_task_group() as jobs:
            for _ in range(slots):
                jobs.start_soon(self._slot)
            task_status.started()
            await self._jobs_done.wait()
            jobs.cancel_scope.cancel()

    async def _slot(self) -> None:
        ready = self._ready
        loop = asyncio.get_running_loop()
        while True:
            while not ready:
                waiter = loop.create_future()
                self._waiters.append(waiter)
                await waiter
            raw, level, held = ready.popleft()
            await self._start_job(raw, level, held)

    def begin_stop(self) -> None:
        """Take nothing more (a blocked take is abandoned: what it moved, if
        anything, is put back by :meth:`stop`)."""
        self._stopping = True
        self._take_scope.cancel()

    async def stop(self, deadline: float) -> None:
        """Let running jobs finish by ``deadline``, cancel the rest, flush acks, and
        put back every job not finished; then leave the workers set."""
        self.begin_stop()
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0)):
            while self._outstanding > 0 and self.spec is not None:
                self._idle = anyio.Event()
                await self._idle.wait()
        self._jobs_done.set()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(max(deadline - anyio.current_time(), 0.0) + 5.0):
                await self._flush_acks()
            self._settled_all = True
            with anyio.move_on_after(5.0):
                try:
                    await self._give_back_all()
                except (*CONNECTION_ERRORS, rex.RedisError) as exc:
                    logger.warning(
                        "queue %r worker %s: could not put back its unfinished jobs (%s);"
                        " a live worker will, once its heartbeat lapses",
                        self.queue.name,
                        self.id,
                        exc,
                    )
        if self._tg is not None:
            self._tg.cancel_scope.cancel()
        await self._blocking.aclose()

    async def _give_back_all(self) -> None:
        for _ in range(10_000):
            back, empty, _job = await self._scripts.reap(
                keys=[
                    self.keys.workers,
                    self.processing,
                    self.keys.levels[-1],
                    self.keys.stalled,
                ],
                args=[self.id, self.options.max_attempts, _REAP_BATCH, "1", NUDGE],
            )
            if int(empty):
                await self._client.hdel(self.keys.info, self.id)
                return
            if not int(back):
                return

    def statistics(self) -> WorkerStatistics:
        return WorkerStatistics(
            queue=self.queue.name,
            worker=self.id,
            concurrency=self.options.concurrency,
            running=self._outstanding,
            started=self.started,
            finished=self.finished,
            failed=self.failed,
            retried=self.retried,
            dead_lettered=self.dead_lettered,
            reaped=self.reaped,
            orphans=self.orphans,
            lost_ownership=self.lost_ownership,
        )

    # -- taking -----------------------------------------------------------------------

    async def _take_loop(self) -> None:
        rate = self.queue.rate
        limit = "" if rate is None else rate[0]
        window = 0 if rate is None else max(round(rate[1] * 1000), 1)
        take_keys = [
            self.processing,
            self.keys.rate,
            self.keys.stalled,
            self.keys.counts,
            *self.keys.levels,
        ]
        drop_nudge = False
        backoff = 0.05
        with self._take_scope:
            while True:
                free = self.options.concurrency - self._outstanding
                if free <= 0:
                    self._space = anyio.Event()
                    await self._space.wait()
                    continue
                try:
                    self._calls += 1
                    reply = await self._scripts.take(
                        keys=take_keys,
                        args=[
                            free,
                            limit,
                            window,
                            f"{self.id}:{self._calls}",
                            NUDGE,
                            "1" if drop_nudge else "0",
                        ],
                    )
                    drop_nudge = False
                    wait_ms = int(reply[0])
                    for i in range(1, len(reply) - 2, 3):
                        await self._dispatch(reply[i], int(reply[i + 1]), int(reply[i + 2]))
                    if len(reply) > 1:
                        backoff = 0.05
                        continue
                    if wait_ms:
                        await anyio.sleep(wait_ms / 1000)
                        continue
                    job = await self._blocking.blmove(
                        self.keys.levels[0],
                        self.processing,
                        self.options.block,
                        "RIGHT",
                        "LEFT",
                    )
                    if job is None:
                        continue
                    if job == _NUDGE_BYTES:
                        drop_nudge = True
                        continue
                    self._calls += 1
                    wait_ms, held = await self._scripts.admit(
                        keys=[
                            self.processing,
                            self.keys.rate,
                            self.keys.stalled,
                            self.keys.counts,
                            self.keys.levels[0],
                        ],
                        args=[job, limit, window, f"{self.id}:{self._calls}"],
                    )
                    if int(wait_ms):
                        await anyio.sleep(int(wait_ms) / 1000)
                        continue
                    await self._dispatch(job, 0, int(held))
                    backoff = 0.05
                except (*CONNECTION_ERRORS, rex.ResponseError) as exc:
                    # A reply lost here may have moved jobs into the processing list
                    # that this worker never saw: the orphan check puts them back.
                    error = translate(exc, topic=self.queue.name, command="EVALSHA")
                    logger.warning(
                        "queue %r worker %s: taking jobs failed (%s: %s); retrying in %.2fs",
                        self.queue.name,
                        self.id,
                        type(error).__name__,
                        error,
                        backoff,
                    )
                    await anyio.sleep(backoff * (1 + self._rand.random()))
                    backoff = min(backoff * 2, 2.0)

    async def _dispatch(self, raw: bytes, level: int, held: int) -> None:
        """Hand a taken job to a slot (or, in the iterator form, to the caller). A job
        that a dead worker held (``held``) runs alone: it is handed on only once every
        other job this worker holds is settled and out of its processing list (acks
        written, not only counted), and no other is taken until it is settled and
        out too. A reaper counts a death against every job in the dead worker's
        processing list; so if this job kills this process too, it is the only job
        blamed for it (a count of deaths per job decides ``worker_lost``), and the
        others it shared a dead worker with run alone once and are cleared. In the
        iterator form, "held" includes the jobs handed to the caller and not yet
        settled: the caller settles them before it gets this one (the take script
        takes a suspect last in its call, so no job taken after it waits behind it)."""
        self._held[raw] += 1
        alone = held > 0
        if alone:
            await self._hold_only(raw)
        self._outstanding += 1
        self.started += 1
        self._ready.append((raw, level, held))
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break
        if alone:
            await self._hold_only(None)

    async def _hold_only(self, raw: bytes | None) -> None:
        """Wait until this worker holds no job but ``raw`` (once, if given): every
        other job settled, and its settling script's reply back (an ack counted but
        not yet written leaves the job in the processing list)."""
        while True:
            others = sum(self._held.values()) - (0 if raw is None else 1)
            if others <= 0 and self._outstanding <= 0:
                return
            if self._acks:
                self._ack_wake.set()
            self._space = anyio.Event()
            await self._space.wait()

    async def _start_job(self, raw: bytes, level: int, held: int) -> None:
        try:
            env = self._decode(raw)
        except PayloadError as exc:
            await self._dead(raw, "", level, exc, held + 1, reason=_reason(exc))
            return
        attempt = env.att + held + 1
        if self._deliver is not None:
            self._deliver(env, raw, level, attempt)
            return
        await self._run(env, raw, level, attempt)

    def _decode(self, raw: bytes) -> Envelope:
        env = self._codec.decode(self.queue.name, raw)
        if self.spec is not None:
            tp = self.spec.payload_type
            if not (tp is object or tp is Any):
                self._codec.structure(env, tp)
        elif self.queue.type is not object:
            self._codec.structure(env, self.queue.type)
        return env

    async def _run(self, env: Envelope, raw: bytes, level: int, attempt: int) -> None:
        spec = self.spec
        assert spec is not None
        tp = spec.payload_type
        payload = env.data if tp is object or tp is Any else self._codec.structure(env, tp)
        timeout = self.options.timeout
        try:
            if timeout is None:
                result = invoke(spec, payload, env, None, attempt)
                if spec.awaits:
                    await result
            else:
                with anyio.move_on_after(timeout) as scope:
                    result = invoke(spec, payload, env, None, attempt)
                    if spec.awaits:
                        await result
                if scope.cancelled_caught:
                    raise JobTimeout(
                        f"job ran past timeout={timeout:g}s and was cancelled",
                        queue=self.queue.name,
                        job_id=env.id,
                    )
        except Exception as exc:
            await self.fail(env, raw, level, attempt, exc)
        else:
            self.ack(env, raw)

    # -- settling ---------------------------------------------------------------------

    def ack(self, env: Envelope, raw: bytes) -> None:
        """The job is done: its slot is free now; it leaves the processing list with
        the next batch of acks."""
        self._check_open()
        self.finished += 1
        self._acks.append((env.id, raw))
        self._ack_wake.set()
        self._release_slot()
        if signals.delivered.receivers:
            emit(signals.delivered, self._sender, topic=self.queue.name, event_id=env.id)

    async def fail(
        self,
        env: Envelope,
        raw: bytes,
        level: int,
        attempt: int,
        error: BaseException,
        *,
        requeue: bool = True,
        delay: float | None = None,
    ) -> None:
        """A failed attempt: retried after the retry policy's backoff (or ``delay``)
        while attempts remain and ``requeue``, else dead-lettered."""
        self._check_open()
        self.failed += 1
        _log_failure(self.queue.name, env.id, attempt, error, self.failed)
        if signals.failed.receivers:
            emit(
                signals.failed,
                self._sender,
                topic=self.queue.name,
                event_id=env.id,
                subscription=None,
                error=error,
            )
        if not requeue or attempt >= self.options.max_attempts:
            reason = "handler_error" if requeue else "rejected"
            await self._dead(raw, env.id, level, error, attempt, reason=reason)
            return
        wait = self.options.retry.delay(attempt, self._rand.random()) if delay is None else delay
        job_id = env.id or os.urandom(16).hex()
        following = _next_attempt(env, raw, job_id, attempt)
        delayed, data = self.keys.delayed(level)
        try:
            moved = await self._scripts.retry(
                keys=[
                    self.processing,
                    self.keys.levels[level],
                    self.keys.levels[0],
                    delayed,
                    data,
                    delayed_index(self._prefix),
                    self.keys.stalled,
                    self.keys.counts,
                ],
                args=[
                    raw,
                    following,
                    job_id,
                    max(round(wait * 1000), 0),
                    schedule_member(self.queue.name, level),
                    delayed_wake(self._prefix),
                    NUDGE,
                ],
            )
        except (*CONNECTION_ERRORS, rex.RedisError) as exc:
            logger.error(
                "queue %r: job %s could not be put back for a retry (%s); it stays in"
                " this worker's processing list and is put back from there",
                self.queue.name,
                env.id or "(raw)",
                exc,
            )
            self._forget(raw)
            return
        if int(moved):
            self.retried += 1
        else:
            self.lost_ownership += 1
        self._forget(raw)

    async def _dead(
        self,
        raw: bytes,
        job_id: str,
        level: int,
        error: BaseException,
        attempts: int,
        *,
        reason: str,
        processing: str | None = None,
    ) -> None:
        fields: list[Any] = [
            "reason",
            reason,
            "error_type",
            type(error).__name__,
            "error",
            str(error)[:_ERROR_MAX],
            "traceback",
            "".join(traceback.format_exception(error))[-_TRACEBACK_MAX:],
            "attempts",
            attempts,
            "level",
            level,
            "worker",
            self.id,
            "at",
            time.time_ns() // 1_000_000,
        ]
        if job_id:
            fields += ["job_id", job_id]
        own = processing is None
        try:
            entry = await self._scripts.dead(
                keys=[
                    self.processing if own else processing,
                    self.keys.dead,
                    self.keys.ids,
                    self.keys.stalled,
                    self.keys.counts,
                ],
                args=[raw, job_id, self.options.dead_maxlen, *fields],
            )
        except (*CONNECTION_ERRORS, rex.RedisError) as exc:
            logger.error(
                "queue %r: job %s could not be dead-lettered (%s); it is put back instead",
                self.queue.name,
                job_id or "(raw)",
                exc,
            )
            if own:
                self._forget(raw)
            return
        if own:
            if entry is None:
                self.lost_ownership += 1
            else:
                self.dead_lettered += 1
            self._forget(raw)
        elif entry is not None:
            self.dead_lettered += 1
        if entry is not None:
            logger.error(
                "queue %r: job %s dead-lettered after %d attempt(s) (%s): %s",
                self.queue.name,
                job_id or "(raw)",
                attempts,
                reason,
                error,
            )
            if signals.dead_lettered.receivers:
                emit(
                    signals.dead_lettered,
                    self._sender,
                    topic=self.queue.name,
                    event_id=job_id,
                    group=None,
                    reason=reason,
                    error=error,
                    dead_letter_id=_text_id(entry),
                )

    def _check_open(self) -> None:
        if self._settled_all:
            raise BusStateError(
                f"queue {self.queue.name!r}: the worker stopped and put its unsettled jobs"
                " back; this one runs again"
            )

    def _forget(self, raw: bytes) -> None:
        """A settling script for ``raw`` returned: it is no longer this worker's."""
        self._held[raw] -= 1
        if self._held[raw] <= 0:
            del self._held[raw]
        self._release_slot()

    def _release_slot(self) -> None:
        """Once per job taken: by :meth:`ack` (the slot frees at once; the job stays
        held until its ack is written) or by :meth:`_forget`."""
        self._outstanding -= 1
        self._space.set()
        if self._outstanding <= 0:
            self._idle.set()

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wake.wait()
            self._ack_wake = anyio.Event()
            try:
                await self._flush_acks()
            except (*CONNECTION_ERRORS, rex.RedisError) as exc:
                logger.warning(
                    "queue %r worker %s: acks failed (%s); retrying",
                    self.queue.name,
                    self.id,
                    exc,
                )
                await anyio.sleep(0.1 + self._rand.random() * 0.2)
                self._ack_wake.set()

    async def _flush_acks(self) -> None:
        async with self._ack_lock:  # stop() waits for an ack in flight before putting back
            await self._flush_locked()

    async def _flush_locked(self) -> None:
        while self._acks or self._ack_retry is not None:
            if self._ack_retry is not None:
                token, batch = self._ack_retry
            else:
                batch, self._acks = self._acks[:_ACK_BATCH], self._acks[_ACK_BATCH:]
                self._ack_seq += 1
                token = str(self._ack_seq)
                self._ack_retry = (token, batch)  # until its reply is in
            args: list[Any] = ["finished", token]
            for job_id, raw in batch:
                args += (job_id, raw)
            removed = await self._scripts.ack(
                keys=[
                    self.processing,
                    self.keys.ids,
                    self.keys.stalled,
                    self.keys.counts,
                    self._acked,
                ],
                args=args,
            )  # a failure leaves the batch in _ack_retry: the loop (or stop) sends it again
            self._ack_retry = None
            if int(removed) < len(batch):
                self.lost_ownership += len(batch) - int(removed)
            for _job_id, raw in batch:
                self._held[raw] -= 1
                if self._held[raw] <= 0:
                    del self._held[raw]
            self._space.set()  # a job waiting to run alone waits for these writes

    # -- heartbeat, reaping, orphans --------------------------------------------------

    async def _beat(self, *, reap: bool = True) -> bool:
        reply = await self._scripts.heartbeat(
            keys=[self.keys.workers, self.keys.info],
            args=[
                self.id,
                max(round(self.options.heartbeat * 1000), 1),
                _LAPSED_PER_BEAT,
                self._rate_info(),
            ],
        )
        self._beat_wrote = True
        known = bool(int(reply[0]))
        if not reap:
            return known
        for lapsed in reply[1:]:
            wid = lapsed.decode() if isinstance(lapsed, bytes) else str(lapsed)
            if wid != self.id:
                await self._reap(wid)
        return known

    async def _heartbeat_loop(self) -> None:
        interval = self.options.heartbeat / 3
        while True:
            await anyio.sleep(interval)
            try:
                # Reap only if the previous beat went through as well: if it did
                # not (Redis refusing writes, restarting, unreachable), the other
                # workers could not beat either, and a live one would be taken for
                # dead before it had a chance to renew its heartbeat.
                reap, self._beat_wrote = self._beat_wrote, False
                if not await self._beat(reap=reap):
                    logger.warning(
                        "queue %r worker %s: its heartbeat had lapsed (event loop blocked,"
                        " connection lost?); its jobs were put back and may run twice",
                        self.queue.name,
                        self.id,
                    )
                await self._check_orphans()
            except (*CONNECTION_ERRORS, rex.RedisError) as exc:
                logger.warning(
                    "queue %r worker %s: heartbeat failed (%s)", self.queue.name, self.id, exc
                )

    async def _reap(self, wid: str) -> None:
        """Put back the jobs of worker ``wid``, whose heartbeat lapsed."""
        processing = self.keys.processing(wid)
        for _ in range(10_000):
            back, empty, job = await self._scripts.reap(
                keys=[self.keys.workers, processing, self.keys.levels[-1], self.keys.stalled],
                args=[wid, self.options.max_attempts, _REAP_BATCH, "0", NUDGE],
            )
            self.reaped += int(back)
            if int(back):
                logger.warning(
                    "queue %r: worker %s stopped heartbeating; %d of its jobs put back",
                    self.queue.name,
                    wid,
                    int(back),
                )
            if job:
                job_id = _job_id(self._codec, self.queue.name, job)
                await self._dead(
                    job,
                    job_id,
                    len(self.keys.levels) - 1,
                    WorkerLost(f"workers died holding it {self.options.max_attempts} times"),
                    self.options.max_attempts,
                    reason="worker_lost",
                    processing=processing,
                )
                continue
            if int(empty):
                await self._client.hdel(self.keys.info, wid)
                return
            if not int(back):
                return  # it came back

    async def _check_orphans(self) -> None:
        """Put back what sits in this worker's processing list unheld, seen twice."""
        bound = 4 * self.options.concurrency + 100
        items = await self._client.lrange(self.processing, 0, bound)
        present = collections.Counter(items)
        suspects = {
            raw: n - self._held.get(raw, 0)
            for raw, n in present.items()
            if n > self._held.get(raw, 0)
        }
        confirmed = {
            raw: min(n, self._suspects[raw]) for raw, n in suspects.items() if raw in self._suspects
        }
        self._suspects = suspects
        for raw, n in confirmed.items():
            for _ in range(n):
                if (
                    int(
                        await self._scripts.give_back(
                            keys=[self.processing, self.keys.levels[-1]], args=[raw, NUDGE]
                        )
                    )
                    and raw != _NUDGE_BYTES
                ):
                    self.orphans += 1
                    logger.warning(
                        "queue %r worker %s: a job in its processing list it never"
                        " received (a reply lost with a connection) was put back",
                        self.queue.name,
                        self.id,
                    )
            self._suspects.pop(raw, None)

    def _rate_info(self) -> str:
        now = time.monotonic()
        rates = self._rates
        rates.append((now, self.started, self.finished, self.failed))
        while len(rates) > 2 and rates[1][0] < now - _RATE_WINDOW:
            rates.popleft()
        first = rates[0]
        span = now - first[0]
        if span <= 0:
            started = finished = failed = 0.0
        else:
            started = (self.started - first[1]) / span
            finished = (self.finished - first[2]) / span
            failed = (self.failed - first[3]) / span
        return orjson.dumps([started, finished, failed]).decode()


class WorkerLost(Exception):
    """The job's workers kept dying while they held it."""


def _text_id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(error: PayloadError) -> str:
    if isinstance(error, PayloadTooLarge):
        return "too_large"
    if isinstance(error, DecodeError):
        return error.reason or "decode_error"
    return "decode_error"


def _job_id(codec: Codec, queue: str, raw: bytes) -> str:
    try:
        return codec.decode(queue, raw).id
    except PayloadError:
        return ""


def _next_attempt(env: Envelope, raw: bytes, job_id: str, attempt: int) -> bytes:
    """The job as its next attempt will take it: the same envelope with ``att``
    (failed attempts so far) set; a raw job gains an envelope to carry it."""
    if env.publisher or env.id:
        doc = orjson.loads(raw)
        if type(doc) is dict:
            doc["att"] = attempt
            return orjson.dumps(doc)
    doc = {"eventbus": WIRE_VERSION, "id": job_id, "att": attempt}
    if env.content_type == CONTENT_BYTES:
        import base64

        doc["ct"] = CONTENT_BYTES
        doc["data"] = base64.b64encode(env.data).decode()
    else:
        doc["ct"] = CONTENT_JSON
        doc["data"] = env.data
    return orjson.dumps(doc)


def _log_failure(queue: str, job_id: str, attempt: int, error: BaseException, n: int) -> None:
    if n == 1 or n % 100 == 0:
        logger.error(
            "queue %r: job %s failed on attempt %d (%d failures so far; logged once per 100): %s",
            queue,
            job_id or "(raw)",
            attempt,
            n,
            error,
            exc_info=error if n == 1 else None,
        )
