"""Worker processes of ``bench/delayed.py`` (W5): publisher, releaser and consumer per contender.

Started by ``delayed.py`` with the contender's own interpreter (its venv), so the
module level imports only the standard library; each contender's library is
imported inside its own functions. Every loop is bounded in count and time; each
worker prints JSON lines on stdout (``{"event": "ready"}``, then
``{"event": "result", ...}``) and is steered through its stdin:

    python bench/_delayed_worker.py consume --contender NAME --url URL --events N ...
        ready; reads one line ``{"first_due_ms": F, "span_ms": S}``; receives until every
        event arrived (plus --settle seconds, to see duplicates) or until
        F + S + --grace; prints the lateness of each event's first receipt.
    python bench/_delayed_worker.py release --contender raw|eventbus --url URL ...
        the raw mover (Lua, every --tick) or one eventbus scheduler; ready, then
        runs until its stdin closes (or --time-limit).
    python bench/_delayed_worker.py publish --contender NAME --url URL --events N \
        --first-due-ms F --span-ms S
        schedules event n (n < N) due at F + n * S / N, in a shuffled order, as
        ``{"n": n, "due_ms": due}``; prints when it was done and how many
        scheduling calls returned after their own event was due.
    python bench/_delayed_worker.py backlog --contender raw|eventbus --url URL --events N
        W5b: schedules N events that are all due by the time it returns (raw: due in
        the past; eventbus: each chunk due 2 s after it is sent, then waits for that).

Keys (private redis-server, flushed between runs): raw ``w5:due`` (sorted set,
member = payload, score = due ms), ``w5:stream`` (its stream), group ``w5``;
eventbus topic ``w5.events`` (durable) with prefix ``bench``; arq and bullmq their
own default key names.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from typing import Any

PREFIX = "bench"
TOPIC = "w5.events"
GROUP = "w5"
RAW_ZSET = "w5:due"
RAW_STREAM = "w5:stream"
QUEUE = "w5"  # bullmq queue name
CHUNK = 500  # concurrent scheduling calls in flight (publish)

# KEYS[1] the sorted set, KEYS[2] the stream; ARGV[1] at most this many per call.
# Returns how many it moved. XADD before ZREM: a failure in between duplicates, never loses.
RAW_MOVER = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, m in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'p', m)
end
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return #due
"""


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of a sorted list (``inf`` = never received)."""
    if not ordered:
        return None
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def versions(contender: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "raw": ["redis", "hiredis"],
        "arq": ["arq", "redis", "hiredis"],
        "bullmq": ["bullmq", "redis", "hiredis"],
        "eventbus": ["eventbus", "redis", "hiredis", "anyio"],
    }[contender]
    found = {"python": sys.version.split()[0]}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


class Control:
    """The orchestrator's lines on stdin, read by a daemon thread (``None``: stdin closed)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in sys.stdin:
            if line.strip():
                self.loop.call_soon_threadsafe(self.lines.put_nowait, json.loads(line))
        self.loop.call_soon_threadsafe(self.lines.put_nowait, None)

    async def next(self, timeout: float) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self.lines.get(), timeout)
        except asyncio.TimeoutError:
            return None


# -- consume ---------------------------------------------------------------------------


class Record:
    """First receipt time of each event; duplicates and strangers counted."""

    def __init__(self, events: int) -> None:
        self.events = events
        self.lateness: dict[int, float] = {}
        self.duplicates = 0
        self.unknown = 0
        self.all_in = asyncio.Event()

    def add(self, n: int, due_ms: float, now: float) -> None:
        if not 0 <= n < self.events:
            self.unknown += 1
        elif n in self.lateness:
            self.duplicates += 1
        else:
            self.lateness[n] = now - due_ms / 1000
            if len(self.lateness) == self.events:
                self.all_in.set()

    def summary(self) -> dict[str, Any]:
        got = sorted(self.lateness.values())
        lost = self.events - len(got)
        ordered = got + [math.inf] * lost
        out: dict[str, Any] = {
            "received": len(got),
            "lost": lost,
            "duplicates": self.duplicates,
            "unknown": self.unknown,
        }
        for key, q in (("p50", 50), ("p99", 99), ("max", 100)):
            v = percentile(ordered, q)
            out[key] = None if v is None or math.isinf(v) else v
        out["received_p99"] = percentile(got, 99)
        out["received_max"] = got[-1] if got else None
        out["early"] = sum(1 for v in got if v < 0)
        out["min"] = got[0] if got else None
        return out


