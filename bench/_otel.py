"""The telemetry an ``eventbus-otel`` benchmark row runs with (issue 14): the
OpenTelemetry SDK as a service would configure it, with its exports discarded.

Spans go through a ``BatchSpanProcessor`` (the SDK's production processor: spans
are queued and exported from its own thread) to an exporter that drops them;
metrics are recorded into a ``MeterProvider`` whose reader is never collected.
What the row measures is the cost of eventbus's instrumentation with a real SDK
behind it: span creation, context extraction, attribute recording, the processor's
queue; not a network exporter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def telemetry(process_kinds: Sequence[str] | None = None) -> Any:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from eventbus.otel import Telemetry

    class Discard(SpanExporter):
        def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    traces = TracerProvider()
    traces.add_span_processor(BatchSpanProcessor(Discard(), max_queue_size=65536))
    meters = MeterProvider(metric_readers=[InMemoryMetricReader()])
    if process_kinds is None:
        return Telemetry(tracer_provider=traces, meter_provider=meters)
    return Telemetry(tracer_provider=traces, meter_provider=meters, process_kinds=process_kinds)
