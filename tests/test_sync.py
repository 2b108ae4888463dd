"""eventbus.sync: publishing from blocking code, threads, no event loop of its own."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from eventbus import ClaimPolicy, Delivery, EventBus, Topic
from eventbus.errors import BusStateError
from eventbus.sync import SyncBus

from .helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]
THREADS = 8
PER_THREAD = 50


async def test_eight_threads_of_a_plain_program_reach_a_group_exactly_once(
    bus_factory: Any, redis_url: str
) -> None:
    bus: EventBus = bus_factory()
    orders: Topic[dict[str, int]] = Topic("orders", dict[str, int], durable=True)
    seen: Counter[str] = Counter()

    @bus.on(orders, group="sync", start="earliest", block=0.2, claim=ClaimPolicy(idle=30))
    async def handle(event: dict[str, int], d: Delivery) -> None:
        seen[d.id] += 1

    async with bus:
        proc = await anyio.run_process(
            [
                sys.executable,
                "-m",
                "tests.sync_publisher",
                redis_url,
                bus.prefix,
                str(THREADS),
                str(PER_THREAD),
            ],
            cwd=ROOT,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr.decode()
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        out = orjson.loads(proc.stdout)
        assert out["errors"] == []
        ids = out["ids"]
        assert len(ids) == len(set(ids)) == THREADS * PER_THREAD + 12
        await wait_until(lambda: set(seen) == set(ids), timeout=20)
        assert set(seen.values()) == {1}


def test_sync_bus_in_a_with_block_and_after_close(redis_url: str) -> None:
    orders: Topic[dict[str, int]] = Topic("orders", dict[str, int], durable=True)
    with SyncBus(redis_url, prefix="tsync") as bus:
        receipt = bus.publish(orders, {"n": 1})
        assert receipt.stream_id is not None
        receipts = bus.publish_many(orders, [{"n": 2}, {"n": 3}])
        assert len(receipts) == 2
    with pytest.raises(BusStateError):
        bus.publish(orders, {"n": 4})
    bus.close()  # idempotent


def test_sync_bus_takes_either_a_bus_or_its_arguments(redis_url: str) -> None:
    with pytest.raises(TypeError):
        SyncBus(redis_url, bus=EventBus(redis_url))


def test_the_module_level_default_uses_eventbus_url(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import eventbus.sync

    monkeypatch.setenv("EVENTBUS_URL", redis_url)
    try:
        receipt = eventbus.sync.publish("sync-live", {"n": 1})
        assert receipt.receivers == 0  # a live topic nobody listens to
        assert eventbus.sync.default() is eventbus.sync.default()
        assert eventbus.sync.default().bus.url == redis_url
    finally:
        eventbus.sync.close()


async def test_threads_enqueue_jobs_that_an_async_worker_runs_once_each(
    bus_factory: Any,
) -> None:
    from eventbus import Queue

    jobs: Queue[int] = Queue("sync-jobs", int, priorities=2)
    bus: EventBus = bus_factory()
    seen: Counter[str] = Counter()

    @bus.worker(jobs, concurrency=8)
    async def handle(job: int, d: Delivery) -> None:
        seen[d.id] += 1

    async with bus:
        producer = SyncBus(bus._url, prefix=bus.prefix)
        ids: list[str] = []

        def work(t: int) -> None:
            ids.extend(producer.enqueue(jobs, t * 100 + i, priority=i % 2).id for i in range(25))

        def produce() -> list[str]:
            import threading

            threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            ids.extend(r.id for r in producer.enqueue_many(jobs, list(range(10))))
            assert producer.enqueue(jobs, 7, job_id="once").duplicate is False
            producer.close()
            return ids

        produced = await anyio.to_thread.run_sync(produce)
        assert len(set(produced)) == 110
        await wait_until(lambda: set(produced) <= set(seen), timeout=20)
        assert all(seen[i] == 1 for i in produced)
