"""Live topics as a feature: ``PUBLISH`` out, the ONE push connection in."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import anyio
import anyio.abc

from .._envelope import Receipt
from .._feature import Declarations, FeatureContext, Window, receipt
from .._hub import Receiver
from .._keys import live_channel, live_pattern
from .._stats import LiveStatistics
from .._topic import Topic
from ._publisher import OrderedPublisher
from ._push import LiveConnection, pattern_route

__all__ = ["LiveFeature"]


class LiveFeature:
    """Owns the command client that sends ``PUBLISH`` (through an
    :class:`OrderedPublisher`) and the push connection, started by the first live
    subscription: a bus that only publishes holds no push connection."""

    def __init__(self) -> None:
        self._ctx: FeatureContext | None = None
        self._client: Any = None
        self._publisher: OrderedPublisher | None = None
        self._live: LiveConnection | None = None
        self._live_scope: anyio.CancelScope | None = None
        self._declared = Declarations()

    async def start(self, ctx: FeatureContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._ctx = ctx
        # Its reply timeout is publish_timeout: a PUBLISH fails within it (F6).
        self._client = ctx.clients.command_client(ctx.publish_timeout, "publish_timeout")
        self._publisher = OrderedPublisher(self._client)
        self._live = LiveConnection(
            pool=ctx.clients.push_pool(),
            hub=ctx.hub,
            codec=ctx.codec,
            prefix=ctx.prefix,
            policy=ctx.live_policy,
            sender=ctx.sender,
            address=ctx.clients.address,
        )
        await self._declared.attach_all(self.attach)
        task_status.started()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
        if self._live is not None:
            await self._live.aclose()

    async def _ensure_live(self) -> LiveConnection:
        """The push connection, started on first use.

        No lock: the first caller marks it started before its first await, so the
        callers entering meanwhile (10,000 subscribers at once) go straight on and
        queue their subscribes, which the supervisor sends once it is connected.
        """
        live = self._live
        assert live is not None
        if self._live_scope is not None:
            return live
        assert self._ctx is not None
        self._live_scope = scope = anyio.CancelScope()

        async def supervise(*, task_status: anyio.abc.TaskStatus[None]) -> None:
            with scope:
                await live.run(task_status=task_status)

        try:
            await self._ctx.task_group.start(supervise)
        except BaseException:
            self._live_scope = None
            raise
        return live

    def _route(self, topic: Topic[Any]) -> tuple[bytes, bytes, bytes]:
        """(hub route, subscribe command, channel or pattern) of ``topic``."""
        assert self._ctx is not None
        if topic.pattern:
            name = live_pattern(self._ctx.prefix, topic.name).encode()
            return pattern_route(name), b"PSUBSCRIBE", name
        name = live_channel(self._ctx.prefix, topic.name).encode()
        return name, b"SUBSCRIBE", name

    def declare(self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window) -> None:
        self._declared.add(topics, receiver, window)

    def attach(
        self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window
    ) -> Awaitable[None]:
        live = self._live
        if len(topics) == 1 and self._live_scope is not None and live is not None:
            # Started, one channel: the connection's own attach, no frame of ours
            # (it detaches on its own failure).
            route, kind, name = self._route(topics[0])
            return live.attach(route, kind, name, receiver)
        return self._attach_all(topics, receiver)

    async def attach_channel(self, channel: str, receiver: Receiver) -> Callable[[], None]:
        """Feed ``receiver`` with a channel of the bus's own (not a topic's), such
        as the delayed events' wake channel; returns once confirmed, with the
        function that detaches it."""
        live = await self._ensure_live()
        route = channel.encode()
        await live.attach(route, b"SUBSCRIBE", route, receiver)
        return lambda: live.detach(route, receiver)

    async def _attach_all(self, topics: Sequence[Topic[Any]], receiver: Receiver) -> None:
        attached: list[bytes] = []
        try:
            for topic in topics:
                route, kind, name = self._route(topic)
                live = await self._ensure_live()
                await live.attach(route, kind, name, receiver)
                attached.append(route)
        except BaseException:
            assert self._live is not None
            for route in attached:
                self._live.detach(route, receiver)
            raise

    def detach(self, topics: Sequence[Topic[Any]], receiver: Receiver) -> None:
        if not self._declared.remove(receiver) and self._live is not None:
            for topic in topics:
                self._live.detach(self._route(topic)[0], receiver)

    async def publish(self, topic: Topic[Any], event: Any, headers: dict[str, str]) -> Receipt:
        ctx = self._ctx
        assert ctx is not None
        assert self._publisher is not None
        name = topic.name
        # Numbered, then queued before any await: the publisher sends in seq order.
        event_id, raw, ms = ctx.encode(name, event, headers)
        reached = await self._publisher.publish(name, live_channel(ctx.prefix, name), raw)
        return receipt(ctx.sender, name, event_id, ms, receivers=int(reached))

    async def publish_many(
        self, topic: Topic[Any], events: Iterable[Any], headers: dict[str, str]
    ) -> list[Receipt]:
        ctx = self._ctx
        assert ctx is not None
        assert self._publisher is not None
        name = topic.name
        # All encoded first: an event over the limit (or not encodable) raises, as
        # itself, before any is sent, and takes no sequence number. Then queued at
        # once: the OrderedPublisher sends them in seq order, pipelined.
        encoded = ctx.encode_many(name, events, headers)
        reached = await self._publisher.publish_all(
            name, live_channel(ctx.prefix, name), [raw for _id, raw, _ms in encoded]
        )
        return [
            receipt(ctx.sender, name, event_id, ms, receivers=n)
            for (event_id, _raw, ms), n in zip(encoded, reached, strict=True)
        ]

    def begin_drain(self) -> None:
        if self._live is not None:
            self._live.flush()  # the unsubscribes queued last still go out
        if self._live_scope is not None:
            self._live_scope.cancel()  # no more incoming messages

    async def drain(self, deadline: float) -> None:
        pass  # live subscribers' buffers are drained by whoever feeds them

    def statistics(self) -> LiveStatistics:
        live = self._live
        return LiveStatistics(
            reconnects=0 if live is None else live.reconnects,
            push_client_id=None if live is None else live.client_id,
            decode_errors=0 if live is None else live.decode_errors,
            disconnects={} if live is None else dict(live.disconnects),
        )
