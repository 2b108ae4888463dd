"""The iterator form of a queue worker: jobs handed out one by one, settled by the caller."""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from datetime import timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import anyio

from .._config import seconds
from .._envelope import Delivery, Envelope
from ..errors import BusStateError

if TYPE_CHECKING:
    from ._worker import QueueWorker

__all__ = ["Job", "JobSubscription"]

T = TypeVar("T")


class Rejected(Exception):
    """What a job nacked without an error is recorded with."""


@final
class Job(Generic[T]):
    """One job taken from a queue by :meth:`EventBus.jobs`. Settle it exactly once:
    :meth:`ack` when it is done, :meth:`nack` when it is not. Until then it stays in
    this worker's processing list in Redis; a job never settled goes back to the
    queue when the iteration ends (and to another worker if this process dies).

    .. versionadded:: 0.3
    """

    __slots__ = ("_attempt", "_env", "_level", "_raw", "_settled", "_worker", "delivery", "value")

    def __init__(
        self,
        value: T,
        delivery: Delivery,
        *,
        worker: QueueWorker,
        env: Envelope,
        raw: bytes,
        level: int,
        attempt: int,
    ) -> None:
        self.value = value
        """The job, structured as the queue's type."""
        self.delivery = delivery
        """Its id, headers, enqueue time and ``attempt`` (1 for the first)."""
        self._worker = worker
        self._env = env
        self._raw = raw
        self._level = level
        self._attempt = attempt
        self._settled = False

    @property
    def id(self) -> str:
        """The job id (``job_id=`` given to ``enqueue``, else minted; empty for a raw job)."""
        return self._env.id

    @property
    def attempt(self) -> int:
        """Which attempt this is, from 1."""
        return self._attempt

    @property
    def priority(self) -> int:
        """The priority level it was taken from."""
        return self._level

    def _settle(self) -> None:
        if self._settled:
            raise BusStateError(f"job {self.id or '(raw)'} was already settled")
        self._settled = True

    async def ack(self) -> None:
        """The job is done: it leaves the queue for good (written with the worker's
        next batch of acks, within milliseconds).

        :raises eventbus.errors.BusStateError: already settled.
        """
        self._settle()
        self._worker.ack(self._env, self._raw)

    async def nack(
        self,
        *,
        requeue: bool = True,
        delay: float | timedelta | None = None,
        error: BaseException | str | None = None,
    ) -> None:
        """The job failed. ``requeue=True``: it is retried, after ``delay`` (default:
        the worker's retry policy's backoff), if attempts remain (``max_attempts``),
        else dead-lettered; ``requeue=False``: dead-lettered at once. ``error`` is
        recorded with the dead letter. Returns once Redis holds the job where it goes.

        :raises eventbus.errors.BusStateError: already settled.
        """
        wait = None if delay is None else seconds(delay, name="delay")
        self._settle()
        if not isinstance(error, BaseException):
            error = Rejected(error or "nacked")
        await self._worker.fail(
            self._env, self._raw, self._level, self._attempt, error, requeue=requeue, delay=wait
        )

    def __repr__(self) -> str:
        return f"<Job {self.id or '(raw)'} attempt={self._attempt} of {self.delivery.topic!r}>"


@final
class JobSubscription(Generic[T]):
    """``async with bus.jobs(queue) as jobs: async for job in jobs: ...``

    Takes at most ``concurrency`` jobs at a time: a job counts until it is settled.
    A job that a dead worker held is handed out alone: once every job handed out
    before it is settled, and none is taken until it is settled (settle each job,
    or hand it to a task that does, before waiting for the next). Leaving the
    block puts back every job not settled (it runs again, here or in another
    worker).

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        start: Callable[[Callable[[Envelope, bytes, int, int], None]], Awaitable[QueueWorker]],
        stop: Callable[[QueueWorker], Awaitable[None]],
        payload_type: Any,
        structure: Callable[[Envelope, Any], Any],
    ) -> None:
        self._start = start
        self._stop = stop
        self._type = payload_type
        self._structure = structure
        self._worker: QueueWorker | None = None
        self._buffer: collections.deque[Job[T]] = collections.deque()
        self._ready = anyio.Event()
        self._closed = False

    def _put(self, env: Envelope, raw: bytes, level: int, attempt: int) -> None:
        assert self._worker is not None
        tp = self._type
        value = env.data if tp is object or tp is Any else self._structure(env, tp)
        self._buffer.append(
            Job(
                value,
                env.group_delivery(None, attempt),
                worker=self._worker,
                env=env,
                raw=raw,
                level=level,
                attempt=attempt,
            )
        )
        self._ready.set()

    async def __aenter__(self) -> JobSubscription[T]:
        if self._worker is not None or self._closed:
            raise BusStateError("a job subscription is entered once")
        self._worker = await self._start(self._put)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._ready.set()
        worker, self._buffer = self._worker, collections.deque()
        if worker is not None:
            with anyio.CancelScope(shield=True):
                await self._stop(worker)

    def __aiter__(self) -> JobSubscription[T]:
        return self

    async def __anext__(self) -> Job[T]:
        while not self._buffer:
            if self._closed:
                raise StopAsyncIteration
            self._ready = anyio.Event()
            await self._ready.wait()
        return self._buffer.popleft()

    async def receive(self) -> Job[T]:
        """The next job (waits for one)."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            raise BusStateError("the job subscription is closed") from None

    def statistics(self) -> Any:
        """The worker's counters (a ``WorkerStatistics``)."""
        if self._worker is None:
            raise BusStateError("the job subscription has not started")
        return self._worker.statistics()
