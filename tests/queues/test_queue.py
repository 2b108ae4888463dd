"""Work queues (issue 12): enqueue, workers, priorities, retries, dead letters, the
iterator form, delays, shutdown. Against a real redis-server; faults and several
processes are in ``test_queue_faults.py``."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import anyio
import attrs
import orjson
import pytest

from eventbus import Delivery, EventBus, Limits, Queue, RetryPolicy
from eventbus._keys import queue_keys
from eventbus.errors import (
    BusStateError,
    ConfigurationError,
    EncodeError,
    InvalidTopic,
    PayloadTooLarge,
)

from ..helpers import command_calls, control_client, wait_until

FAST_RETRY = RetryPolicy(max_attempts=3, backoff=0.05, multiplier=1.0, jitter=0.0)


@attrs.frozen
class Resize:
    image: str
    width: int


async def processing_total(bus: EventBus, queue: Queue[Any]) -> int:
    ctl = control_client(bus._url)
    try:
        keys = queue_keys(bus.prefix, queue.name, queue.priorities)
        total = 0
        for key in await ctl.keys(keys.processing("*")):
            total += await ctl.llen(key)
        return total
    finally:
        await ctl.aclose()


# -- the queue object ---------------------------------------------------------------------


def test_queue_validates_its_arguments() -> None:
    with pytest.raises(InvalidTopic):
        Queue("bad:name")
    with pytest.raises(ConfigurationError, match="priorities"):
        Queue("q", priorities=0)
    with pytest.raises(ConfigurationError, match="priorities"):
        Queue("q", priorities=17)
    with pytest.raises(ConfigurationError, match="rate"):
        Queue("q", rate=(0, 1.0))
    with pytest.raises(ConfigurationError, match="rate"):
        Queue("q", rate=5)  # type: ignore[arg-type]
    q = Queue("q", Resize, priorities=3, rate=(10, timedelta(seconds=2)))
    assert q.rate == (10, 2.0)
    assert q == Queue("q", Resize, priorities=3, rate=(10, 2.0))
    assert "priorities=3" in repr(q)
    with pytest.raises(AttributeError):
        q.name = "other"  # type: ignore[misc]


# -- enqueue and work ----------------------------------------------------------------------


async def test_a_worker_runs_each_job_once_with_its_delivery(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("thumbs", Resize)
    bus = bus_factory()
    seen: list[tuple[Resize, Delivery]] = []

    @bus.worker(queue, concurrency=4)
    async def resize(job: Resize, delivery: Delivery) -> None:
        seen.append((job, delivery))

    async with bus:
        receipt = await bus.enqueue(queue, Resize("a.png", 100), headers={"tenant": "t1"})
        assert receipt.topic == "thumbs"
        assert not receipt.duplicate
        assert receipt.due is None
        receipts = await bus.enqueue_many(queue, [Resize(f"{i}.png", i) for i in range(50)])
        await wait_until(lambda: len(seen) == 51, timeout=10)
        _job, delivery = next(item for item in seen if item[0].image == "a.png")
        assert delivery.id == receipt.id
        assert delivery.topic == "thumbs"
        assert delivery.headers == {"tenant": "t1"}
        assert delivery.attempt == 1
        assert delivery.published_at == receipt.published_at
        assert sorted(d.id for _, d in seen) == sorted([receipt.id] + [r.id for r in receipts])
        await wait_until(lambda: bus.worker_statistics(resize)[0].finished == 51, timeout=5)
        stats = (await bus.stats(queue)).queue("thumbs")
        assert stats.waiting == (0,)
        assert stats.workers == 1
    assert await processing_total(bus, queue) == 0


async def test_enqueue_many_is_one_command_and_fifo(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    queue = Queue("fifo")
    bus = bus_factory()
    ctl = control_client(redis_url)
    async with bus:
        before = await command_calls(ctl, "lpush")
        await bus.enqueue_many(queue, list(range(500)))
        assert await command_calls(ctl, "lpush") - before == 1
        seen: list[int] = []
        async with bus.jobs(queue, concurrency=1) as jobs:
            async for job in jobs:
                seen.append(job.value)
                await job.ack()
                if len(seen) == 500:
                    break
        assert seen == list(range(500))  # one worker, one at a time: FIFO
    await ctl.aclose()


async def test_concurrent_enqueues_share_round_trips(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    queue = Queue("shared")
    bus = bus_factory()
    ctl = control_client(redis_url)
    async with bus:
        await bus.enqueue(queue, 0)  # registers the queue
        before = await command_calls(ctl, "lpush")
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(bus.enqueue, queue, i)
        pushes = await command_calls(ctl, "lpush") - before
        assert pushes < 50, pushes  # 200 enqueues, a few pipelined LPUSHes
        keys = queue_keys(bus.prefix, "shared", 1)
        assert await ctl.llen(keys.levels[0]) == 201
    await ctl.aclose()


async def test_job_id_deduplicates_while_waiting_or_running(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("dedupe")
    bus = bus_factory()
    async with bus:
        first = await bus.enqueue(queue, {"n": 1}, job_id="img-42")
        again = await bus.enqueue(queue, {"n": 2}, job_id="img-42")
        assert not first.duplicate
        assert again.duplicate
        assert again.id == "img-42"
        batch = await bus.enqueue_many(queue, [1, 2, 3], job_ids=["a", "img-42", "a"])
        assert [r.duplicate for r in batch] == [False, True, True]
        taken: list[Any] = []
        async with bus.jobs(queue, concurrency=5) as jobs:
            async for job in jobs:
                taken.append((job.id, job.value))
                # running: still a duplicate
                assert (await bus.enqueue(queue, 0, job_id=job.id)).duplicate
                await job.ack()
                if len(taken) == 2:
                    break
        assert sorted(taken) == [("a", 1), ("img-42", {"n": 1})]
        # settled: the id is free again (the ack is written within milliseconds)
        await wait_until(lambda: _not_duplicate(bus, queue, "img-42"), timeout=5)


async def _not_duplicate(bus: EventBus, queue: Queue[Any], job_id: str) -> bool:
    receipt = await bus.enqueue(queue, 0, job_id=job_id)
    return not receipt.duplicate


async def test_bad_input_is_refused_before_redis(bus_factory: Callable[..., EventBus]) -> None:
    queue = Queue("typed", Resize, priorities=2)
    bus = bus_factory(limits=Limits(max_payload_bytes=1024))
    async with bus:
        with pytest.raises(EncodeError):
            await bus.enqueue(queue, {"not": "a resize"})  # type: ignore[arg-type]
        with pytest.raises(PayloadTooLarge):
            await bus.enqueue(queue, Resize("x" * 2000, 1))
        with pytest.raises(ConfigurationError, match="priority"):
            await bus.enqueue(queue, Resize("a", 1), priority=2)
        with pytest.raises(ConfigurationError, match="job_id"):
            await bus.enqueue(queue, Resize("a", 1), job_id="")
        with pytest.raises(ConfigurationError, match="naive"):
            await bus.enqueue(queue, Resize("a", 1), at=datetime(2030, 1, 1))
        with pytest.raises(ConfigurationError, match="one per job"):
            await bus.enqueue_many(queue, [Resize("a", 1)], job_ids=["a", "b"])
        with pytest.raises(ConfigurationError, match="Queue"):
            await bus.enqueue("typed", Resize("a", 1))  # type: ignore[arg-type]
        with pytest.raises(EncodeError):  # the whole batch is checked first
            await bus.enqueue_many(queue, [Resize("a", 1), 5])  # type: ignore[list-item]
        stats = (await bus.stats(queue)).queue("typed")
        assert stats.waiting == (0, 0)  # nothing reached Redis
    with pytest.raises(BusStateError):
        await bus.enqueue(queue, Resize("a", 1))


# -- raw producers ---------------------------------------------------------------------------


async def test_a_raw_lpush_of_json_is_a_job_and_garbage_is_dead_lettered(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    queue = Queue("raw", Resize)
    bus = bus_factory(limits=Limits(max_payload_bytes=2048))
    seen: list[tuple[Resize, Delivery]] = []

    @bus.worker(queue)
    async def handle(job: Resize, delivery: Delivery) -> None:
        seen.append((job, delivery))

    ctl = control_client(redis_url)
    key = queue_keys(bus.prefix, "raw", 1).levels[0]
    async with bus:
        # what another system, or redis-cli, does: LPUSH eb:{raw}:q '{...}'
        await ctl.lpush(key, '{"image": "cli.png", "width": 7}')
        await wait_until(lambda: len(seen) == 1, timeout=5)
        assert seen[0][0] == Resize("cli.png", 7)
        assert seen[0][1].id == ""
        assert seen[0][1].attempt == 1
        await ctl.lpush(key, "not json at all")
        await ctl.lpush(key, '{"image": "no width"}')
        await ctl.lpush(key, '{"eventbus": 1, "data": {}, "seq": "x"}')
        await ctl.lpush(key, orjson.dumps({"image": "x" * 4000, "width": 1}).decode())
        await wait_until(lambda: _dead_count(bus, queue, 4), timeout=5)
        letters = await bus.dead_letters(queue)
        reasons = {bytes(letter.job): letter.reason for letter in letters}
        assert reasons == {
            b"not json at all": "validation_error",  # bytes, not a Resize
            b'{"image": "no width"}': "validation_error",
            b'{"eventbus": 1, "data": {}, "seq": "x"}': "decode_error",  # a bad envelope
            orjson.dumps({"image": "x" * 4000, "width": 1}): "too_large",
        }
        assert {letter.job for letter in letters} >= {b"not json at all", b'{"image": "no width"}'}
        assert all(letter.attempts == 1 for letter in letters)
        assert len(seen) == 1  # none of them reached the handler
    await ctl.aclose()


RAW_DEDUPE = (
    "if redis.call('HSETNX', KEYS[1], ARGV[1], 1) == 1 then"
    " return redis.call('LPUSH', KEYS[2], ARGV[2]) end return 0"
)
"""docs/wire-format.md's recipe for a raw producer's job id: register the id in
q-ids and push in one step, refused while the id waits or runs."""


async def test_a_raw_producer_deduplicates_with_the_documented_recipe(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    """A raw ``LPUSH`` is never deduplicated (a take does not look into jobs); a raw
    producer that registers the id as ``enqueue(job_id=)`` does (``HSETNX`` in
    ``q-ids``, then ``LPUSH``, in one ``EVAL``) shares its deduplication: refused
    while a job with that id waits or runs, free again once it is acked."""
    queue = Queue("rawids", Resize)
    bus = bus_factory()
    ctl = control_client(redis_url)
    keys = queue_keys(bus.prefix, "rawids", 1)
    job = '{"eventbus":1,"id":"img-42","ts":1767225600000,"data":{"image":"b.png","width":50}}'

    async def raw_push() -> int:
        return int(await ctl.eval(RAW_DEDUPE, 2, keys.ids, keys.levels[0], "img-42", job))

    async with bus:
        assert await raw_push() == 1
        assert await raw_push() == 0  # waiting: refused
        assert (await bus.enqueue(queue, Resize("c.png", 1), job_id="img-42")).duplicate
        async with bus.jobs(queue, concurrency=1) as jobs:
            taken = await jobs.receive()
            assert (taken.id, taken.value) == ("img-42", Resize("b.png", 50))
            assert await raw_push() == 0  # running: refused
            await taken.ack()

            async def released() -> bool:
                return not await ctl.hexists(keys.ids, "img-42")

            await wait_until(released, timeout=5)
        assert await raw_push() == 1  # settled: the id is free again
        assert await ctl.llen(keys.levels[0]) == 1
    await ctl.aclose()


async def _dead_count(bus: EventBus, queue: Queue[Any], n: int) -> bool:
    return len(await bus.dead_letters(queue)) >= n


# -- priorities ---------------------------------------------------------------------------


async def test_priorities_are_strict_and_fifo_within_a_level(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("prio", priorities=3)
    bus = bus_factory()
    async with bus:
        for i in range(5):
            await bus.enqueue(queue, ("low", i))
        await bus.enqueue_many(queue, [("high", i) for i in range(3)], priority=2)
        await bus.enqueue_many(queue, [("mid", i) for i in range(3)], priority=1)
        stats = (await bus.stats(queue)).queue("prio")
        assert stats.waiting == (5, 3, 3)
        assert stats.length == 11
        order: list[Any] = []
        async with bus.jobs(queue, concurrency=1) as jobs:
            async for job in jobs:
                order.append(tuple(job.value))
                assert job.priority == {"high": 2, "mid": 1, "low": 0}[job.value[0]]
                await job.ack()
                if len(order) == 11:
                    break
    assert order == (
        [("high", i) for i in range(3)]
        + [("mid", i) for i in range(3)]
        + [("low", i) for i in range(5)]
    )


async def test_an_idle_worker_wakes_at_once_for_an_urgent_job(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("wake", priorities=2)
    bus = bus_factory()
    got = anyio.Event()
    took: list[float] = []

    @bus.worker(queue, block=10)  # blocks on level 0 for up to 10 s per call
    async def handle(job: int) -> None:
        took.append(time.monotonic())
        got.set()

    async with bus:
        await anyio.sleep(0.2)  # the worker is blocked by now
        sent = time.monotonic()
        await bus.enqueue(queue, 1, priority=1)
        with anyio.fail_after(5):
            await got.wait()
        assert took[0] - sent < 1.0


# -- failures -------------------------------------------------------------------------------


async def test_failures_retry_with_backoff_then_dead_letter(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("flaky")
    bus = bus_factory()
    attempts: list[tuple[str, int, float]] = []

    @bus.worker(queue, retry=FAST_RETRY)
    async def handle(job: dict[str, Any], delivery: Delivery) -> None:
        attempts.append((job["name"], delivery.attempt, time.monotonic()))
        if job["name"] == "poison" or delivery.attempt < 2:
            raise ValueError(f"fail {job['name']}")

    async with bus:
        await bus.enqueue(queue, {"name": "poison"}, job_id="p1")
        await bus.enqueue(queue, {"name": "once"})
        await wait_until(lambda: _dead_count(bus, queue, 1), timeout=10)
        await wait_until(lambda: len(attempts) == 5, timeout=5)
        poison = [a for n, a, _t in attempts if n == "poison"]
        once = [a for n, a, _t in attempts if n == "once"]
        assert poison == [1, 2, 3]
        assert once == [1, 2]
        times = [t for n, _a, t in attempts if n == "poison"]
        assert all(later - earlier >= 0.04 for earlier, later in itertools.pairwise(times))
        (letter,) = await bus.dead_letters(queue)
        assert letter.job_id == "p1"
        assert letter.reason == "handler_error"
        assert letter.error_type == "ValueError"
        assert "fail poison" in letter.error_message
        assert letter.attempts == 3
        assert "ValueError" in letter.traceback
        stats = (await bus.stats(queue)).queue("flaky")
        assert stats.dead_letters == 1
        assert stats.failed == 4
        assert stats.finished == 1
        # the id is free again once dead-lettered; replay puts it back, attempts reset
        assert await bus.replay_dead_letters(queue) == 1
        await wait_until(lambda: len(attempts) == 8, timeout=10)
        assert [a for n, a, _t in attempts if n == "poison"] == [1, 2, 3, 1, 2, 3]
        await wait_until(lambda: _dead_count(bus, queue, 1), timeout=5)
        assert await bus.purge_dead_letters(queue) == 1
        assert await bus.dead_letters(queue) == []


async def test_a_job_past_its_timeout_is_cancelled_and_fails(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("slow")
    bus = bus_factory()
    cancelled: list[int] = []

    @bus.worker(queue, timeout=0.2, max_attempts=2, retry=FAST_RETRY)
    async def handle(job: int, delivery: Delivery) -> None:
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            cancelled.append(delivery.attempt)
            raise

    async with bus:
        start = time.monotonic()
        await bus.enqueue(queue, 1)
        await wait_until(lambda: _dead_count(bus, queue, 1), timeout=10)
        assert time.monotonic() - start < 5
        (letter,) = await bus.dead_letters(queue)
        assert letter.error_type == "JobTimeout"
        assert "timeout=0.2s" in letter.error_message
        assert cancelled == [1, 2]


# -- the iterator form ----------------------------------------------------------------------


async def test_jobs_iterator_ack_nack_and_put_back_on_exit(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("iter")
    bus = bus_factory()
    async with bus:
        await bus.enqueue_many(queue, ["ack", "retry", "reject", "keep"])
        seen: list[tuple[str, int]] = []
        async with bus.jobs(queue, concurrency=4, retry=FAST_RETRY) as jobs:
            async for job in jobs:
                seen.append((job.value, job.attempt))
                if job.value == "ack":
                    await job.ack()
                    with pytest.raises(BusStateError):
                        await job.ack()
                elif job.value == "retry":
                    if job.attempt == 1:
                        await job.nack(delay=0.05)
                    else:
                        await job.ack()
                elif job.value == "reject":
                    await job.nack(requeue=False, error="bad job")
                if len(seen) == 5:
                    break  # "keep" is never settled
        assert sorted(seen) == sorted(
            [("ack", 1), ("retry", 1), ("retry", 2), ("reject", 1), ("keep", 1)]
        )
        (letter,) = await bus.dead_letters(queue)
        assert letter.reason == "rejected"
        assert letter.error_message == "bad job"
        stats = (await bus.stats(queue)).queue("iter")
        assert stats.waiting == (1,)
        assert stats.processing == 0
        async with bus.jobs(queue) as jobs:
            job = await jobs.receive()
            assert job.value == "keep"
            await job.ack()


async def test_the_iterator_hands_out_a_suspect_job_alone(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    """A job that a dead worker held (its count in ``q-stalled``, as a reaper leaves
    it) is handed out only once the job handed out before it is settled and out of
    the processing list, and nothing else is taken while it is out: if it kills the
    process, it is the only job a reaper finds there to blame."""
    queue = Queue("suspect")
    bus = bus_factory()
    ctl = aioredis_bytes(redis_url)
    keys = queue_keys(bus.prefix, "suspect", 1)
    async with bus:
        await bus.enqueue_many(queue, ["a", "suspect", "b"])
        raws = {orjson.loads(raw)["data"]: raw for raw in await ctl.lrange(keys.levels[0], 0, -1)}
        await ctl.hset(keys.stalled, hashlib.sha1(raws["suspect"]).hexdigest(), 1)
        async with bus.jobs(queue, concurrency=5) as jobs:
            first = await jobs.receive()
            assert first.value == "a"

            processing = keys.processing(jobs.statistics().worker)

            async def taken() -> bool:  # "a" and the suspect, the last of its take call
                return await ctl.llen(processing) >= 2

            await wait_until(taken, timeout=5)
            await first.ack()
            second = await jobs.receive()
            assert (second.value, second.attempt) == ("suspect", 2)
            # Out alone: "a" acked and written, "b" not taken.
            assert await ctl.lrange(processing, 0, -1) == [raws["suspect"]]
            assert await ctl.lrange(keys.levels[0], 0, -1) == [raws["b"]]
            await second.ack()
            third = await jobs.receive()
            assert third.value == "b"
            await third.ack()
    await ctl.aclose()


def aioredis_bytes(url: str) -> Any:
    """A control client that returns bytes (the jobs as stored)."""
    import redis.asyncio as aioredis

    return aioredis.Redis.from_url(url)


# -- later --------------------------------------------------------------------------------


async def test_a_delayed_job_waits_in_the_schedule_until_due(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("later", priorities=2)
    bus = bus_factory()
    seen: list[tuple[int, Delivery, float]] = []

    @bus.worker(queue)
    async def handle(job: int, delivery: Delivery) -> None:
        seen.append((job, delivery, time.time()))

    async with bus:
        receipt = await bus.enqueue(queue, 1, delay=0.4, priority=1, job_id="later-1")
        assert receipt.due is not None
        assert (await bus.enqueue(queue, 2, job_id="later-1")).duplicate  # scheduled counts
        stats = (await bus.stats(queue)).queue("later")
        assert stats.scheduled == 1
        assert stats.length == 0
        past = await bus.enqueue(queue, 3, at=datetime.now(timezone.utc) - timedelta(hours=1))
        await wait_until(lambda: len(seen) == 2, timeout=5)
        by_job = {job: (delivery, at) for job, delivery, at in seen}
        assert by_job[3][0].id == past.id
        delivery, at = by_job[1]
        assert delivery.id == "later-1"
        assert delivery.due == receipt.due
        assert at >= receipt.due.timestamp() - 0.01


# -- shutdown ------------------------------------------------------------------------------


async def test_shutdown_finishes_running_jobs_and_puts_back_the_rest(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("drain")
    bus = bus_factory(shutdown_grace=2.0)
    started: list[int] = []
    finished: list[int] = []

    @bus.worker(queue, concurrency=2)
    async def handle(job: int) -> None:
        started.append(job)
        await anyio.sleep(0.3)
        finished.append(job)

    async with bus:
        await bus.enqueue_many(queue, list(range(20)))
        await wait_until(lambda: len(started) == 2, timeout=5)
    assert sorted(finished) == sorted(started)  # every started job finished
    assert len(started) < 20
    checker = bus_factory()
    async with checker:
        stats = (await checker.stats(queue)).queue("drain")
        assert stats.processing == 0
        assert stats.length == 20 - len(finished)
        assert stats.workers == 0  # the worker left the set as it stopped


async def test_a_job_cut_off_by_the_grace_period_goes_back(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("cut")
    bus = bus_factory(shutdown_grace=0.2)
    started = anyio.Event()

    @bus.worker(queue)
    async def handle(job: int) -> None:
        started.set()
        await anyio.sleep(30)

    async with bus:
        await bus.enqueue(queue, 7)
        with anyio.fail_after(5):
            await started.wait()
    checker = bus_factory()
    async with checker:
        stats = (await checker.stats(queue)).queue("cut")
        assert stats.processing == 0
        assert stats.length == 1
        assert stats.failed == 0


# -- statistics ------------------------------------------------------------------------------


async def test_stats_report_age_processing_workers_and_rates(
    bus_factory: Callable[..., EventBus],
) -> None:
    queue = Queue("stats", priorities=2)
    bus = bus_factory()
    release = anyio.Event()

    @bus.worker(queue, concurrency=2, heartbeat=0.6)
    async def handle(job: int) -> None:
        await release.wait()

    # All six wait before the worker starts: otherwise it may take two of the first
    # five before the urgent one is enqueued.
    async with bus_factory() as producer:
        await producer.enqueue_many(queue, list(range(5)))
        await producer.enqueue(queue, 99, priority=1)
    async with bus:
        await wait_until(lambda: bus.worker_statistics(handle)[0].running == 2, timeout=5)
        await anyio.sleep(0.3)
        stats = (await bus.stats()).queue("stats")
        assert stats.processing == 2
        assert stats.waiting == (4, 0)  # the urgent one was taken first
        assert stats.workers == 1
        assert stats.oldest_waiting_age is not None
        assert stats.oldest_waiting_age >= 0.25
        assert stats.started == 2
        release.set()
        await wait_until(lambda: bus.worker_statistics(handle)[0].finished == 6, timeout=5)

        async def rates_seen() -> bool:
            s = (await bus.stats(queue)).queue("stats")
            return s.finished == 6 and s.finished_per_s > 0 and s.started_per_s > 0

        await wait_until(rates_seen, timeout=5)


async def test_cancel_a_delayed_job_frees_its_id(bus_factory: Callable[..., EventBus]) -> None:
    queue = Queue("cancel", priorities=2)
    bus = bus_factory()
    async with bus:
        receipt = await bus.enqueue(queue, 1, delay=60, priority=1, job_id="c-1")
        other = await bus.enqueue(queue, 2, delay=60)
        assert await bus.cancel(receipt) is True
        assert await bus.cancel(receipt) is False
        assert await bus.cancel(other.id, topic=queue) is True
        stats = (await bus.stats(queue)).queue("cancel")
        assert stats.scheduled == 0
        assert not (await bus.enqueue(queue, 3, job_id="c-1")).duplicate


# -- rate limits ---------------------------------------------------------------------------


async def test_a_rate_limit_caps_starts_per_window_without_spinning(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    queue = Queue("limited", rate=(5, 0.5))
    bus = bus_factory()
    starts: list[float] = []

    @bus.worker(queue, concurrency=10)
    async def handle(job: int) -> None:
        starts.append(time.monotonic())

    ctl = control_client(redis_url)
    async with bus:
        await bus.enqueue_many(queue, list(range(20)))
        calls_before = await command_calls(ctl, "evalsha")
        begin = time.monotonic()
        await wait_until(lambda: len(starts) == 20, timeout=10)
        elapsed = time.monotonic() - begin
        calls = await command_calls(ctl, "evalsha") - calls_before
    await ctl.aclose()
    # 20 jobs at 5 per 0.5 s: four windows, so at least ~1.5 s, and not much more
    assert 1.4 <= elapsed <= 4.0, elapsed
    starts.sort()
    for i in range(len(starts) - 5):
        # any 6 consecutive starts span about a window at least (the limit is by the
        # Redis clock at take time; a start may run a little after its take)
        assert starts[i + 5] - starts[i] >= 0.5 - 0.1, (i, starts)
    assert calls < 100, calls  # slept between windows rather than polled


async def test_the_wire_format_page_examples_enqueue_jobs(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    """docs/wire-format.md, "Work queues": the redis-cli lines, run as written (with
    this test's prefix), produce the jobs the page says."""
    import shlex
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs" / "wire-format.md").read_text()
    section = page.split("## Work queues", 1)[1].split("# What waits", 1)[0]
    lines = [line for line in section.splitlines() if "redis-cli" in line and "LPUSH" in line]
    assert len(lines) == 4
    queue = Queue("thumbs", Resize, priorities=3)
    bus = bus_factory()
    seen: list[tuple[Resize, Delivery]] = []
    ctl = control_client(redis_url)
    async with bus:
        for line in lines:
            if line.startswith("printf"):
                argv = shlex.split(line.split("|", 1)[1])
                assert argv[:3] == ["redis-cli", "-x", "LPUSH"]
                value = shlex.split(line.split("|", 1)[0])[1].replace("\\000", "\x00")
                await ctl.lpush(argv[3].replace("eb:", f"{bus.prefix}:", 1), value)
            else:
                argv = shlex.split(line)
                assert argv[:2] == ["redis-cli", "LPUSH"]
                await ctl.lpush(argv[2].replace("eb:", f"{bus.prefix}:", 1), argv[3])

        @bus.worker(queue, concurrency=1)
        async def handle(job: Resize, delivery: Delivery) -> None:
            seen.append((job, delivery))

        await wait_until(lambda: len(seen) == 3, timeout=5)
    await ctl.aclose()
    assert seen[0][0] == Resize("c.png", 10)  # the urgent one first
    assert seen[1][0] == Resize("a.png", 100)
    job, delivery = seen[2]
    assert job == Resize("b.png", 50)
    assert delivery.id == "img-42"
    assert delivery.headers == {"tenant": "t1"}
    assert delivery.published_at == datetime(2026, 1, 1, tzinfo=timezone.utc)
