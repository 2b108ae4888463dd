"""Durable topics as a feature: the stream writer, the readers of live
subscribers, the consumer-group members, and what is read back from Redis
(statistics, dead letters, trimming).

Connections it opens and closes itself: a command client (acks, claims,
scripts, statistics; retried, for commands safe to send twice), the stream
client (``XADD``: never retried blindly), one blocking connection per group
member and per stream reader (``XREAD`` of live subscribers; a replaying one
has its own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import attrs

from .._connection import map_exceptions
from .._envelope import Envelope, Receipt
from .._feature import Declarations, FeatureContext, Window, receipt
from .._handlers import HandlerSpec
from .._hub import Receiver
from .._keys import TopicKeys, topic_keys
from .._stats import BusStats, ConsumerStatistics, DurableStatistics
from .._topic import Topic
from ..errors import BackendError, EventBusError
from ._deadletter import (
    DeadLetter,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
)
from ._ids import stream_ms
from ._iterator import GroupSubscription
from ._options import GroupOptions, release_name, reserve_name
from ._publisher import StreamWriter, Trimmer

if TYPE_CHECKING:  # group members, stream readers, stats: loaded by their first use
    from ._group import GroupConsumer
    from ._tail import StreamTail

__all__ = ["DurableFeature"]

logger = logging.getLogger("eventbus")

_TAIL_BLOCK: Final = 5.0
"""Seconds an XREAD of live subscribers of durable topics blocks per call."""


@attrs.define(eq=False)
class _Member:
    """A group handler declared with ``bus.on(..., group=)``."""

    spec: HandlerSpec
    topic: Topic[Any]
    options: GroupOptions
    consumer: GroupConsumer | None = None


class DurableFeature:
    """Serves durable topics (see the module doc)."""

    def __init__(self) -> None:
        self._ctx: FeatureContext | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._client: Any = None
        self._stream_client: Any = None
        self._writer: StreamWriter | None = None
        self._trimmer: Trimmer | None = None
        self._keys: dict[str, TopicKeys] = {}
        self._topics: dict[str, Topic[Any]] = {}
        """Every durable topic this bus used: what ``stats()`` reports by default."""
        self._members: list[_Member] = []
        self._iterators: dict[GroupConsumer, Callable[[], None]] = {}
        """Members of ``bus.subscribe(..., group=)``, with what tells each the bus closes."""
        self._tail: StreamTail | None = None
        self._tail_scope: anyio.CancelScope | None = None
        self._own_tails: dict[Receiver, anyio.CancelScope] = {}
        self._declared = Declarations()
        self._running = False
        self._eviction_checked = False
        """Whether the one ``maxmemory-policy`` check of this bus was made (or started)."""

    def keys(self, topic: Topic[Any]) -> TopicKeys:
        """The Redis keys of durable ``topic`` (and remember the topic for ``stats``)."""
        keys = self._keys.get(topic.name)
        if keys is None:
            assert self._ctx is not None
            self._topics.setdefault(topic.name, topic)
            keys = self._keys[topic.name] = topic_keys(self._ctx.prefix, topic.name)
            if self._running and not self._eviction_checked:
                # The first durable topic of a bus that opened without one.
                self._eviction_checked = True
                self._start_soon(self._check_eviction)
        return keys

    async def _check_eviction(self) -> None:
        from ._admin import warn_if_evicting

        await warn_if_evicting(self._client)

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self, ctx: FeatureContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._ctx = ctx
        self._tg = ctx.task_group
        self._client = ctx.clients.command_client()
        self._stream_client = ctx.clients.unretried_client(socket_timeout=None)
        self._trimmer = Trimmer(self._client, self._start_soon)
        self._writer = StreamWriter(
            self._stream_client,
            timeout=ctx.publish_timeout,
            trimmer=self._trimmer,
            address=ctx.clients.address,
            start=self._start_soon,
        )
        # Live subscribers first, as their handlers may wait for what the groups
        # chain to; then the members, one by one, each once its group exists.
        await self._declared.attach_all(self.attach)
        for member in list(self._members):
            await self._start(member)
        if self._topics:  # durable subscribers declared: checked before the bus opens
            self._eviction_checked = True
            await self._check_eviction()
        self._running = True
        task_status.started()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._stream_client is not None:
            await self._stream_client.aclose()

    def _consumers(self) -> list[GroupConsumer]:
        return [m.consumer for m in self._members if m.consumer is not None] + list(self._iterators)

    def _start_soon(self, fn: Callable[[], Any]) -> None:
        assert self._tg is not None
        self._tg.start_soon(fn)

    def begin_drain(self) -> None:
        if self._tail_scope is not None:
            self._tail_scope.cancel()
        for replay in self._own_tails.values():
            replay.cancel()
        for closing in self._iterators.values():
            closing()
        for consumer in self._consumers():
            consumer.begin_stop()

    async def drain(self, deadline: float) -> None:
        """Every member stops at once: hands back what it prefetched, lets running
        handlers finish by ``deadline``, flushes its acks."""
        consumers = self._consumers()
        if consumers:
            async with anyio.create_task_group() as stops:
                for consumer in consumers:
                    stops.start_soon(consumer.stop, deadline)

    def statistics(self) -> DurableStatistics:
        consumers = self._consumers()
        return DurableStatistics(
            consumers=tuple(c.statistics() for c in consumers),
            trimmed=0 if self._trimmer is None else self._trimmer.trimmed,
        )

    # -- consumer groups ----------------------------------------------------------------

    def add_member(self, spec: HandlerSpec, topic: Topic[Any], options: GroupOptions) -> None:
        """Declare a group handler; on a running feature it starts in the background
        (a failure to start is logged, and the handler dropped)."""
        member = _Member(spec=spec, topic=topic, options=options)
        self._members.append(member)
        if self._tg is not None:
            self._tg.start_soon(self._start_later, member)

    async def _start_later(self, member: _Member) -> None:
        try:
            await self._start(member)
        except EventBusError as exc:
            if member in self._members:
                self._members.remove(member)
            logger.error("group handler %s could not start: %s", member.spec.name, exc)

    async def _start(self, member: _Member) -> None:
        member.consumer = await self._start_consumer(member.spec, member.topic, member.options)

    async def _start_consumer(
        self, spec: HandlerSpec, topic: Topic[Any], options: GroupOptions
    ) -> GroupConsumer:
        """Create the group if needed and start a member; returns once it is reading."""
        from ._group import GroupConsumer

        ctx, tg = self._ctx, self._tg
        assert ctx is not None
        assert tg is not None
        target = options.publish_to
        keys = self.keys(topic)
        if options.stable_name:  # the runner slot's name: the first free one of it here
            name = reserve_name(keys.stream, options.group, options.consumer)
            options = attrs.evolve(options, consumer=name)
        # The member's own connection for blocking reads; it closes it when it stops.
        blocking = ctx.clients.unretried_client(socket_timeout=options.block + 10)
        consumer = GroupConsumer(
            topic=topic,
            keys=keys,
            options=options,
            spec=spec,
            codec=ctx.codec,
            limits=ctx.limits,
            client=self._client,
            blocking_client=blocking,
            encode_output=self._encode_output,
            target_keys=self.keys(target) if target is not None and target.durable else None,
            publish_output=ctx.publish,
            note_output=self._note_output,
            sender=ctx.sender,
        )

        async def run(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            try:
                await consumer.run(task_status=task_status)
            finally:
                if options.stable_name:
                    release_name(keys.stream, options.group, options.consumer)

        with map_exceptions(topic=topic.name, command="XGROUP"):
            await tg.start(run)
        return consumer

    def subscription(
        self, topic: Topic[Any], options: GroupOptions, check_open: Callable[[], None]
    ) -> GroupSubscription[Any]:
        """A group member as an async iterator; it starts when it is entered."""

        async def start(spec: HandlerSpec, closing: Callable[[], None]) -> GroupConsumer:
            check_open()
            consumer = await self._start_consumer(spec, topic, options)
            self._iterators[consumer] = closing
            return consumer

        async def stop(consumer: GroupConsumer) -> None:
            self._iterators.pop(consumer, None)
            assert self._ctx is not None
            await consumer.stop(anyio.current_time() + self._ctx.shutdown_grace)

        return GroupSubscription._create(payload_type=topic.type, start=start, stop=stop)

    def consumer_statistics(self, fn: object) -> list[ConsumerStatistics]:
        return [
            m.consumer.statistics()
            for m in self._members
            if m.spec.runs(fn) and m.consumer is not None
        ]

    def _encode_output(
        self, target: Topic[Any], event: Any, event_id: str, cause: Envelope
    ) -> list[bytes]:
        """Encode a handler's output event (chaining), caused by ``cause``."""
        ctx = self._ctx
        assert ctx is not None
        headers = {} if ctx.telemetry is None else ctx.telemetry.chained(target.name, cause.headers)
        _id, fields = ctx.encode_entry(
            target.name,
            event,
            headers,
            event_id=event_id,
            cause=cause.id,
            corr=cause.corr or cause.id,
        )
        return fields

    def _note_output(self, topic: Topic[Any], added: int) -> None:
        """Chained outputs count towards the target topic's trimming, as publishes do."""
        if self._trimmer is not None:
            self._trimmer.note_topic(topic, self.keys(topic), added)

    # -- live subscribers: stream readers -----------------------------------------------

    def declare(self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window) -> None:
        self._declared.add(topics, receiver, window)

    async def attach(
        self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window
    ) -> None:
        """Feed ``receiver`` from the streams of ``topics`` (``XREAD``), from
        ``window.start``; with ``window.until``, close it once every stream reached
        its bound (resolved now: ``"latest"`` is each stream's last entry now)."""
        from ._tail import resolve_end, resolve_position

        ctx = self._ctx
        assert ctx is not None
        starts = []
        for topic in topics:
            keys = self.keys(topic)
            with map_exceptions(topic=topic.name, command="XREVRANGE"):
                start = await resolve_position(self._client, topic.name, keys, window.start)
                end = None
                if window.until is not None:
                    end = await resolve_end(self._client, topic.name, keys, window.until)
            starts.append((topic, keys, start, end))
        if window.start == "latest" and window.until is None:
            if self._tail is None:
                self._tail = self._new_tail()
                self._tail_scope = self._run_tail(self._tail)
            tail = self._tail
        else:
            # A replay reads on its own, so catching up never delays the others;
            # so does a window that ends (its end is the end of its tail).
            tail = self._new_tail()
            self._own_tails[receiver] = self._run_tail(tail)
        for topic, keys, start, end in starts:
            tail.add(topic.name, keys, receiver, start, end)

    def detach(self, topics: Sequence[Topic[Any]], receiver: Receiver) -> None:
        if self._declared.remove(receiver):
            return
        own = self._own_tails.pop(receiver, None)
        if own is not None:
            own.cancel()
            return
        if self._tail is not None:
            for topic in topics:
                self._tail.remove(self.keys(topic), receiver)

    def _new_tail(self) -> StreamTail:
        from ._tail import StreamTail

        ctx = self._ctx
        assert ctx is not None
        client = ctx.clients.unretried_client(socket_timeout=_TAIL_BLOCK + 10)
        return StreamTail(client, ctx.codec, ctx.hub, block=_TAIL_BLOCK)

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

    # -- publishing ---------------------------------------------------------------------

    async def publish(self, topic: Topic[Any], event: Any, headers: dict[str, str]) -> Receipt:
        ctx = self._ctx
        assert ctx is not None
        assert self._writer is not None
        event_id, fields = ctx.encode_entry(topic.name, event, headers)
        stream_id = await self._writer.add_one(topic, self.keys(topic), event_id, fields)
        return receipt(ctx.sender, topic.name, event_id, stream_ms(stream_id), stream_id=stream_id)

    async def publish_many(
        self, topic: Topic[Any], events: Iterable[Any], headers: dict[str, str]
    ) -> list[Receipt]:
        """Encode every event first (a bad one raises before anything is sent), then
        store them in pipelined batches. Not all or nothing: if some are refused
        (out of memory mid-batch, say), the first error is raised carrying the
        receipts of those that were stored (``BackendError.receipts``)."""
        ctx = self._ctx
        assert ctx is not None
        assert self._writer is not None
        encoded = ctx.encode_entries(topic.name, events, headers)
        outcomes = await self._writer.add(topic, self.keys(topic), encoded)
        receipts: list[Receipt | None] = []
        first_error: BaseException | None = None
        for (event_id, _fields), outcome in zip(encoded, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                receipts.append(None)
                first_error = first_error or outcome
            else:
                ms = stream_ms(outcome)
                receipts.append(receipt(ctx.sender, topic.name, event_id, ms, stream_id=outcome))
        if first_error is not None:
            if isinstance(first_error, BackendError):
                first_error.receipts = receipts
            raise first_error
        return receipts  # type: ignore[return-value]  # no None without an error

    # -- read back from Redis -----------------------------------------------------------

    async def stats(self, topics: Sequence[Topic[Any]]) -> BusStats:
        """Statistics of ``topics``, else of every durable topic this bus used."""
        from ._admin import topic_stats

        wanted = list(topics)
        if not wanted:
            for member in self._members:
                self.keys(member.topic)
            wanted = list(self._topics.values())
        results = []
        for topic in sorted(wanted, key=lambda t: t.name):
            with map_exceptions(topic=topic.name, command="XINFO"):
                results.append(await topic_stats(self._client, topic.name, self.keys(topic)))
        return BusStats(topics=tuple(results))

    async def dead_letters(
        self, topic: Topic[Any], *, count: int, after: str | None
    ) -> list[DeadLetter]:
        with map_exceptions(topic=topic.name, command="XRANGE"):
            return await list_dead_letters(self._client, self.keys(topic), count=count, after=after)

    async def replay_dead_letters(self, topic: Topic[Any], ids: Sequence[str] | None) -> int:
        with map_exceptions(topic=topic.name, command="EVALSHA"):
            return await replay_dead_letters(self._client, self.keys(topic), ids)

    async def purge_dead_letters(self, topic: Topic[Any], ids: Sequence[str] | None) -> int:
        with map_exceptions(topic=topic.name, command="XDEL"):
            return await purge_dead_letters(self._client, self.keys(topic), ids)

    async def trim(self, topic: Topic[Any]) -> int:
        assert self._trimmer is not None
        with map_exceptions(topic=topic.name, command="XTRIM"):
            return await self._trimmer.trim(topic, self.keys(topic))
