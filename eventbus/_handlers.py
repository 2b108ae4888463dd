"""Handlers: what a function wants (payload type, Delivery), the one function that
calls user code (:func:`invoke`), and the loop that feeds a live subscriber's handler."""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any, Final

import anyio
import anyio.to_thread
import attrs

from . import signals
from ._codec import Codec
from ._envelope import Delivery, Envelope
from ._hub import Receiver
from .errors import ConfigurationError, DecodeError
from .signals import emit

__all__ = ["Handler", "HandlerSpec", "inspect_handler", "invoke", "report_failure", "run_handler"]

logger = logging.getLogger("eventbus")

Handler = Callable[..., Awaitable[Any] | Any]
"""A subscriber function (``on``, ``off``, ``consumer_statistics``): sync or async,
taking the event and, optionally, its :class:`~eventbus.Delivery`."""

_LOG_EVERY: Final = 100  # after the first, one log line per this many handler errors
_MISSING: Final = object()


@attrs.frozen
class HandlerSpec:
    """What :func:`inspect_handler` learned about a handler."""

    fn: Handler
    payload_type: Any
    wants_delivery: bool
    is_async: bool
    name: str
    threads: anyio.CapacityLimiter | None = None
    """A sync handler that runs in worker threads: the bus's limit of them.
    ``None``: the handler runs on the event loop (async, or ``in_thread=False``)."""
    origin: Handler | None = None
    """The user's function when ``fn`` wraps it (telemetry), else ``None``."""

    @property
    def user_fn(self) -> Handler:
        """The user's function (what signals name as the subscription)."""
        return self.fn if self.origin is None else self.origin

    def runs(self, fn: object) -> bool:
        """Whether this spec runs the user's function ``fn`` (wrapped or not)."""
        return self.fn is fn or (self.origin is not None and self.origin is fn)

    @property
    def awaits(self) -> bool:
        """Whether what :func:`invoke` returns must be awaited."""
        return self.is_async or self.threads is not None


def inspect_handler(
    fn: Handler, default_type: Any, threads: anyio.CapacityLimiter | None = None
) -> HandlerSpec:
    """Read the payload type from the first parameter's annotation (else the topic's
    type), and whether a second parameter (or one annotated ``Delivery``) wants
    the delivery context. A sync function runs in worker threads under ``threads``
    (the bus's limit), or on the event loop when ``threads`` is ``None``.

    :raises eventbus.errors.ConfigurationError: not callable, or wrong arity.
    """
    if not callable(fn):
        raise ConfigurationError(f"handler {fn!r} is not callable")
    name = getattr(fn, "__qualname__", repr(fn))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot inspect handler {name}: {exc}") from exc
    params = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if not params or len(params) > 2:
        raise ConfigurationError(
            f"handler {name} must take the event, and optionally a Delivery, as its parameters"
        )
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    payload_type = hints.get(params[0].name, default_type)
    if payload_type is Delivery:
        raise ConfigurationError(f"handler {name}: the first parameter receives the event")
    wants_delivery = len(params) == 2
    is_async = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - async callable objects
    )
    return HandlerSpec(
        fn=fn,
        payload_type=payload_type,
        wants_delivery=wants_delivery,
        is_async=is_async,
        name=name,
        threads=None if is_async else threads,
    )


def invoke(
    spec: HandlerSpec, payload: Any, env: Envelope, group: str | None = None, attempt: int = 1
) -> Any:
    """Call the user's function with ``payload`` (and its :class:`Delivery`, if it
    asks for one): how consumer-group members (and iterators, and next, queue
    workers) call user code, so that timing, tracing and error reporting wrap one
    call. Live, local and stream-tail handlers are called by :func:`run_handler`,
    whose hot loop inlines these two lines (a call frame there cost about 15% of
    the fan-out rate): user code is called in this module only, and whatever
    wraps it (timing, tracing, threads) changes both.

    Returns what the function returned, or an awaitable when ``spec.awaits``: an
    async handler's coroutine, or a sync handler's call in a worker thread
    (``spec.threads`` limits how many run at once, per bus), which the caller
    awaits in its own task (one await fewer per event than awaiting here). A
    thread is abandoned, not interrupted, if its caller is cancelled (the bus's
    shutdown grace ran out): Python cannot stop a thread, and the bus does not
    wait for it. Exceptions propagate to the caller, whose delivery guarantee
    decides what they mean (logged and counted for a live subscriber, retried or
    dead-lettered in a group).
    """
    threads = spec.threads
    if not spec.wants_delivery:
        if threads is not None:
            return _in_thread(spec.fn, threads, payload)
        return spec.fn(payload)
    if group is None and attempt == 1:
        delivery = env.delivery()
    else:  # a group member's, or a queue job's (which knows its attempt)
        delivery = env.group_delivery(group, attempt)
    if threads is not None:
        return _in_thread(spec.fn, threads, payload, delivery)
    return spec.fn(payload, delivery)


