"""The plug between the bus and its features: the protocol, the shared context, ids.

A *feature* is one way an event can travel: in this process (``_local``),
live over Redis pub/sub (``_live``), stored in a Redis Stream (``_streams``);
next, held for later (delayed) and handed to one worker (queues). The bus
maps each topic to the feature that serves it and talks to features only
through :class:`Feature`. A feature reaches what the bus shares (codec, hub,
client factory, key prefix, signal sender, id and sequence minting) through
one frozen :class:`FeatureContext`, never through the bus itself: features do
not import ``_bus``, nor each other (``tests/test_layers.py`` checks both).

Each feature opens and closes its own Redis connections, so that a feature
can hold what its topology needs (one connection per Cluster shard, one
blocking connection per group member) without the bus knowing.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import anyio.abc
import attrs

from . import signals
from ._envelope import Receipt
from .signals import emit

if TYPE_CHECKING:
    from ._codec import Codec
    from ._config import Limits, LivePolicy
    from ._connection import ClientFactory
    from ._hub import Hub, Receiver
    from ._telemetry import Telemetry
    from ._topic import Topic

__all__ = [
    "Declarations",
    "Feature",
    "FeatureContext",
    "Minter",
    "Routes",
    "Window",
    "receipt",
]

R = TypeVar("R")
"""What one :class:`~eventbus._codec.Codec` encoding returns (envelope, or entry fields)."""


@attrs.frozen
class Window:
    """Which events a subscriber of durable topics reads: from ``start`` (``"latest"``,
    ``"earliest"``, a datetime, a stream id or an event id) and, with ``until``, up
    to that bound (``"latest"``: the stream's end when it subscribed; a datetime, a
    stream id or an event id, included), after which its iteration ends. Live and
    local topics only ever take ``Window()``."""

    start: object = "latest"
    until: object = None


def _new_id_source() -> tuple[str, Iterator[int]]:
    # 64 random bits, then a counter from a random start under 2**62 (fixed width,
    # never wraps): ids are unique across processes and rise within one.
    start = int.from_bytes(os.urandom(8), "big") >> 2
    return os.urandom(8).hex(), itertools.count(start)


_ID_PREFIX, _ID_COUNTER = _new_id_source()


def _reset_id_source() -> None:
    # A forked child (gunicorn --preload, multiprocessing) must not mint its
    # parent's ids: it gets its own prefix.
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX, _ID_COUNTER = _new_id_source()


os.register_at_fork(after_in_child=_reset_id_source)


class Minter:
    """Event ids and per-topic sequence numbers of one publisher (one bus).

    A sequence number is read with :meth:`next_seq` and taken with :meth:`take`
    only once the event is encoded: an event that fails to encode must not
    leave a hole that subscribers would report as a gap. (``FeatureContext.encode``,
    the per-event path, does the same on ``last_seq`` directly: two method calls
    there cost as much as the rest of its bookkeeping.)
    """

    __slots__ = ("last_seq", "publisher_id")

    def __init__(self) -> None:
        self.publisher_id = uuid.uuid4().hex[:16]
        self.last_seq: dict[str, int] = {}
        """The last sequence number taken, per topic."""

    @staticmethod
    def event_id() -> str:
        """A new event id: 32 lowercase hex digits, 16 random per process (new in a
        forked child) then 16 of a counter, so the ids of one process are unique and
        sort in the order they were minted (events due in the same millisecond are
        released in that order: the schedule breaks ties by id)."""
        return _ID_PREFIX + "%016x" % next(_ID_COUNTER)  # noqa: UP031 (fastest form)

    def next_seq(self, topic: str) -> int:
        """The next sequence number of ``topic``, not yet taken."""
        return self.last_seq.get(topic, 0) + 1

    def take(self, topic: str, seq: int) -> None:
        """Record ``seq`` as the last number used on ``topic``."""
        self.last_seq[topic] = seq


def receipt(
    sender: object,
    topic: str,
    event_id: str,
    published_ms: int,
    *,
    receivers: int = 0,
    stream_id: str | None = None,
) -> Receipt:
    """The :class:`Receipt` of one published event, and its ``signals.published``."""
    if signals.published.receivers:
        emit(signals.published, sender, topic=topic, event_id=event_id)
    return Receipt(
        id=event_id,
        topic=topic,
        published_at=datetime.fromtimestamp(published_ms / 1000, tz=timezone.utc),
        receivers=receivers,
        stream_id=stream_id,
    )


@attrs.frozen
class FeatureContext:
    """What every feature shares, handed to :meth:`Feature.start` when the bus opens."""

    clients: ClientFactory
    """Builds Redis clients for the bus's URL, TLS and credentials."""
    codec: Codec
    """Events to envelope bytes and back; payloads to their types."""
    hub: Hub
    """Routes to the local subscribers' bounded buffers."""
    prefix: str
    """The namespace of every channel and key."""
    sender: object
    """The ``sender`` of every signal (the bus)."""
    ids: Minter
    """Event ids, the publisher id and per-topic sequence numbers."""
    limits: Limits
    live_policy: LivePolicy
    publish_timeout: float
    """Seconds a durable publish keeps retrying through a dropped connection."""
    shutdown_grace: float
    """Seconds the drain of one subscription may take when it ends alone."""
    publish: Callable[[Topic[Any], Any], Awaitable[Receipt]]
    """The bus's ``publish``: for an event whose topic another feature serves
    (a group handler's output to a live or local topic)."""
    task_group: anyio.abc.TaskGroup
    """The bus's root task group: where features run their background tasks
    (so that a feature with nothing to do holds no task)."""
    telemetry: Telemetry | None = None
    """Traces and metrics (``EventBus(telemetry=)``), else ``None``: no hook runs."""

    def encode(
        self,
        topic: str,
        event: Any,
        headers: dict[str, str],
        *,
        event_id: str | None = None,
        cause: str = "",
        corr: str = "",
    ) -> tuple[str, bytes, int]:
        """Mint the event id (unless given) and the topic's next seq, and encode the
        envelope: ``(event id, bytes, published_at ms)``. The seq is taken only once
        the event is encoded (a refused event leaves no hole that subscribers would
        report as a gap), synchronously, so events go out in the order they were
        numbered if the caller sends before it awaits anything else.

        :raises eventbus.errors.EncodeError: the event cannot be unstructured.
        :raises eventbus.errors.PayloadTooLarge: over the limit, before any I/O.
        """
        event_id, (raw, ms) = self._one(
            self.codec.encode, topic, event, headers, event_id, cause, corr
        )
        return event_id, raw, ms

    def encode_entry(
        self,
        topic: str,
        event: Any,
        headers: dict[str, str],
        *,
        event_id: str | None = None,
        cause: str = "",
        corr: str = "",
    ) -> tuple[str, list[bytes]]:
        """:meth:`encode` for a stream entry: ``(event id, fields)``; its time is
        the entry id Redis gives it."""
        return self._one(self.codec.encode_entry, topic, event, headers, event_id, cause, corr)

    def encode_many(
        self, topic: str, events: Iterable[Any], headers: dict[str, str]
    ) -> list[tuple[str, bytes, int]]:
        """:meth:`encode` for a batch, all or nothing: a bad event raises before any
        of the batch's seqs is taken."""
        return [
            (event_id, raw, ms)
            for event_id, (raw, ms) in self._batch(self.codec.encode, topic, events, headers)
        ]

    def encode_entries(
        self, topic: str, events: Iterable[Any], headers: dict[str, str]
    ) -> list[tuple[str, list[bytes]]]:
        """:meth:`encode_entry` for a batch, all or nothing, as :meth:`encode_many`."""
        return self._batch(self.codec.encode_entry, topic, events, headers)

    def _one(
        self,
        encode: Callable[..., R],
        topic: str,
        event: Any,
        headers: dict[str, str],
        event_id: str | None,
        cause: str,
        corr: str,
    ) -> tuple[str, R]:
        """One event through ``encode`` (a :class:`Codec` method), with its id and seq."""
        ids = self.ids
        if event_id is None:
            event_id = ids.event_id()
        seqs = ids.last_seq
        seq = seqs.get(topic, 0) + 1
        result = encode(
            topic,
            event,
            event_id=event_id,
            publisher=ids.publisher_id,
            seq=seq,
            headers=headers,
            cause=cause,
            corr=corr,
        )
        seqs[topic] = seq
        return event_id, result

    def _batch(
        self,
        encode: Callable[..., R],
        topic: str,
        events: Iterable[Any],
        headers: dict[str, str],
    ) -> list[tuple[str, R]]:
        """Events through ``encode``, all or nothing (seqs taken once all encoded)."""
        ids = self.ids
        seq = ids.next_seq(topic) - 1
        encoded = []
        for event in events:
            event_id = ids.event_id()
            seq += 1
            encoded.append(
                (
                    event_id,
                    encode(
                        topic,
                        event,
                        event_id=event_id,
                        publisher=ids.publisher_id,
                        seq=seq,
                        headers=headers,
                    ),
                )
            )
        if encoded:
            ids.take(topic, seq)
        return encoded


