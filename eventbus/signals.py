"""Lifecycle signals (blinker), for instrumentation and plain sync receivers.

Every signal is sent with the :class:`~eventbus.EventBus` as sender, so
``signal.connect(fn, sender=bus)`` scopes a receiver to one bus. Prefer
``bus.connect_signal(signal, fn)``: it holds ``fn`` strongly, so a lambda or a
closure keeps receiving (blinker's own default is a weak reference that a
garbage collection silently drops).

Receivers run synchronously on the event loop: keep them short. An exception in
a receiver is logged and does not reach the publisher or other subscribers.

=================  ==========================================================
signal             keyword arguments
=================  ==========================================================
``published``      ``topic`` (str), ``event_id`` (str)
``delivered``      ``topic``, ``event_id``, ``subscription`` (sent only while
                   a receiver is connected: it costs a call per delivery)
``failed``         ``topic``, ``event_id``, ``subscription``, ``error``
``overflowed``     ``topic``, ``subscription``, ``policy``, ``dropped`` (total)
``gap``            ``topic``, ``subscription``, ``gap`` (:class:`~eventbus.Gap`)
``disconnected``   ``error``: the push connection was found dead (reset, closed,
                   or no PONG in time); a reconnect follows
``reconnected``    ``reconnects`` (total), ``downtime`` (seconds):
                   messages published while the push connection was down are
                   lost; every live subscription's ``reconnects`` counter rose
=================  ==========================================================
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import Namespace, Signal

__all__ = [
    "delivered",
    "disconnected",
    "emit",
    "failed",
    "gap",
    "overflowed",
    "published",
    "reconnected",
]

logger = logging.getLogger("eventbus")

_signals = Namespace()

published = _signals.signal(
    "eventbus.published", doc="An event was handed to Redis or the local hub."
)
delivered = _signals.signal("eventbus.delivered", doc="A subscriber was handed an event.")
failed = _signals.signal("eventbus.failed", doc="A handler raised, or a payload did not decode.")
overflowed = _signals.signal("eventbus.overflowed", doc="A subscriber's buffer overflowed.")
gap = _signals.signal("eventbus.gap", doc="A subscriber missed a run of a publisher's events.")
disconnected = _signals.signal("eventbus.disconnected", doc="The push connection was lost.")
reconnected = _signals.signal("eventbus.reconnected", doc="The push connection came back.")


def emit(signal: Signal, sender: object, **kwargs: Any) -> None:
    """Send ``signal``, isolating receivers: one that raises is logged, the rest still run.

    (blinker's own ``send`` stops at the first exception and raises it into the
    sender, which here would be the dispatcher of every subscriber.)
    """
    for receiver in signal.receivers_for(sender):
        try:
            receiver(sender, **kwargs)
        except Exception:
            logger.exception(
                "receiver %r of signal %r raised", receiver, getattr(signal, "name", signal)
            )
