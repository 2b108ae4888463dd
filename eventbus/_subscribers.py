"""The bus's plain subscribers: ``@bus.on`` handlers and open ``bus.subscribe`` iterators.

Each has a :class:`~eventbus._hub.Receiver` (its own bounded buffer) that the
features serving its topics feed; a subscriber may span topics of several
features (a live topic and a durable one of the same type). Handlers run in
one task each (:func:`~eventbus._handlers.run_handler`), in the bus's task
group. Consumer-group members are not here: the durable feature owns them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs

from . import signals
from ._codec import Codec
from ._config import Overflow
from ._feature import Window
from ._handlers import Handler, HandlerSpec, run_handler
from ._hub import Receiver
from ._stats import SubscriptionStatistics
from ._subscription import Subscription
from ._topic import Topic
from .errors import EventBusError
from .signals import emit

__all__ = ["Router", "Subscribers"]

logger = logging.getLogger("eventbus")


class Router(Protocol):
    """How subscribers reach the features serving their topics (the bus)."""

    def declare(self, topics: tuple[Topic[Any], ...], receiver: Receiver, window: Window) -> None:
        """Before the bus opens: attach ``receiver`` when each feature starts."""
        ...

    def attach(
        self, topics: tuple[Topic[Any], ...], receiver: Receiver, window: Window
    ) -> Awaitable[None]:
        """On an open bus: attach now (all topics, or none on failure)."""
        ...

    def detach(self, topics: tuple[Topic[Any], ...], receiver: Receiver) -> None: ...


@attrs.define(eq=False)
class _Handler:
    spec: HandlerSpec
    topics: tuple[Topic[Any], ...]
    receiver: Receiver
    window: Window
    attached: bool = False
    done: anyio.Event = attrs.field(factory=anyio.Event)
    """Set when the handler's task has returned."""


