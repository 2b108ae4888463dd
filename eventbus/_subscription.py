"""The async-iterator subscription handed out by ``bus.subscribe``."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator, Awaitable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, final

from ._envelope import Delivery
from ._handlers import report_failure
from ._hub import Receiver
from ._stats import SubscriptionStatistics
from .errors import BusStateError, DecodeError

if TYPE_CHECKING:
    from ._codec import Codec
    from ._feature import Window
    from ._topic import Topic

__all__ = ["Subscription"]

T = TypeVar("T")

_TOKEN = object()


class Opener(Protocol):
    """What a subscription attaches through (the bus's ``Subscribers``), and what
    it shares with its neighbours: the codec and the signals' sender."""

    @property
    def codec(self) -> Codec: ...

    @property
    def sender(self) -> object: ...

    def attach(
        self,
        subscription: Subscription[Any],
        receiver: Receiver,
        topics: tuple[Topic[Any], ...],
        window: Window,
    ) -> Awaitable[None]: ...

    def forget(self, receiver: Receiver) -> None: ...

    def detach(self, receiver: Receiver, topics: tuple[Topic[Any], ...]) -> None: ...


@final
class Subscription(Generic[T]):
    """A live subscription: an async iterator of events with its own bounded buffer.

    Created by :meth:`EventBus.subscribe`; use it as an async context manager. The
    subscription is confirmed by Redis when ``async with`` returns, so an event
    published after that point reaches it (at most once: live topics do not
    replay what was published before, or while the push connection was down).

    Iterating yields payloads structured to the topic's type. Events that do not
    fit the type are counted in ``statistics().errors`` and skipped.

    Cancellation: cancelling a pending ``__anext__`` loses nothing; the next call
    returns the event that would have been returned. Leaving the ``async with``
    block discards what is still buffered. When the bus closes, iteration ends
    after the buffered events.

    .. versionadded:: 0.1
    """

    # Small on purpose (a server may hold one per connected user): no closures,
    # what it shares with its neighbours is reached through ``_subscribers``.
    __slots__ = (
        "__weakref__",
        "_receiver",
        "_state",
        "_subscribers",
        "_topics",
        "_type",
        "_window",
    )

    def __init__(
        self,
        token: object,
        *,
        receiver: Receiver,
        payload_type: Any,
        subscribers: Opener,
        topics: tuple[Topic[Any], ...],
        window: Window,
    ) -> None:
        if token is not _TOKEN:
            raise TypeError("Subscription has no public constructor: use bus.subscribe()")
        self._receiver = receiver
        self._type = payload_type
        self._subscribers = subscribers
        # One topic (the usual case) is kept as itself: a tuple per idle
        # subscription is 56 bytes that a server with 50,000 of them notices.
        self._topics: Topic[Any] | tuple[Topic[Any], ...] = (
            topics[0] if len(topics) == 1 else topics
        )
        self._window = window
        self._state = "new"

    def _topic_tuple(self) -> tuple[Topic[Any], ...]:
        topics = self._topics
        return topics if isinstance(topics, tuple) else (topics,)

    @property
    def _label(self) -> str:
        return self._receiver.label

    @classmethod
    def _create(cls, **kwargs: Any) -> Subscription[Any]:
        return cls(_TOKEN, **kwargs)

    async def __aenter__(self) -> Subscription[T]:
        if self._state != "new":
            raise BusStateError(f"subscription of {self._label!r} was already entered")
        self._state = "opening"
        try:
            await self._subscribers.attach(self, self._receiver, self._topic_tuple(), self._window)
        except BaseException:
            self._state = "closed"
            self._subscribers.forget(self._receiver)
            raise
        if self._state == "opening":  # not closed by the bus meanwhile
            self._state = "open"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Unsubscribe and discard what is buffered. Idempotent."""
        if self._state == "closed":
            return
        was_open = self._state == "open"
        self._state = "closed"
        self._receiver.close(discard=True)
        if was_open:
            self._subscribers.detach(self._receiver, self._topic_tuple())

    def _closed_by_bus(self) -> None:
        # The bus closed the receiver; buffered events can still be read.
        self._state = "closed"

    def __del__(self) -> None:
        if getattr(self, "_state", "closed") == "open":
            warnings.warn(
                f"subscription of {self._label!r} was never closed: use `async with`",
                ResourceWarning,
                source=self,
                stacklevel=1,
            )

    def _check(self) -> None:
        if self._state == "new":
            raise BusStateError(
                "enter the subscription first: `async with bus.subscribe(...) as sub`"
            )

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        # The loop is spelled out here, not delegated to a coroutine: a subscriber
        # waiting for its next event holds this one frame and a future.
        got = self._take()
        while got is None:
            await self._receiver.waiter()
            got = self._take()
        return got[0]  # type: ignore[no-any-return]

    async def _next(self) -> tuple[Any, Any]:
        got = self._take()
        while got is None:
            await self._receiver.waiter()
            got = self._take()
        return got

    def _take(self) -> tuple[Any, Any] | None:
        """The next decodable event and its envelope, or None while none is buffered;
        an undecodable one is reported and skipped."""
        self._check()
        receiver = self._receiver
        while (env := receiver.take()) is not None:
            try:
                return self._subscribers.codec.structure(env, self._type), env
            except DecodeError as exc:
                report_failure(
                    self._subscribers.sender, receiver, "subscription", env.topic, env.id, exc
                )
        return None

    async def receive(self) -> T:
        """The next event.

        :raises StopAsyncIteration: the subscription or the bus was closed.
        :raises eventbus.errors.SubscriberOverflow: ``overflow="error"`` and the buffer overflowed.
        """
        return await self.__anext__()

    async def receive_delivery(self) -> tuple[T, Delivery]:
        """The next event with its :class:`Delivery` (id, topic, headers, published_at)."""
        payload, env = await self._next()
        return payload, env.delivery()

    async def deliveries(self) -> AsyncIterator[tuple[T, Delivery]]:
        """Iterate ``(event, delivery)`` pairs instead of bare events."""
        while True:
            try:
                yield await self.receive_delivery()
            except StopAsyncIteration:
                return

    def statistics(self) -> SubscriptionStatistics:
        """A frozen snapshot of this subscription's counters."""
        return self._receiver.statistics()

    @property
    def topic(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"<Subscription {self._label!r} {self._state}>"
