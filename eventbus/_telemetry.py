"""What the bus asks of a telemetry provider (``EventBus(telemetry=...)``).

The bus and its features know only this protocol; ``eventbus.otel`` implements it
with OpenTelemetry (the ``otel`` extra). A bus built without one never calls any of
it: no hook runs on any path, so it costs nothing.

Where the bus calls it:

* :meth:`Telemetry.bind`, once, when the bus is built (metrics fed from signals);
* :meth:`Telemetry.sending` around every ``publish``, ``publish_many``, ``enqueue``
  and ``enqueue_many`` (a producer span, and its context injected into the
  headers that travel with the events);
* :meth:`Telemetry.chained` when a group handler's output is written to a durable
  topic with the ack of its input (``publish_to``): the headers of the outputs;
* :meth:`Telemetry.wrap` for each handler the bus runs (``@bus.on``, group
  handlers, ``@bus.worker``): a wrapper that extracts the context from the
  delivery's headers and runs the handler in a consumer span.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from ._handlers import HandlerSpec

__all__ = ["Kind", "Telemetry"]

Kind = Literal["local", "live", "durable", "queue"]
"""How the destination carries events (a span attribute)."""


class Telemetry(Protocol):
    """Traces and metrics of one bus (see the module docstring)."""

    def bind(self, bus: object) -> None:
        """Called once by the bus it serves (connect signal receivers there)."""
        ...

    def sending(
        self, destination: str, kind: Kind, headers: dict[str, str], count: int
    ) -> AbstractContextManager[dict[str, str]]:
        """Around a publish of ``count`` events: yields the headers to send (``headers``
        with the trace context added)."""
        ...

    def chained(self, destination: str, cause_headers: Mapping[str, str]) -> dict[str, str]:
        """Headers of an output event caused by an event that carried ``cause_headers``."""
        ...

    def wrap(
        self, spec: HandlerSpec, destination: str, kind: Kind, group: str | None
    ) -> HandlerSpec:
        """``spec`` with its function run in a consumer span (same payload type)."""
        ...
