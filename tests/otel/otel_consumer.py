"""The consuming process of tests/otel/test_cross_process.py.

``python -m tests.otel.otel_consumer URL PREFIX N`` runs a bus with telemetry to an
in-memory exporter: a group handler on durable ``orders``, a handler on live
``prices``, a worker on queue ``jobs``. It prints ``ready`` once subscribed, handles
until it has seen N events in all, then prints its finished spans as JSON lines
(name, kind, trace id, span id, parent span id, attributes) and exits.
"""

from __future__ import annotations

import sys
from typing import Any

import anyio
import orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventbus import EventBus, Queue, Topic
from eventbus.otel import Telemetry


async def main() -> None:
    url, prefix, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    bus = EventBus(url, prefix=prefix, telemetry=Telemetry(tracer_provider=provider))
    seen = 0
    done = anyio.Event()

    def count() -> None:
        nonlocal seen
        seen += 1
        if seen >= n:
            done.set()

    @bus.on(Topic("orders", durable=True), group="billing", block=0.2)
    async def billing(event: Any) -> None:
        count()

    @bus.on(Topic("prices"))
    async def prices(event: Any) -> None:
        count()

    @bus.worker(Queue("jobs"), block=0.2)
    async def work(job: Any) -> None:
        count()

    async with bus:
        print("ready", flush=True)
        with anyio.fail_after(30):
            await done.wait()
    for span in exporter.get_finished_spans():
        ctx = span.get_span_context()
        line = {
            "name": span.name,
            "kind": span.kind.name,
            "trace_id": f"{ctx.trace_id:032x}",
            "span_id": f"{ctx.span_id:016x}",
            "parent_id": None if span.parent is None else f"{span.parent.span_id:016x}",
            "attributes": dict(span.attributes or {}),
        }
        print(orjson.dumps(line).decode(), flush=True)


if __name__ == "__main__":
    anyio.run(main)
