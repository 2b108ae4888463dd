"""Traces across processes (issue 14): a publisher here, a consumer in another
process, each exporting to its own in-memory exporter; the consumer's process spans
must be children of this process's send spans, hop by hop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import orjson
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from eventbus import EventBus, Queue, Topic
from eventbus.otel import Telemetry

ROOT = Path(__file__).resolve().parents[2]


async def test_consumer_spans_in_another_process_are_children_of_the_publishers(
    redis_url: str,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    prefix = f"o{id(exporter) % 100000}"
    consumer = await anyio.to_thread.run_sync(
        lambda: subprocess.Popen(
            [sys.executable, "-m", "tests.otel.otel_consumer", redis_url, prefix, "4"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    )
    try:
        assert consumer.stdout is not None
        line = await anyio.to_thread.run_sync(consumer.stdout.readline)
        assert line.strip() == "ready", consumer.stderr.read() if consumer.stderr else line
        async with EventBus(
            redis_url, prefix=prefix, telemetry=Telemetry(tracer_provider=provider)
        ) as bus:
            await bus.publish(Topic("orders", durable=True), {"order": 1})
            await bus.publish(Topic("orders", durable=True), {"order": 2}, delay=0.1)
            await bus.publish(Topic("prices"), {"price": 3})
            await bus.enqueue(Queue("jobs"), {"job": 4})
        out, err = await anyio.to_thread.run_sync(lambda: consumer.communicate(timeout=40))
    finally:
        if consumer.poll() is None:
            consumer.kill()
            await anyio.to_thread.run_sync(consumer.wait)
    assert consumer.returncode == 0, err
    theirs: list[dict[str, Any]] = [orjson.loads(x) for x in out.splitlines() if x.strip()]
    ours = {
        f"{s.get_span_context().span_id:016x}": s
        for s in exporter.get_finished_spans()
        if s.name.startswith("send ")
    }
    assert len(ours) == 4
    processes = [s for s in theirs if s["name"].startswith("process ")]
    assert sorted(s["name"] for s in processes) == [
        "process jobs",
        "process orders",
        "process orders",
        "process prices",
    ]
    for span in processes:
        assert span["kind"] == "CONSUMER"
        parent = ours.get(span["parent_id"])
        assert parent is not None, span
        assert f"{parent.get_span_context().trace_id:032x}" == span["trace_id"]
        assert parent.name == "send " + span["name"].removeprefix("process ")
        assert span["attributes"]["messaging.system"] == "eventbus"
    (billing,) = {s["attributes"].get("messaging.consumer.group.name") for s in processes} - {None}
    assert billing == "billing"