async def consume_raw(url: str, rec: Record, started: Callable[[], Awaitable[None]]) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    try:
        try:
            await r.xgroup_create(RAW_STREAM, GROUP, id="0", mkstream=True)
        except Exception as exc:  # BUSYGROUP after a retry
            if "BUSYGROUP" not in str(exc):
                raise
        await started()
        while True:
            reply = await r.xreadgroup(GROUP, "c1", {RAW_STREAM: ">"}, count=500, block=1000)
            if not reply:
                continue
            now = time.time()
            ids = []
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    p = json.loads(fields[b"p"])
                    rec.add(p["n"], p["due_ms"], now)
                    ids.append(entry_id)
            await r.xack(RAW_STREAM, GROUP, *ids)
    finally:
        await r.aclose()


async def consume_arq(
    url: str, rec: Record, started: Callable[[], Awaitable[None]], poll_delay: float | None
) -> None:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def w5_job(ctx: dict[str, Any], n: int, due_ms: float) -> None:
        rec.add(n, due_ms, time.time())

    pool = await create_pool(RedisSettings.from_dsn(url))
    kwargs: dict[str, Any] = {} if poll_delay is None else {"poll_delay": poll_delay}
    worker = Worker(
        functions=[func(w5_job, name="w5_job")],
        redis_pool=pool,
        handle_signals=False,  # the orchestrator steers it through stdin
        **kwargs,
    )
    task = asyncio.create_task(worker.main())
    try:
        await started()
        await task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await worker.close()


async def consume_bullmq(
    url: str, rec: Record, started: Callable[[], Awaitable[None]], concurrency: int | None
) -> None:
    from bullmq import Worker

    async def process(job: Any, token: str) -> None:
        rec.add(job.data["n"], job.data["due_ms"], time.time())

    opts: dict[str, Any] = {"connection": bullmq_connection(url)}
    if concurrency is not None:
        opts["concurrency"] = concurrency
    worker = Worker(QUEUE, process, opts)
    # Worker() only schedules its run loop: ready once it runs and has asked for a job.
    errors: list[str] = []
    worker.on("error", lambda err, *_: errors.append(f"{type(err).__name__}: {err}"))
    for _ in range(3000):  # at most 30 s; bullmq signals neither state
        if worker.running and worker.drained:
            break
        await asyncio.sleep(0.01)
    if not worker.running:
        raise RuntimeError(f"bullmq Worker not running within 30s: {errors[-3:]}")
    try:
        await started()
        await asyncio.Event().wait()  # until cancelled
    finally:
        for err in errors[-5:]:  # bullmq only emits them: on stderr for the record
            print(f"bullmq worker error: {err}", file=sys.stderr)
        await worker.close()


