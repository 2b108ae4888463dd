"""Local topics: events that never leave this process (``Topic(..., local=True)``).

No Redis, no bytes: ``publish`` builds the :class:`~eventbus._envelope.Envelope`
directly and seeds its cache with the event object itself, so subscribers of
the same type receive **that object**, not a copy. It is offered to the
receivers of the topic and of every local pattern that matches it. A full
``block`` subscriber makes ``publish`` itself wait: backpressure on the
publisher rather than on a shared connection.
"""

from __future__ import annotations

import fnmatch
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

import anyio.abc

from ._envelope import CONTENT_JSON, Envelope, Receipt
from ._feature import Declarations, FeatureContext, Window, receipt
from ._hub import Receiver
from ._stats import LocalStatistics
from ._topic import Topic

__all__ = ["LocalFeature"]


class LocalFeature:
    """Serves local topics and local patterns through the hub (see the module doc)."""

    def __init__(self) -> None:
        self._ctx: FeatureContext | None = None
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._published = 0
        self._declared = Declarations()

    async def start(self, ctx: FeatureContext, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        self._ctx = ctx
        await self._declared.attach_all(self.attach)
        task_status.started()

    async def aclose(self) -> None:
        pass  # no connections

    def _route(self, topic: Topic[Any]) -> tuple[str, str]:
        if topic.pattern:
            if topic.name not in self._patterns:
                # Redis globs negate a class with [^...], fnmatch with [!...].
                glob = topic.name.replace("[^", "[!")
                self._patterns[topic.name] = re.compile(fnmatch.translate(glob))
            return ("local-pattern", topic.name)
        return ("local", topic.name)

    def declare(self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window) -> None:
        self._declared.add(topics, receiver, window)

    async def attach(
        self, topics: Sequence[Topic[Any]], receiver: Receiver, window: Window
    ) -> None:
        assert self._ctx is not None
        for topic in topics:
            self._ctx.hub.add(self._route(topic), receiver)

    def detach(self, topics: Sequence[Topic[Any]], receiver: Receiver) -> None:
        if not self._declared.remove(receiver) and self._ctx is not None:
            for topic in topics:
                self._ctx.hub.remove(self._route(topic), receiver)

    async def publish(self, topic: Topic[Any], event: Any, headers: dict[str, str]) -> Receipt:
        ctx = self._ctx
        assert ctx is not None
        name = topic.name
        content_type, data = ctx.codec.unstructure(name, event)
        event_id = ctx.ids.event_id()
        seq = ctx.ids.next_seq(name)
        published_ms = time.time_ns() // 1_000_000
        env = Envelope(
            topic=name,
            id=event_id,
            publisher=ctx.ids.publisher_id,
            seq=seq,
            published_ms=published_ms,
            headers=headers,
            content_type=content_type,
            data=data if content_type == CONTENT_JSON else event,
        )
        if not isinstance(event, bytes | bytearray | memoryview):
            env.cache[type(event)] = event  # same-type subscribers get the object itself
        ctx.ids.take(name, seq)
        routes = ctx.hub.routes
        receivers = routes.get(("local", name), ())
        for pattern, regex in self._patterns.items():
            if regex.match(name):
                receivers = receivers + routes.get(("local-pattern", pattern), ())
        await ctx.hub.deliver_all(receivers, env)
        self._published += 1
        return receipt(ctx.sender, name, event_id, published_ms, receivers=len(receivers))

    async def publish_many(
        self, topic: Topic[Any], events: Iterable[Any], headers: dict[str, str]
    ) -> list[Receipt]:
        return [await self.publish(topic, event, headers) for event in events]

    def begin_drain(self) -> None:
        pass  # nothing comes in from outside

    async def drain(self, deadline: float) -> None:
        pass  # local subscribers are drained by whoever feeds them

    def statistics(self) -> LocalStatistics:
        return LocalStatistics(published=self._published)