class Declarations:
    """Subscribers declared to a feature before it runs, attached when it starts."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: list[tuple[Sequence[Topic[Any]], Receiver, Window]] = []

    def add(self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window) -> None:
        self._items.append((topics, receiver, window))

    def remove(self, receiver: Receiver) -> bool:
        """Forget ``receiver``'s declaration; whether there was one."""
        kept = [item for item in self._items if item[1] is not receiver]
        found = len(kept) < len(self._items)
        self._items = kept
        return found

    async def attach_all(
        self, attach: Callable[[Sequence[Topic[Any]], Receiver, Window], Awaitable[None]]
    ) -> None:
        """Attach every declared subscriber, one by one, each confirmed."""
        items, self._items = self._items, []
        for topics, receiver, window in items:
            await attach(topics, receiver, window)


class Feature(Protocol):
    """One way an event travels. The bus calls, in this order:

    ``declare`` for subscribers declared before the bus opens, ``start`` once (with
    ``tg.start`` in the bus's task group), then any number of ``attach`` /
    ``detach`` / ``publish`` / ``publish_many`` while the bus is open, then
    ``begin_drain`` and ``drain`` when it closes; after its task group ended, ``aclose``.
    """

    async def start(self, ctx: FeatureContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Open what the feature needs (in ``ctx.task_group``) and start what was
        declared before the bus opened; ``task_status.started()`` only once its
        subscriptions and groups are confirmed by Redis. A failure before that
        propagates as itself and the bus does not open."""
        ...

    def declare(self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window) -> None:
        """Before ``run``: attach ``receiver`` as ``run`` starts (a handler declared
        before the bus opened), before ``started()``."""
        ...

    def attach(
        self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window
    ) -> Awaitable[None]:
        """Feed ``receiver`` with the events of ``topics`` (all served by this
        feature); the awaitable returns once they are confirmed. On failure nothing
        stays attached. (An ``async def`` fits; a feature may also hand back the
        awaitable of the layer below, so that a subscriber waiting for its
        confirmation holds one frame fewer.)"""
        ...

    def detach(self, topics: Sequence[Topic[Any]], receiver: Receiver) -> None:
        """Stop feeding ``receiver`` from ``topics`` (or forget its declaration).
        Never blocks."""
        ...

    async def publish(self, topic: Topic[Any], event: Any, headers: dict[str, str]) -> Receipt:
        """Publish one checked event (headers already validated)."""
        ...

    async def publish_many(
        self, topic: Topic[Any], events: Iterable[Any], headers: dict[str, str]
    ) -> list[Receipt]:
        """Publish ``events`` in order."""
        ...

    def begin_drain(self) -> None:
        """The bus is closing: take in nothing new (no reads, no pushed messages)."""
        ...

    async def drain(self, deadline: float) -> None:
        """Finish or hand back in-flight work by ``deadline`` (``anyio.current_time()``)."""
        ...

    async def aclose(self) -> None:
        """Close every connection the feature opened (the bus's task group has ended)."""
        ...

    def statistics(self) -> object:
        """A frozen record of the feature's counters."""
        ...


class Routes:
    """The map from a topic to the feature that serves it, held by the bus; the
    router of subscribers whose topics span features."""

    def __init__(self, local: Feature, live: Feature, durable: Feature) -> None:
        self._local = local
        self._live = live
        self._durable = durable

    def feature(self, topic: Topic[Any]) -> Feature:
        if topic.durable:
            return self._durable
        return self._local if topic.local else self._live

    def _by_feature(self, topics: tuple[Topic[Any], ...]) -> dict[Feature, tuple[Topic[Any], ...]]:
        """``topics`` grouped by the feature serving them, durable ones first."""
        grouped: dict[Feature, list[Topic[Any]]] = {}
        for topic in sorted(topics, key=lambda t: not t.durable):
            grouped.setdefault(self.feature(topic), []).append(topic)
        return {feature: tuple(served) for feature, served in grouped.items()}

    def declare(self, topics: tuple[Topic[Any], ...], receiver: Receiver, window: Window) -> None:
        for feature, served in self._by_feature(topics).items():
            feature.declare(served, receiver, window)

    def attach(
        self, topics: tuple[Topic[Any], ...], receiver: Receiver, window: Window
    ) -> Awaitable[None]:
        if len(topics) == 1:  # the common case: no grouping, no frame of ours
            return self.feature(topics[0]).attach(topics, receiver, window)
        return self._attach_all(topics, receiver, window)

    async def _attach_all(
        self, topics: tuple[Topic[Any], ...], receiver: Receiver, window: Window
    ) -> None:
        attached: list[tuple[Feature, tuple[Topic[Any], ...]]] = []
        try:
            for feature, served in self._by_feature(topics).items():
                await feature.attach(served, receiver, window)
                attached.append((feature, served))
        except BaseException:
            for feature, served in attached:
                feature.detach(served, receiver)
            raise

    def detach(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None:
        for feature, served in self._by_feature(topics).items():
            feature.detach(served, receiver)
