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
``disconnected``   ``error``, ``reason`` (as counted in ``EventBus.disconnects``,
                   or ``"connect"`` if the first connection attempt of an outage
                   failed): the push connection was found dead (reset, closed,
                   or no PONG in time); a reconnect follows
``reconnected``    ``reconnects`` (total), ``downtime`` (seconds):
                   messages published while the push connection was down are
                   lost; every live subscription's ``reconnects`` counter rose
``dead_lettered``  ``topic``, ``event_id``, ``group``, ``reason``, ``error``
                   (the exception, or ``None``), ``dead_letter_id``: a consumer
                   group gave up on an event and moved it to the dead-letter stream
``trimmed``        ``topic``, ``group``, ``entry_ids``: entries still pending in
                   a group were removed by trimming before anyone handled them
                   (only possible with ``trim="hard"``); counted as ``lost_to_trim``
=================  ==========================================================
"""

from __future__ import annotations

import logging
from typing import Any

from blinker import Namespace, Signal

__all__ = [
    "dead_lettered",
    "delivered",
    "disconnected",
    "emit",
    "failed",
    "gap",
    "overflowed",
    "published",
    "reconnected",
    "trimmed",
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
dead_lettered = _signals.signal(
    "eventbus.dead_lettered", doc="A consumer group moved an event to the dead-letter stream."
)
trimmed = _signals.signal(
    "eventbus.trimmed", doc="Trimming removed entries a consumer group had not handled."
)


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
