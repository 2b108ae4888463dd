"""eventbus.otel (issue 14): spans across every hop, in this process; across two
processes in ``test_cross_process.py``. The SDK's in-memory exporter and reader."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from eventbus import Delivery, EventBus, Queue, RetryPolicy, Topic
from eventbus.otel import Telemetry

from ..helpers import wait_until


@pytest.fixture
def spans() -> tuple[InMemorySpanExporter, TracerProvider]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter, provider


def by_name(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def parent_of(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


async def test_every_hop_in_one_process_links_consumer_to_producer(
    bus_factory: Callable[..., EventBus], spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    bus = bus_factory(telemetry=telemetry)
    local = Topic("loc", local=True)
    live = Topic("liv")
    orders = Topic("orders", durable=True)
    chained = Topic("chained", durable=True)
    jobs = Queue("jobs")
    seen: list[str] = []

    @bus.on(local)
    async def on_local(event: Any) -> None:
        seen.append("local")

    @bus.on(live)
    def on_live(event: Any, delivery: Delivery) -> None:  # sync, in a thread
        seen.append("live")

    @bus.on(orders, group="billing", publish_to=chained)
    async def bill(event: Any) -> dict[str, int]:
        seen.append("durable")
        return {"billed": 1}

    @bus.on(chained, group="audit")
    async def audit(event: Any) -> None:
        seen.append("chained")

    @bus.worker(jobs, retry=RetryPolicy(max_attempts=2, backoff=0.01, jitter=0))
    async def work(job: Any, delivery: Delivery) -> None:
        seen.append(f"job{delivery.attempt}")
        if delivery.attempt == 1:
            raise ValueError("first attempt fails")

    async with bus:
        await bus.publish(local, 1)
        await bus.publish(live, 2)
        await bus.publish(orders, 3)
        await bus.publish(orders, 4, delay=0.05)
        await bus.enqueue(jobs, 5)
        await wait_until(
            lambda: (
                sorted(seen)
                == ["chained", "chained", "durable", "durable", "job1", "job2", "live", "local"]
            ),
            timeout=10,
        )
    finished = exporter.get_finished_spans()
    sends = {s.name: s for s in finished if s.kind is SpanKind.PRODUCER}
    assert {"send loc", "send liv", "send orders", "send jobs", "send chained"} <= set(sends)
    for dest in ("loc", "liv", "jobs"):
        (send,) = by_name(finished, f"send {dest}")
        processes = by_name(finished, f"process {dest}")
        assert processes, dest
        for process in processes:
            assert process.kind is SpanKind.CONSUMER
            assert process.context.trace_id == send.context.trace_id
            assert parent_of(process) == send.context.span_id
            assert process.attributes["messaging.system"] == "eventbus"
            assert process.attributes["messaging.destination.name"] == dest
            assert process.attributes["messaging.operation.type"] == "process"
    # the durable topic: two publishes (one delayed), each with its own trace
    order_sends = by_name(finished, "send orders")
    order_processes = by_name(finished, "process orders")
    assert len(order_sends) == 2
    assert len(order_processes) == 2
    assert {parent_of(p) for p in order_processes} == {s.context.span_id for s in order_sends}
    assert all(p.attributes["messaging.consumer.group.name"] == "billing" for p in order_processes)
    # chaining: each output's send is in its input's trace, its process under it
    for process in by_name(finished, "process chained"):
        (send,) = [
            s for s in by_name(finished, "send chained") if parent_of(process) == s.context.span_id
        ]
        assert send.context.trace_id in {s.context.trace_id for s in order_sends}
    # the queue job: the failed attempt's span records the error; the retry is in the trace
    job_spans = sorted(by_name(finished, "process jobs"), key=lambda s: s.start_time or 0)
    assert [s.attributes.get("messaging.eventbus.attempt", 1) for s in job_spans] == [1, 2]
    assert job_spans[0].status.status_code is StatusCode.ERROR
    assert job_spans[0].attributes["error.type"] == "ValueError"
    assert job_spans[1].status.status_code is not StatusCode.ERROR
    # metrics
    data = reader.get_metrics_data()
    names = {
        metric.name: metric
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for metric in sm.metrics
    }
    assert {
        "messaging.client.sent.messages",
        "messaging.client.consumed.messages",
        "messaging.process.duration",
        "eventbus.failed",
        "eventbus.lag",
        "eventbus.delayed.lateness",
        "eventbus.queue.wait",
    } <= set(names)
    sent = sum(p.value for p in names["messaging.client.sent.messages"].data.data_points)
    assert sent >= 5


async def test_off_and_statistics_find_a_traced_handler(
    bus_factory: Callable[..., EventBus], spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    _exporter, provider = spans
    bus = bus_factory(telemetry=Telemetry(tracer_provider=provider))
    topic = Topic("t", local=True)
    got: list[int] = []

    @bus.on(topic)
    async def handler(event: int) -> None:
        got.append(event)

    async with bus:
        await bus.publish(topic, 1)
        await wait_until(lambda: got == [1])
        assert len(bus.handler_statistics(handler)) == 1
        await bus.off(handler)
        await bus.publish(topic, 2)
        await anyio.sleep(0.05)
    assert got == [1]


def test_a_telemetry_serves_one_bus(bus_factory: Callable[..., EventBus]) -> None:
    telemetry = Telemetry()
    bus_factory(telemetry=telemetry)
    with pytest.raises(RuntimeError, match="one bus"):
        bus_factory(telemetry=telemetry)


async def test_process_kinds_leave_out_the_live_deliveries(
    bus_factory: Callable[..., EventBus], spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    exporter, provider = spans
    telemetry = Telemetry(tracer_provider=provider, process_kinds=("durable",))
    bus = bus_factory(telemetry=telemetry)
    live = Topic("fast")
    orders = Topic("orders", durable=True)
    seen: list[str] = []

    @bus.on(live)
    async def fast(event: Any) -> None:
        seen.append("live")

    @bus.on(orders, group="g")
    async def slow(event: Any) -> None:
        seen.append("durable")

    async with bus:
        await bus.publish(live, 1)
        await bus.publish(orders, 2)
        await wait_until(lambda: sorted(seen) == ["durable", "live"])
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["process orders", "send fast", "send orders"]
    with pytest.raises(ValueError, match="unknown"):
        Telemetry(process_kinds=("topics",))  # type: ignore[arg-type]


async def test_metrics_count_time_and_peak(
    bus_factory: Callable[..., EventBus], spans: tuple[InMemorySpanExporter, TracerProvider]
) -> None:
    _exporter, provider = spans
    reader = InMemoryMetricReader()
    telemetry = Telemetry(
        tracer_provider=provider, meter_provider=MeterProvider(metric_readers=[reader])
    )
    bus = bus_factory(telemetry=telemetry)
    orders = Topic("orders", durable=True)
    handled: list[int] = []

    @bus.on(orders, group="billing", max_attempts=1)
    async def bill(event: int) -> None:
        handled.append(event)
        if event == 3:
            raise ValueError("three")

    async with bus:
        await bus.publish_many(orders, [1, 2, 3])
        await bus.publish(orders, 4, delay=0.05)
        await wait_until(lambda: len(handled) == 4, timeout=10)

        async def dead() -> bool:
            return (await bus.stats(orders)).topic("orders").dead_letters == 1

        await wait_until(dead, timeout=5)

    data = reader.get_metrics_data()  # once: a collection resets the peak gauges

    def points(name: str) -> list[Any]:
        return [
            point
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for metric in sm.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]

    (sent,) = points("messaging.client.sent.messages")
    assert sent.value == 4
    assert sent.attributes["messaging.destination.name"] == "orders"
    (consumed,) = points("messaging.client.consumed.messages")
    assert consumed.value == 4
    assert consumed.attributes["messaging.consumer.group.name"] == "billing"
    durations = points("messaging.process.duration")
    assert sum(p.count for p in durations) == 4
    assert any(p.attributes.get("error.type") == "ValueError" for p in durations)
    (failed,) = points("eventbus.failed")
    assert failed.value == 1
    (dead_lettered,) = points("eventbus.dead_lettered")
    assert dead_lettered.value == 1
    (lag,) = points("eventbus.lag")
    assert 0 < lag.value < 5
    (lateness,) = points("eventbus.delayed.lateness")
    assert 0 <= lateness.value < 5
    again = reader.get_metrics_data()  # the peaks start over after each collection
    (lag_again,) = [
        p
        for rm in again.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
        if m.name == "eventbus.lag"
        for p in m.data.data_points
    ]
    assert lag_again.value == 0.0