class Subscribers:
    """Handlers and iterators of one bus (see the module doc)."""

    def __init__(
        self,
        router: Router,
        codec: Codec,
        sender: object,
        check_open: Callable[[], None] = lambda: None,
    ) -> None:
        self._router = router
        self._codec = codec
        self._sender = sender
        self._check_open = check_open
        self._handlers: list[_Handler] = []
        self._open: dict[Receiver, Subscription[Any]] = {}
        """Receivers of open iterators, with their subscription (told when the bus closes it)."""
        self._tg: anyio.abc.TaskGroup | None = None
        self._overflowed = self._on_overflow

    @property
    def codec(self) -> Codec:
        return self._codec

    @property
    def sender(self) -> object:
        return self._sender

    def receiver(self, topics: tuple[Topic[Any], ...], buffer: int, overflow: Overflow) -> Receiver:
        return Receiver(
            label=topics[0].name if len(topics) == 1 else ",".join(t.name for t in topics),
            capacity=buffer,
            overflow=overflow,
            multi_route=len(topics) > 1,
            on_overflow=self._overflowed,  # one bound method for all, not one each
        )

    def _on_overflow(self, receiver: Receiver) -> None:
        if signals.overflowed.receivers:
            emit(
                signals.overflowed,
                self._sender,
                topic=receiver.label,
                subscription=receiver.owner,
                policy=receiver.overflow,
                dropped=receiver.dropped,
            )

    # -- handlers -----------------------------------------------------------------------

    def add_handler(
        self,
        spec: HandlerSpec,
        topics: tuple[Topic[Any], ...],
        buffer: int,
        overflow: Overflow,
        window: Window,
    ) -> None:
        """Declare a handler: before :meth:`start`, it is attached when the features
        start; afterwards it is attached in the background (a failure is logged and
        sent as ``signals.failed``, and the handler dropped)."""
        receiver = self.receiver(topics, buffer, overflow)
        receiver.owner = spec.user_fn
        handler = _Handler(spec=spec, topics=topics, receiver=receiver, window=window)
        self._handlers.append(handler)
        if self._tg is None:
            self._router.declare(topics, receiver, window)
            handler.attached = True
        else:
            self._tg.start_soon(self._attach_later, handler)

    def start(self, tg: anyio.abc.TaskGroup) -> None:
        """The features started (with every declared handler attached): run the handlers."""
        self._tg = tg
        for handler in self._handlers:
            tg.start_soon(self._serve, handler)

    async def _serve(self, handler: _Handler) -> None:
        try:
            await run_handler(handler.receiver, handler.spec, self._codec, self._sender)
        finally:
            handler.done.set()

    async def _attach_later(self, handler: _Handler) -> None:
        try:
            await self._router.attach(handler.topics, handler.receiver, handler.window)
        except EventBusError as exc:
            if handler in self._handlers:
                self._handlers.remove(handler)
            handler.done.set()
            logger.error("handler %s could not subscribe: %s", handler.spec.name, exc)
            if signals.failed.receivers:
                emit(
                    signals.failed,
                    self._sender,
                    topic=handler.topics[0].name,
                    event_id=None,
                    subscription=handler.spec.user_fn,
                    error=exc,
                )
            return
        handler.attached = True
        if handler.receiver.closed:  # removed (off) or the bus closed meanwhile
            self._router.detach(handler.topics, handler.receiver)
            handler.done.set()
            return
        await self._serve(handler)

    def remove(self, fn: Handler) -> None:
        """Unsubscribe every handler registration of ``fn``; what is buffered is discarded."""
        for handler in [h for h in self._handlers if h.spec.runs(fn)]:
            self._handlers.remove(handler)
            handler.receiver.close(discard=True)
            if handler.attached:
                self._router.detach(handler.topics, handler.receiver)

    def statistics(self, fn: Handler) -> list[SubscriptionStatistics]:
        if self._tg is None:
            return []
        return [h.receiver.statistics() for h in self._handlers if h.spec.runs(fn) and h.attached]

    def receivers(self) -> list[tuple[str, str, Receiver]]:
        """Every attached subscriber, as (kind ``handler`` or ``iterator``, its name,
        its receiver): what a process report counts."""
        found = [("handler", h.spec.name, h.receiver) for h in self._handlers if h.attached]
        found += [("iterator", "subscribe", r) for r in self._open]
        return found

    # -- iterators ----------------------------------------------------------------------

    def subscription(
        self,
        topics: tuple[Topic[Any], ...],
        buffer: int,
        overflow: Overflow,
        window: Window,
    ) -> Subscription[Any]:
        receiver = self.receiver(topics, buffer, overflow)
        subscription: Subscription[Any] = Subscription._create(
            receiver=receiver,
            payload_type=topics[0].type,
            subscribers=self,
            topics=topics,
            window=window,
        )
        receiver.owner = subscription
        return subscription

    def attach(
        self,
        subscription: Subscription[Any],
        receiver: Receiver,
        topics: tuple[Topic[Any], ...],
        window: Window,
    ) -> Awaitable[None]:
        """Attach an iterator's receiver (on entry); the awaitable returns once it
        is confirmed. It counts as open from now (a bus closing meanwhile closes
        it); on failure the caller forgets it (:meth:`forget`)."""
        self._check_open()
        self._open[receiver] = subscription
        return self._router.attach(topics, receiver, window)

    def forget(self, receiver: Receiver) -> None:
        """An iterator whose attach failed (nothing of it stays attached)."""
        self._open.pop(receiver, None)

    def detach(self, receiver: Receiver, topics: tuple[Topic[Any], ...]) -> None:
        """Detach an iterator's receiver (on exit)."""
        self._open.pop(receiver, None)
        self._router.detach(topics, receiver)

    # -- closing ------------------------------------------------------------------------

    async def drain(self, deadline: float) -> bool:
        """Close every receiver without discarding what it holds: handlers finish
        what is buffered, iterators end after it. Wait for the handlers until
        ``deadline``; returns whether they all finished."""
        for handler in self._handlers:
            handler.receiver.close()
        for receiver, subscription in list(self._open.items()):
            receiver.close()
            subscription._closed_by_bus()
        with anyio.move_on_after(max(deadline - anyio.current_time(), 0)):
            for handler in self._handlers:
                if handler.attached:
                    await handler.done.wait()
            return True
        return False
