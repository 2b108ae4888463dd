"""Publishing from blocking code (Flask, Django, Celery tasks, scripts): no event loop
of your own.

::

    from eventbus.sync import SyncBus

    bus = SyncBus("redis://localhost:6379/0")      # once per process, e.g. at import
    receipt = bus.publish(orders, Order(id=1))     # blocks until Redis stored it

or the process-wide default, built on first use from ``$EVENTBUS_URL``::

    import eventbus.sync
    eventbus.sync.publish(orders, Order(id=1))

A :class:`SyncBus` owns one :class:`~eventbus.EventBus` in publish-only mode (it
declares no handlers), run by one background thread with its own event loop (an
anyio blocking portal). Every call from any thread is handed to that loop and waits
for its result, so one connection pool serves every thread of the process, and
concurrent calls from several threads are batched into pipelines as concurrent
``await bus.publish`` calls are. The wire format, the receipts and the guarantees
are those of :meth:`EventBus.publish` (``delay=`` and ``at=`` too).

It starts on first use (or ``with SyncBus(...)``), and stops at interpreter exit
(``atexit``) or on :meth:`SyncBus.close`. After ``os.fork()`` (gunicorn, Celery's
prefork pool) the child must not use the parent's loop thread, which did not survive
the fork: :func:`default` builds a new one per process; a :class:`SyncBus` built
before a fork raises :class:`~eventbus.errors.BusStateError` in the child.

Work queues: :meth:`SyncBus.enqueue` and :meth:`SyncBus.enqueue_many` (and the
module-level :func:`enqueue`, :func:`enqueue_many`) forward to the bus's own, as
:meth:`SyncBus.publish` does.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import threading
import typing
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar

import anyio
import anyio.abc
import anyio.from_thread

from . import _bus, errors

if typing.TYPE_CHECKING:
    from ._bus import EventBus
    from ._envelope import Receipt
    from ._queues import Queue
    from ._topic import Topic

__all__ = [
    "SyncBus",
    "close",
    "default",
    "enqueue",
    "enqueue_many",
    "publish",
    "publish_many",
]

_T = TypeVar("_T")

_live: weakref.WeakSet[SyncBus] = weakref.WeakSet()


class SyncBus:
    """A blocking facade over one :class:`~eventbus.EventBus`, shared by every thread.

    ``SyncBus(url, **options)`` takes the arguments of :class:`~eventbus.EventBus`
    (or ``bus=``, an EventBus not yet entered, to configure it fully). Nothing
    connects until the first call (or ``__enter__``).

    Thread-safe: any number of threads may call :meth:`publish` at once. A call
    blocks its thread only; it is not cancelled by anything but its own timeout
    (``publish_timeout`` of the bus), and an exception raised by the bus (e.g.
    :class:`~eventbus.errors.RedisUnavailable`) is raised in the calling thread.
    """

    def __init__(self, url: str | None = None, *, bus: EventBus | None = None, **options: Any):
        if bus is not None and (url is not None or options):
            raise TypeError("pass either bus= or the EventBus arguments, not both")
        self._make: Callable[[], EventBus] = (
            (lambda: bus) if bus is not None else (lambda: _bus.EventBus(url, **options))
        )
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._portal_cm: Any = None
        self._portal: anyio.from_thread.BlockingPortal | None = None
        self._bus: EventBus | None = None
        self._stop: anyio.Event | None = None
        self._done: Any = None
        self._closed = False
        _live.add(self)

    # -- lifecycle -----------------------------------------------------------------

    def _start(self) -> anyio.from_thread.BlockingPortal:
        if os.getpid() != self._pid:
            raise errors.BusStateError(
                "this SyncBus was started in the parent process: build one per process"
                " (eventbus.sync.default() does) after fork"
            )
        portal = self._portal
        if portal is not None:
            return portal
        with self._lock:
            if self._portal is not None:
                return self._portal
            if self._closed:
                raise errors.BusStateError("cannot use a closed SyncBus: create a new one")
            bus = self._make()
            cm = anyio.from_thread.start_blocking_portal(name="eventbus-sync")
            portal = cm.__enter__()
            try:
                self._done, _ = portal.start_task(self._hold, bus)
            except BaseException:
                cm.__exit__(None, None, None)
                raise
            self._portal_cm, self._bus, self._portal = cm, bus, portal
            return portal

    async def _hold(self, bus: EventBus, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """The one task that owns the bus: enters it, waits for :meth:`close`, leaves it
        (the exit drains what is in flight, as ``async with bus`` does)."""
        self._stop = anyio.Event()
        async with bus:
            task_status.started()
            await self._stop.wait()

    def close(self) -> None:
        """Stop the bus (publishes in flight finish first) and its thread. Idempotent;
        called at interpreter exit for every SyncBus still open."""
        with self._lock:
            self._closed = True
            portal, cm = self._portal, self._portal_cm
            self._portal = self._portal_cm = None
        if portal is None or os.getpid() != self._pid:
            return
        stop = self._stop
        if stop is not None:
            portal.call(stop.set)
        if self._done is not None:
            self._done.result()
        cm.__exit__(None, None, None)

    def __enter__(self) -> SyncBus:
        self._start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def bus(self) -> EventBus:
        """The underlying EventBus (started): for its properties, not its coroutines."""
        self._start()
        assert self._bus is not None
        return self._bus

    # -- publishing ------------------------------------------------------------------

    def publish(
        self,
        topic: Topic[_T] | str,
        event: _T,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> Receipt:
        """:meth:`EventBus.publish <eventbus.EventBus.publish>`, blocking: returns once
        Redis stored (durable) or accepted (live) the event, or its delay was
        scheduled, with the same :class:`~eventbus.Receipt` and errors."""
        portal = self._start()
        assert self._bus is not None
        bus = self._bus

        async def call() -> Receipt:
            return await bus.publish(topic, event, headers=headers, delay=delay, at=at)

        return _call(portal, call)

    def publish_many(
        self,
        topic: Topic[_T] | str,
        events: Iterable[_T],
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> list[Receipt]:
        """:meth:`EventBus.publish_many <eventbus.EventBus.publish_many>`, blocking."""
        portal = self._start()
        assert self._bus is not None
        bus = self._bus
        batch = list(events)  # iterated in the caller's thread, not the loop's

        async def call() -> list[Receipt]:
            return await bus.publish_many(topic, batch, headers=headers, delay=delay, at=at)

        return _call(portal, call)

    # -- work queues -----------------------------------------------------------------

    def enqueue(
        self,
        queue: Queue[_T],
        job: _T,
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Receipt:
        """:meth:`EventBus.enqueue <eventbus.EventBus.enqueue>`, blocking: returns once
        Redis holds the job (``Receipt.duplicate`` if its ``job_id`` was taken)."""
        portal = self._start()
        assert self._bus is not None
        bus = self._bus

        async def call() -> Receipt:
            return await bus.enqueue(
                queue,
                job,
                priority=priority,
                delay=delay,
                at=at,
                job_id=job_id,
                headers=headers,
            )

        return _call(portal, call)

    def enqueue_many(
        self,
        queue: Queue[_T],
        jobs: Iterable[_T],
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        job_ids: Sequence[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Receipt]:
        """:meth:`EventBus.enqueue_many <eventbus.EventBus.enqueue_many>`, blocking."""
        portal = self._start()
        assert self._bus is not None
        bus = self._bus
        batch = list(jobs)

        async def call() -> list[Receipt]:
            return await bus.enqueue_many(
                queue,
                batch,
                priority=priority,
                delay=delay,
                at=at,
                job_ids=job_ids,
                headers=headers,
            )

        return _call(portal, call)


_R = TypeVar("_R")


def _call(portal: anyio.from_thread.BlockingPortal, fn: Callable[[], Awaitable[_R]]) -> _R:
    """``portal.call(fn)``, with a portal stopped by a concurrent :meth:`SyncBus.close`
    reported as the closed bus it is."""
    try:
        return portal.call(fn)
    except RuntimeError as exc:
        if "not running" in str(exc):
            raise errors.BusStateError("cannot publish on a closed SyncBus") from None
        raise


# -- the process-wide default -----------------------------------------------------------

_default: SyncBus | None = None
_default_lock = threading.Lock()


def default() -> SyncBus:
    """This process's default :class:`SyncBus`, on ``$EVENTBUS_URL`` (built on first
    use; a new one after a fork)."""
    global _default
    current = _default
    if current is not None and current._pid == os.getpid():
        return current
    with _default_lock:
        if _default is None or _default._pid != os.getpid():
            _default = SyncBus()
        return _default


def publish(topic: Topic[_T] | str, event: _T, **kwargs: Any) -> Receipt:
    """:meth:`SyncBus.publish` on :func:`default`."""
    return default().publish(topic, event, **kwargs)


def publish_many(topic: Topic[_T] | str, events: Iterable[_T], **kwargs: Any) -> list[Receipt]:
    """:meth:`SyncBus.publish_many` on :func:`default`."""
    return default().publish_many(topic, events, **kwargs)


def enqueue(queue: Queue[_T], job: _T, **kwargs: Any) -> Receipt:
    """:meth:`SyncBus.enqueue` on :func:`default`."""
    return default().enqueue(queue, job, **kwargs)


def enqueue_many(queue: Queue[_T], jobs: Iterable[_T], **kwargs: Any) -> list[Receipt]:
    """:meth:`SyncBus.enqueue_many` on :func:`default`."""
    return default().enqueue_many(queue, jobs, **kwargs)


def close() -> None:
    """Close the default :class:`SyncBus` (if started); the next call starts another."""
    global _default
    with _default_lock:
        current, _default = _default, None
    if current is not None:
        current.close()


@atexit.register
def _close_all() -> None:
    for sync_bus in list(_live):
        with contextlib.suppress(Exception):  # at exit: nothing left to report to
            sync_bus.close()
