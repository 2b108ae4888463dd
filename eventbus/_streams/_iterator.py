"""The async-iterator form of a consumer-group member."""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, final

import anyio

from .._envelope import Delivery
from .._handlers import HandlerSpec
from .._stats import ConsumerStatistics
from ..errors import BusStateError

if TYPE_CHECKING:  # the consumer-group machinery loads with the first group member
    from ._group import GroupConsumer

__all__ = ["GroupSubscription"]

T = TypeVar("T")

_TOKEN = object()


class _Item:
    __slots__ = ("delivery", "done", "outcome", "payload")

    def __init__(self, payload: Any, delivery: Delivery) -> None:
        self.payload = payload
        self.delivery = delivery
        self.done = anyio.Event()
        self.outcome: BaseException | None = None

    def finish(self, outcome: BaseException | None = None) -> None:
        self.outcome = outcome
        self.done.set()


@final
class GroupSubscription(Generic[T]):
    """A consumer-group member as an async iterator (``bus.subscribe(topic, group=...)``).

    ::

        async with bus.subscribe(orders, group="billing") as orders_in:
            async for order in orders_in:
                await bill(order)           # acked when the loop asks for the next one

    Delivery is at least once, as for ``@bus.on(topic, group=...)``: an event is
    acknowledged when the loop asks for the next event, or when the ``async with``
    block exits normally after it. If the block exits with an exception, the event
    being processed is handed back to the group as a failed delivery (another
    member, or this one later, gets it again with ``attempt`` + 1), and events
    prefetched but not yet yielded are handed back uncharged. ``delivery`` is the
    :class:`~eventbus.Delivery` of the event last yielded.

    Cancellation: cancelling a pending ``__anext__`` loses nothing.

    .. versionadded:: 0.2
    """

    def __init__(
        self,
        token: object,
        *,
        payload_type: Any,
        start: Callable[[HandlerSpec, Callable[[], None]], Awaitable[GroupConsumer]],
        stop: Callable[[GroupConsumer], Awaitable[None]],
    ) -> None:
        if token is not _TOKEN:
            raise TypeError("GroupSubscription has no public constructor: use bus.subscribe()")
        self._payload_type = payload_type
        self._start = start
        self._stop = stop
        self._consumer: GroupConsumer | None = None
        self._items: deque[_Item] = deque()
        self._ready = anyio.Event()
        self._current: _Item | None = None
        self._closing = False
        self._entered = False

    @classmethod
    def _create(cls, **kwargs: Any) -> GroupSubscription[Any]:
        return cls(_TOKEN, **kwargs)

    async def _handler(self, payload: Any, delivery: Delivery) -> None:
        if self._closing:
            from ._group import Release

            raise Release(charge=False)
        item = _Item(payload, delivery)
        self._items.append(item)
        self._ready.set()
        await item.done.wait()
        if item.outcome is not None:
            raise item.outcome

    async def __aenter__(self) -> GroupSubscription[T]:
        if self._entered:
            raise BusStateError("a subscription can be entered once")
        self._entered = True
        spec = HandlerSpec(
            fn=self._handler,
            payload_type=self._payload_type,
            wants_delivery=True,
            is_async=True,
            name="GroupSubscription",
        )
        # The bus calls the second argument when it closes (see ``_bus_closing``).
        self._consumer = await self._start(spec, self._bus_closing)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        from ._group import Release

        self._closing = True
        current, self._current = self._current, None
        if current is not None:
            current.finish(None if exc is None else Release(charge=True))
        while self._items:
            self._items.popleft().finish(Release(charge=False))
        if self._consumer is not None:
            with anyio.CancelScope(shield=True):
                await self._stop(self._consumer)

    def __aiter__(self) -> GroupSubscription[T]:
        return self

    async def __anext__(self) -> T:
        if self._consumer is None:
            raise BusStateError("use `async with bus.subscribe(...)` before iterating")
        current, self._current = self._current, None
        if current is not None:
            current.finish()  # the loop body completed: ack
        while not self._items:
            if self._closing:
                raise StopAsyncIteration
            self._ready = anyio.Event()
            await self._ready.wait()
        item = self._items.popleft()
        self._current = item
        return item.payload  # type: ignore[no-any-return]

    @property
    def delivery(self) -> Delivery | None:
        """The delivery context of the event last yielded."""
        return None if self._current is None else self._current.delivery

    def statistics(self) -> ConsumerStatistics:
        """Counters of this member (see :class:`~eventbus.ConsumerStatistics`)."""
        if self._consumer is None:
            raise BusStateError("the subscription has not started")
        return self._consumer.statistics()

    def _bus_closing(self) -> None:
        """The bus is closing: end iteration after what is buffered."""
        self._closing = True
        self._ready.set()
