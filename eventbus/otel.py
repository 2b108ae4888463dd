"""OpenTelemetry traces and metrics for eventbus (``pip install 'eventbus[otel]'``).

::

    from eventbus import EventBus
    from eventbus.otel import Telemetry

    bus = EventBus(url, telemetry=Telemetry())   # the global tracer and meter providers

**Traces.** Every ``publish`` / ``publish_many`` / ``enqueue`` / ``enqueue_many`` runs
in a ``send <destination>`` span (kind ``PRODUCER``), whose context is injected into
the events' headers as W3C trace context (``traceparent``, ``tracestate``), so it
travels with the event on every path: local, live, durable (consumer groups, live
readers, replays, dead-letter replays), delayed (held in Redis with its headers,
released later), and queue jobs. Every handler the bus runs (``@bus.on``, group
handlers, ``@bus.worker``) runs in a ``process <destination>`` span (kind
``CONSUMER``) whose parent is that context, with the messaging attributes of the
OpenTelemetry semantic conventions (``messaging.system`` = ``eventbus``,
``messaging.destination.name``, ``messaging.operation.type`` = ``send`` /
``process``, ``messaging.message.id``, ``messaging.consumer.group.name``,
``messaging.message.conversation_id``, ``messaging.eventbus.attempt``). A handler
that raises records the exception and sets the span's status to error. Events a
handler publishes are children of its span; the outputs of ``publish_to``
chaining get a ``send`` span of their own under the input's context. Iterators
(``subscribe``, ``jobs``) hand out events without a span: wrap your handling in
:meth:`Telemetry.processing`.

**Metrics** (through the OpenTelemetry metrics API; fed from the bus's signals and
its handlers, so a bus without telemetry pays nothing):

=====================================  =========  ==========================================
instrument                             kind       what
=====================================  =========  ==========================================
``messaging.client.sent.messages``     counter    events published (``signals.published``)
``messaging.client.consumed.messages`` counter    events handed to a handler
``messaging.process.duration``         histogram  handler run time, s (error.type on failure)
``eventbus.failed``                    counter    handler failures (``signals.failed``)
``eventbus.dead_lettered``             counter    events and jobs dead-lettered
``eventbus.dropped``                   counter    events dropped by a full buffer
``eventbus.gaps``                      counter    events a subscriber missed (gaps)
``eventbus.lag``                       gauge      publish to handler start, s: the most since
                                                  the last collection
``eventbus.delayed.lateness``          gauge      due time to handler start, s (delayed
                                                  events): the most since the last collection
``eventbus.queue.wait``                gauge      enqueue (or due) to job start, s: the most
                                                  since the last collection
=====================================  =========  ==========================================

To expose them to Prometheus, give the meter provider a Prometheus reader
(``opentelemetry-exporter-prometheus``)::

    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import start_http_server

    start_http_server(9464)                       # scrape http://host:9464/metrics
    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    bus = EventBus(url, telemetry=Telemetry(meter_provider=provider))
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

import attrs

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics, propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("eventbus.otel needs OpenTelemetry: pip install 'eventbus[otel]'") from exc

from . import signals
from ._envelope import Delivery
from ._telemetry import Kind
from ._version import __version__

if TYPE_CHECKING:
    from ._handlers import HandlerSpec

__all__ = ["Telemetry"]

SYSTEM: Final = "eventbus"
_DURATION_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    7.5,
    10,
)


class Telemetry:
    """OpenTelemetry for one bus: ``EventBus(url, telemetry=Telemetry())``.

    :param tracer_provider: where spans go (default: the global provider).
    :param meter_provider: where metrics go (default: the global provider).
    :param propagator: how the context is written into headers (default: the global
        propagator, W3C trace context and baggage unless configured otherwise).
    :param process_kinds: the kinds of destination whose handlers run in a
        ``process`` span (and are counted and timed): ``"local"``, ``"live"``,
        ``"durable"``, ``"queue"`` (default: all). A span costs tens of microseconds
        in the Python SDK: a fan-out of a million live deliveries a second may leave
        ``"live"`` and ``"local"`` out (their publishes still carry the context).

    .. versionadded:: 0.3
    """

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        propagator: Any = None,
        process_kinds: Iterable[Kind] = ("local", "live", "durable", "queue"),
    ) -> None:
        kinds = frozenset(process_kinds)
        unknown = kinds - {"local", "live", "durable", "queue"}
        if unknown:
            raise ValueError(f"unknown process_kinds: {sorted(unknown)}")
        self._process_kinds = kinds
        self._tracer = trace.get_tracer("eventbus", __version__, tracer_provider=tracer_provider)
        meter = metrics.get_meter("eventbus", __version__, meter_provider=meter_provider)
        self._propagator = propagator
        # Per-event counts are plain ints here, read by the SDK when it collects
        # (observable counters): an SDK counter.add() per event cost more than the rest
        # of a no-op handler's handling.
        self._sent_counts: dict[str, int] = {}
        self._consumed_counts: dict[tuple[str, str | None], int] = {}
        meter.create_observable_counter(
            "messaging.client.sent.messages",
            callbacks=[self._observe_sent],
            unit="{message}",
            description="Events published",
        )
        meter.create_observable_counter(
            "messaging.client.consumed.messages",
            callbacks=[self._observe_consumed],
            unit="{message}",
            description="Events handed to a handler",
        )
        self._duration = meter.create_histogram(
            "messaging.process.duration",
            unit="s",
            description="Handler run time",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
        )
        self._failed = meter.create_counter(
            "eventbus.failed", unit="{message}", description="Handler failures"
        )
        self._dead = meter.create_counter(
            "eventbus.dead_lettered", unit="{message}", description="Events dead-lettered"
        )
        self._dropped = meter.create_counter(
            "eventbus.dropped", unit="{message}", description="Events dropped by a full buffer"
        )
        self._gaps = meter.create_counter(
            "eventbus.gaps", unit="{message}", description="Events a subscriber missed"
        )
        # The most since the last collection, per destination (and group): a gauge
        # fed by a float comparison per event, where a histogram record cost about as
        # much as the span. The run time (messaging.process.duration) stays a histogram.
        self._peaks: dict[str, dict[tuple[str, str | None], float]] = {
            "lag": {},
            "lateness": {},
            "wait": {},
        }
        for name, key, description in (
            ("eventbus.lag", "lag", "Publish to handler start, the most since last collected"),
            (
                "eventbus.delayed.lateness",
                "lateness",
                "Due time to handler start, the most since last collected",
            ),
            (
                "eventbus.queue.wait",
                "wait",
                "Enqueue (or due) to job start, the most since last collected",
            ),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._observe_peak(key)], unit="s", description=description
            )
        self._bound = False

    def _observe_peak(self, key: str) -> Any:
        peaks = self._peaks[key]

        def observe(_options: Any) -> Iterator[Any]:
            for (topic, group), value in list(peaks.items()):
                attributes = {"messaging.system": SYSTEM, "messaging.destination.name": topic}
                if group is not None:
                    attributes["messaging.consumer.group.name"] = group
                yield metrics.Observation(value, attributes)
                peaks[(topic, group)] = 0.0

        return observe

    def _observe_sent(self, _options: Any) -> Iterator[Any]:
        for topic, n in list(self._sent_counts.items()):
            yield metrics.Observation(
                n, {"messaging.system": SYSTEM, "messaging.destination.name": topic}
            )

    def _observe_consumed(self, _options: Any) -> Iterator[Any]:
        for (topic, group), n in list(self._consumed_counts.items()):
            attributes = {"messaging.system": SYSTEM, "messaging.destination.name": topic}
            if group is not None:
                attributes["messaging.consumer.group.name"] = group
            yield metrics.Observation(n, attributes)

    # -- the bus's hooks (eventbus._telemetry.Telemetry) --------------------------------

    def bind(self, bus: Any) -> None:
        """Connect the metric receivers to ``bus``'s signals (once per Telemetry)."""
        if self._bound:
            raise RuntimeError("a Telemetry serves one bus: create one per EventBus")
        self._bound = True
        dests: dict[str, dict[str, str]] = {}

        def attrs_of(topic: str) -> dict[str, str]:
            found = dests.get(topic)
            if found is None:
                found = dests[topic] = {
                    "messaging.system": SYSTEM,
                    "messaging.destination.name": topic,
                }
            return found

        sent = self._sent_counts

        def on_published(_sender: object, *, topic: str, **_: Any) -> None:
            sent[topic] = sent.get(topic, 0) + 1

        def on_failed(_sender: object, *, topic: str, error: BaseException, **_: Any) -> None:
            self._failed.add(1, {**attrs_of(topic), "error.type": type(error).__name__})

        def on_dead(_sender: object, *, topic: str, reason: str = "", **_: Any) -> None:
            self._dead.add(1, {**attrs_of(topic), "eventbus.reason": reason})

        def on_overflow(_sender: object, *, topic: str, **_: Any) -> None:
            self._dropped.add(1, attrs_of(topic))

        def on_gap(_sender: object, *, topic: str, gap: Any, **_: Any) -> None:
            self._gaps.add(int(gap.size), attrs_of(topic))

        bus.connect_signal(signals.published, on_published)
        bus.connect_signal(signals.failed, on_failed)
        bus.connect_signal(signals.dead_lettered, on_dead)
        bus.connect_signal(signals.overflowed, on_overflow)
        bus.connect_signal(signals.gap, on_gap)

    @contextmanager
    def sending(
        self, destination: str, kind: Kind, headers: dict[str, str], count: int
    ) -> Iterator[dict[str, str]]:
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": destination,
            "messaging.operation.type": "send",
            "messaging.operation.name": "enqueue" if kind == "queue" else "publish",
            "messaging.eventbus.kind": kind,
        }
        if count != 1:
            attributes["messaging.batch.message_count"] = count
        with self._tracer.start_as_current_span(
            f"send {destination}", kind=SpanKind.PRODUCER, attributes=attributes
        ):
            carrier = dict(headers)
            propagate.inject(carrier) if self._propagator is None else self._propagator.inject(
                carrier
            )
            yield carrier

    def chained(self, destination: str, cause_headers: Mapping[str, str]) -> dict[str, str]:
        parent = self._extract(cause_headers)
        span = self._tracer.start_span(
            f"send {destination}",
            context=parent,
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.destination.name": destination,
                "messaging.operation.type": "send",
                "messaging.operation.name": "publish",
                "messaging.eventbus.kind": "durable",
            },
        )
        carrier: dict[str, str] = {}
        ctx = trace.set_span_in_context(span, parent)
        if self._propagator is None:
            propagate.inject(carrier, context=ctx)
        else:
            self._propagator.inject(carrier, context=ctx)
        span.end()
        return carrier

    def wrap(
        self, spec: HandlerSpec, destination: str, kind: Kind, group: str | None
    ) -> HandlerSpec:
        if kind not in self._process_kinds:
            return spec
        fn = spec.fn
        wants = spec.wants_delivery
        base: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": destination,
            "messaging.operation.type": "process",
        }
        if group is not None:
            base["messaging.consumer.group.name"] = group
        metric_attrs = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": destination,
        }
        if group is not None:
            metric_attrs["messaging.consumer.group.name"] = group
        name = f"process {destination}"
        tracer = self._tracer
        queue = kind == "queue"

        counts = self._consumed_counts
        count_key = (destination, group)
        counts.setdefault(count_key, 0)
        extract = self._extract
        empty = otel_context.Context()

        def start(delivery: Delivery) -> tuple[Any, Any, float]:
            headers = delivery.headers
            # No trace context sent (a raw publisher, a bus without telemetry): a root
            # span, without asking the propagators to find nothing.
            parent = extract(headers) if headers else empty
            attributes = dict(base)
            if delivery.id:
                attributes["messaging.message.id"] = delivery.id
            if delivery.correlation_id:
                attributes["messaging.message.conversation_id"] = delivery.correlation_id
            if delivery.attempt != 1:
                attributes["messaging.eventbus.attempt"] = delivery.attempt
            span = tracer.start_span(
                name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes
            )
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            counts[count_key] += 1
            self._record_waits(delivery, time.time(), queue, count_key)
            return span, token, time.perf_counter()

        def finish(span: Any, token: Any, began: float, error: BaseException | None) -> None:
            duration = time.perf_counter() - began
            if error is None:
                self._duration.record(duration, metric_attrs)
            else:
                span.record_exception(error)
                span.set_status(Status(StatusCode.ERROR, str(error)))
                span.set_attribute("error.type", type(error).__name__)
                self._duration.record(
                    duration, {**metric_attrs, "error.type": type(error).__name__}
                )
            otel_context.detach(token)
            span.end()

        if spec.is_async:

            async def traced_async(payload: Any, delivery: Delivery) -> Any:
                span, token, began = start(delivery)
                try:
                    result = await (fn(payload, delivery) if wants else fn(payload))
                except BaseException as exc:
                    finish(span, token, began, exc)
                    raise
                finish(span, token, began, None)
                return result

            wrapped: Any = traced_async
        else:

            def traced(payload: Any, delivery: Delivery) -> Any:
                span, token, began = start(delivery)
                try:
                    result = fn(payload, delivery) if wants else fn(payload)
                except BaseException as exc:
                    finish(span, token, began, exc)
                    raise
                finish(span, token, began, None)
                return result

            wrapped = traced
        wrapped.__qualname__ = spec.name
        wrapped.__wrapped__ = fn
        return attrs.evolve(spec, fn=wrapped, wants_delivery=True, origin=fn)

    # -- for iterators and your own code -------------------------------------------------

    @contextmanager
    def processing(self, delivery: Delivery, *, group: str | None = None) -> Iterator[Any]:
        """A ``process`` span for an event taken from an iterator (``subscribe``,
        ``jobs``), child of its publisher's context::

            async for job in jobs:
                with telemetry.processing(job.delivery):
                    ...
        """
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.destination.name": delivery.topic,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.eventbus.attempt": delivery.attempt,
        }
        if delivery.id:
            attributes["messaging.message.id"] = delivery.id
        if group or delivery.group:
            attributes["messaging.consumer.group.name"] = group or delivery.group
        with self._tracer.start_as_current_span(
            f"process {delivery.topic}",
            context=self._extract(delivery.headers),
            kind=SpanKind.CONSUMER,
            attributes=attributes,
        ) as span:
            yield span

    def extract(self, delivery: Delivery) -> Any:
        """The OpenTelemetry context its publisher sent with ``delivery``."""
        return self._extract(delivery.headers)

    # -- internals ----------------------------------------------------------------------

    def _extract(self, headers: Mapping[str, str]) -> Any:
        if self._propagator is None:
            return propagate.extract(headers)
        return self._propagator.extract(headers)

    def _record_waits(
        self, delivery: Delivery, now: float, queue: bool, key: tuple[str, str | None]
    ) -> None:
        published = delivery.published_at
        due = delivery.due
        peaks = self._peaks
        if published is not None:
            lag = now - published.timestamp()
            if lag > peaks["lag"].get(key, 0.0):
                peaks["lag"][key] = lag
        if due is not None:
            late = now - due.timestamp()
            if late > peaks["lateness"].get(key, 0.0):
                peaks["lateness"][key] = late
        if queue:
            since: datetime | None = due or published
            if since is not None:
                wait = now - since.timestamp()
                if wait > peaks["wait"].get(key, 0.0):
                    peaks["wait"][key] = wait