def bullmq_connection(url: str) -> dict[str, Any]:
    """bullmq's connection options for ``url``, without redis-py 8's 5 s socket timeout.

    redis-py 8 reads replies with ``socket_timeout=5`` by default (``None`` before).
    The bullmq Worker blocks in BZPOPMIN for up to 10 s (``drainDelay`` 5 s when idle,
    up to the next delayed job otherwise): the read times out, bullmq's redis-py
    ``Retry`` (20 attempts, backoff up to 20 s) reissues the same BZPOPMIN, and the
    worker, its marker consumed, sleeps through the due time of every delayed job.
    ``socket_timeout=None`` is redis-py 7's default, which bullmq assumes.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return {
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "db": int(parts.path.lstrip("/") or 0),
        "socket_timeout": None,
    }


async def consume_eventbus(url: str, rec: Record, started: Callable[[], Awaitable[None]]) -> None:
    from eventbus import EventBus, Topic

    topic = Topic(TOPIC, durable=True)
    bus = EventBus(url, prefix=PREFIX, **scheduler_kwarg(EventBus, False))

    # Read up to 500 at a time, as the raw consumer does (COUNT 500): the default
    # batch of 10 is for handlers that do real work, not for 10,000 events/s.
    @bus.on(topic, group=GROUP, batch=500)
    async def on_event(event: dict[str, Any]) -> None:
        rec.add(event["n"], event["due_ms"], time.time())

    async with bus:
        await started()
        await asyncio.Event().wait()  # until cancelled


def scheduler_kwarg(cls: Any, on: bool) -> dict[str, Any]:
    """``{"scheduler": on}`` if ``EventBus`` takes that argument (the spec), else nothing."""
    import inspect

    return {"scheduler": on} if "scheduler" in inspect.signature(cls).parameters else {}


async def consume_main(args: argparse.Namespace) -> None:
    control = Control()
    rec = Record(args.events)
    ready = asyncio.Event()

    async def started() -> None:
        ready.set()

    if args.contender == "raw":
        body = consume_raw(args.url, rec, started)
    elif args.contender == "arq":
        body = consume_arq(args.url, rec, started, args.poll_delay)
    elif args.contender == "bullmq":
        body = consume_bullmq(args.url, rec, started, args.concurrency)
    else:
        body = consume_eventbus(args.url, rec, started)
    task = asyncio.create_task(body)
    try:
        done, _ = await asyncio.wait(
            [task, asyncio.create_task(ready.wait())],
            timeout=args.time_limit,
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            task.result()  # raises what went wrong
            raise RuntimeError("the consumer ended before it was ready")
        if not ready.is_set():
            raise RuntimeError(f"not ready within {args.time_limit}s")
        emit(event="ready")
        plan = await control.next(args.time_limit)
        if plan is None:
            raise RuntimeError("no plan on stdin")
        deadline = (plan["first_due_ms"] + plan["span_ms"]) / 1000 + args.grace
        timed_out = False
        waiter = asyncio.create_task(rec.all_in.wait())
        done, _ = await asyncio.wait(
            [task, waiter],
            timeout=max(0.0, deadline - time.time()),
            return_when=asyncio.FIRST_COMPLETED,
        )
        if task in done:
            task.result()
            raise RuntimeError("the consumer ended by itself")
        if waiter in done:
            await asyncio.sleep(args.settle)  # duplicates arriving late
        else:
            waiter.cancel()
            timed_out = True
        emit(
            event="result",
            timed_out=timed_out,
            versions=versions(args.contender),
            **rec.summary(),
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# -- release (raw mover, eventbus scheduler) ------------------------------------------


async def release_raw(url: str, tick: float, batch: int, stop: asyncio.Event) -> dict[str, Any]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    moved = calls = full = 0
    lag_max = 0.0
    try:
        mover = r.register_script(RAW_MOVER)
        await r.ping()
        emit(event="ready")
        t0 = time.monotonic()
        next_tick = t0
        while not stop.is_set():
            n = int(await mover(keys=[RAW_ZSET, RAW_STREAM], args=[batch]))
            moved += n
            calls += 1
            if n >= batch:
                full += 1
                continue  # more are due: no waiting for the next tick
            # A fixed schedule: the next tick is due at a multiple of `tick`, no drift.
            now = time.monotonic()
            lag_max = max(lag_max, now - next_tick)
            next_tick = t0 + (int((now - t0) / tick) + 1) * tick
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), next_tick - time.monotonic())
    finally:
        await r.aclose()
    return {"moved": moved, "calls": calls, "full_calls": full, "tick_lag_max": lag_max}


async def release_eventbus(url: str, stop: asyncio.Event) -> dict[str, Any]:
    from eventbus import EventBus

    if os.environ.get("W5_NO_LEASE") == "1":
        _without_scheduler_lease()
    bus = EventBus(url, prefix=PREFIX, **scheduler_kwarg(EventBus, True))
    async with bus:
        emit(event="ready")
        await stop.wait()
        stats = bus.delayed_statistics()
    return {"released": stats.released, "leader": getattr(stats, "scheduler_leader", None)}


def _without_scheduler_lease() -> None:
    """``W5_NO_LEASE=1``: the schedulers race as before the lease (an A/B of its
    effect on lateness, with the same code otherwise); a bench-only hook."""
    from eventbus._delayed import _feature, _lease

    class NoLease(_lease.SchedulerLease):
        def __init__(self, client: Any, key: str) -> None:
            super().__init__(client, key)
            self.enabled = False

    _feature.SchedulerLease = NoLease  # type: ignore[misc]


async def release_main(args: argparse.Namespace) -> None:
    control = Control()
    stop = asyncio.Event()

    async def watch() -> None:
        while await control.next(args.time_limit) is not None:
            pass
        stop.set()  # stdin closed (or the time limit)

    watcher = asyncio.create_task(watch())
    try:
        if args.contender == "raw":
            out = await release_raw(args.url, args.tick, args.batch, stop)
        else:
            out = await release_eventbus(args.url, stop)
        emit(event="result", versions=versions(args.contender), **out)
    finally:
        watcher.cancel()


# -- publish ---------------------------------------------------------------------------


async def publish_raw(url: str, items: list[tuple[int, int]]) -> list[float]:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    done: list[float] = []
    try:
        for i in range(0, len(items), 1000):
            pipe = r.pipeline(transaction=False)
            for n, due in items[i : i + 1000]:
                pipe.zadd(RAW_ZSET, {json.dumps({"n": n, "due_ms": due}): due})
            await pipe.execute()
            now = time.time()
            done.extend(now for _ in items[i : i + 1000])
    finally:
        await r.aclose()
    return done


async def in_chunks(
    items: list[tuple[int, int]], one: Callable[[int, int], Awaitable[Any]]
) -> list[float]:
    """``one(n, due)`` for every item, CHUNK of them concurrently; when each returned."""
    done: list[float] = [0.0] * len(items)

    async def call(i: int, n: int, due: int) -> None:
        await one(n, due)
        done[i] = time.time()

    for i in range(0, len(items), CHUNK):
        await asyncio.gather(
            *(call(j, n, due) for j, (n, due) in enumerate(items[i : i + CHUNK], start=i))
        )
    return done


async def publish_arq(url: str, items: list[tuple[int, int]]) -> list[float]:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url))

    async def one(n: int, due: int) -> None:
        # _defer_until: arq's score is exactly the due time (``_defer_by`` adds the
        # time between computing the delay and arq reading its clock).
        at = datetime.fromtimestamp(due / 1000, timezone.utc)
        job = await pool.enqueue_job("w5_job", n, due, _defer_until=at)
        if job is None:
            raise RuntimeError(f"arq refused job {n}")

    try:
        return await in_chunks(items, one)
    finally:
        await pool.aclose()


async def publish_bullmq(url: str, items: list[tuple[int, int]]) -> list[float]:
    from bullmq import Queue

    queue = Queue(QUEUE, {"connection": url})

    async def one(n: int, due: int) -> None:
        # Job() reads its own clock in the same synchronous step: delay + timestamp = due.
        delay = max(0, due - round(time.time() * 1000))
        await queue.add("w5", {"n": n, "due_ms": due}, {"delay": delay})

    try:
        return await in_chunks(items, one)
    finally:
        await queue.close()


@contextlib.asynccontextmanager
async def eventbus_publisher(url: str) -> AsyncIterator[Callable[[int, int], Awaitable[Any]]]:
    """``one(n, due)``: schedules an event on an open bus without a scheduler."""
    import inspect

    from eventbus import EventBus, Topic

    topic = Topic(TOPIC, durable=True)
    params = inspect.signature(EventBus.publish).parameters
    async with EventBus(url, prefix=PREFIX, **scheduler_kwarg(EventBus, False)) as bus:
        if "at" in params:

            async def one(n: int, due: int) -> None:
                at = datetime.fromtimestamp(due / 1000, timezone.utc)
                await bus.publish(topic, {"n": n, "due_ms": due}, at=at)  # type: ignore[call-arg]

        else:

            async def one(n: int, due: int) -> None:
                delay = timedelta(seconds=due / 1000 - time.time())
                await bus.publish(topic, {"n": n, "due_ms": due}, delay=delay)  # type: ignore[call-arg]

        yield one


async def publish_eventbus(url: str, items: list[tuple[int, int]]) -> list[float]:
    async with eventbus_publisher(url) as one:
        return await in_chunks(items, one)


PUBLISHERS = {
    "raw": publish_raw,
    "arq": publish_arq,
    "bullmq": publish_bullmq,
    "eventbus": publish_eventbus,
}


async def publish_main(args: argparse.Namespace) -> None:
    items = [(n, args.first_due_ms + (n * args.span_ms) // args.events) for n in range(args.events)]
    random.Random(args.seed).shuffle(items)
    began = time.time()
    done = await asyncio.wait_for(PUBLISHERS[args.contender](args.url, items), args.time_limit)
    late = sum(1 for (_, due), t in zip(items, done, strict=True) if t * 1000 > due)
    emit(
        event="result",
        scheduled=len(items),
        seconds=time.time() - began,
        last_done=max(done),
        first_due_ms=args.first_due_ms,
        scheduled_late=late,
        versions=versions(args.contender),
    )


# -- W5b backlog -------------------------------------------------------------------------


async def backlog_main(args: argparse.Namespace) -> None:
    began = time.time()
    n_all = args.events
    if args.contender == "raw":
        due = round(began * 1000) - 1000  # in the past: released as soon as a mover runs
        items = [(n, due) for n in range(n_all)]
        await asyncio.wait_for(publish_raw(args.url, items), args.time_limit)
        last_due = due
    else:
        # Each chunk is due 10 s after it is sent (a chunk takes about 2 s to schedule
        # on a loaded machine): scheduled, not published at once; all of them are due
        # by the time the last chunk is due.
        last_due = 0
        step = 20_000
        deadline = time.monotonic() + args.time_limit
        async with eventbus_publisher(args.url) as one:
            for i in range(0, n_all, step):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"scheduled only {i:,} of {n_all:,} in {args.time_limit}s")
                due = round(time.time() * 1000) + 10_000
                await in_chunks([(n, due) for n in range(i, min(n_all, i + step))], one)
                last_due = due
    scheduled_s = time.time() - began
    wait = last_due / 1000 - time.time() + 0.05
    if wait > 0:
        await asyncio.sleep(wait)
    emit(event="result", scheduled=n_all, seconds=scheduled_s, versions=versions(args.contender))


# -- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["consume", "release", "publish", "backlog"])
    parser.add_argument("--contender", required=True, choices=["raw", "arq", "bullmq", "eventbus"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--first-due-ms", type=int, default=0)
    parser.add_argument("--span-ms", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--grace", type=float, default=30.0, help="consume: after the last due")
    parser.add_argument("--settle", type=float, default=0.5, help="consume: after the last event")
    parser.add_argument("--poll-delay", type=float, help="arq Worker poll_delay")
    parser.add_argument("--concurrency", type=int, help="bullmq Worker concurrency")
    parser.add_argument("--tick", type=float, default=0.01, help="raw mover period")
    parser.add_argument("--batch", type=int, default=500, help="raw mover: members per call")
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()
    if not args.url.startswith(("redis://127.", "redis://localhost")):
        raise SystemExit(f"refusing {args.url}: the benchmark uses loopback only")
    return args


def main() -> None:
    args = parse_args()
    run = {
        "consume": consume_main,
        "release": release_main,
        "publish": publish_main,
        "backlog": backlog_main,
    }[args.role]
    try:
        asyncio.run(run(args))
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()