def _in_thread(fn: Handler, threads: anyio.CapacityLimiter, *args: Any) -> Awaitable[Any]:
    """A sync handler's call in a worker thread (see :func:`invoke`)."""
    return anyio.to_thread.run_sync(fn, *args, limiter=threads, abandon_on_cancel=True)


def report_failure(
    sender: object,
    receiver: Receiver,
    spec_name: str,
    topic: str,
    event_id: str,
    error: BaseException,
) -> None:
    """Count, log (rate-limited) and signal one failure of a subscriber."""
    receiver.errors += 1
    n = receiver.errors
    if n == 1 or n % _LOG_EVERY == 0:
        logger.error(
            "subscriber %s of %r failed (%d errors so far; logged once per %d): %s",
            spec_name,
            topic,
            n,
            _LOG_EVERY,
            error,
            exc_info=error if n == 1 else None,
        )
    if signals.failed.receivers:
        emit(
            signals.failed,
            sender,
            topic=topic,
            event_id=event_id,
            subscription=receiver.owner,
            error=error,
        )


async def run_handler(receiver: Receiver, spec: HandlerSpec, codec: Codec, sender: object) -> None:
    """Feed ``receiver``'s events to the handler until the receiver is closed and drained.

    A handler that raises is logged and keeps receiving; it never stops its
    neighbours. Cancelling this task abandons what is still buffered.
    """
    fn = spec.fn
    tp = spec.payload_type
    untyped = tp is object or tp is Any
    wants_delivery = spec.wants_delivery
    is_async = spec.is_async
    threads = spec.threads
    structure = codec.structure
    take = receiver.take
    # The hot loop: take straight from the deque while it has events; await
    # (and park) only when it is empty. blinker mutates its receivers dict in
    # place, so a signal receiver connected later is still seen.
    buf = receiver._buf
    delivered_receivers = signals.delivered.receivers
    while True:
        if buf:
            env = buf.popleft()
            if receiver._space_waiter is not None:
                receiver.wake_space()
        else:
            try:
                got = take()
                while got is None:
                    await receiver.waiter()
                    got = take()
                env = got
            except StopAsyncIteration:
                return
            except Exception as exc:
                # An "error"-policy overflow, or the push connection failed for good.
                logger.error("subscriber %s stopped: %s", spec.name, exc)
                return
            buf = receiver._buf  # created by the first event (Receiver: no buffer before)
        try:
            if untyped:
                payload = env.data
            else:
                payload = env.cache.get(tp, _MISSING)
                if payload is _MISSING or isinstance(payload, DecodeError):
                    payload = structure(env, tp)
            # invoke(spec, payload, env), inlined: the call frame cost 70-85 ns per
            # delivery, a fifth of this loop and about 15% of bench/fanout.py's rate.
            # Keep the two in step (tests/test_handlers.py checks they agree).
            if threads is not None:
                await invoke(spec, payload, env)  # a thread costs far more than the frame
            else:
                result = fn(payload, env.delivery()) if wants_delivery else fn(payload)
                if is_async:
                    await result
        except Exception as exc:  # isolation: one handler's failure is its own
            report_failure(sender, receiver, spec.name, env.topic, env.id, exc)
        else:
            if delivered_receivers:
                emit(
                    signals.delivered,
                    sender,
                    topic=env.topic,
                    event_id=env.id,
                    subscription=receiver.owner,
                )
