"""Worker processes of ``bench/queues.py`` (work queues, issue 12): producers and drainers.

Started by ``queues.py`` with the contender's own interpreter (arq, saq and bullmq in
their venvs), so the module level imports only the standard library (and
``_delayed_worker``'s standard-library helpers); each contender's library is imported
inside its own functions. Every loop is bounded in count and time; each worker
prints JSON lines on stdout:

    python bench/_queue_worker.py enqueue --contender NAME --url URL --jobs N --mode one|batch
        enqueues jobs 0..N-1, each ``{"n": n, "pad": "xx.."}`` (~--size bytes of JSON):
        ``one``: --tasks (64) asyncio tasks, each enqueueing one job per call, taking the
        next number from a shared counter; ``batch``: the contender's batch API, --batch
        (1,000) jobs per call, one call after the other (arq and saq have none: refused).
        Prints ``{"event": "result", "enqueued": k, "seconds": s, ...}``, the seconds
        from the first call to the last reply.
    python bench/_queue_worker.py drain --contender NAME --url URL --jobs N --index I
        imports and connects, prints ``{"event": "ready"}``, waits for one ``go`` line on
        stdin, then starts the contender's worker (--concurrency jobs at a time, 32) with
        a no-op handler that records each job's number; prints ``progress`` lines
        (jobs handled so far) every 50 ms; when its stdin closes it stops the worker and
        prints the result: when it got ``go``, the time of the last handler call, and
        how many times each job number was handled (base64 of one byte per job, clipped
        at 255), from which the orchestrator counts lost and duplicated jobs.

Keys (private redis-server, flushed between runs): raw ``q:jobs`` (list, ``LPUSH``ed
JSON) and one processing list per worker process ``q:processing:I``; arq its
``arq:queue``; saq queue ``q`` (``saq:q:*``); bullmq queue ``q`` (``bull:q:*``);
eventbus ``Queue("q", dict)`` with prefix ``bench``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _delayed_worker import Control, bullmq_connection, emit  # standard library only

PREFIX = "bench"
"""eventbus ``prefix`` of every benchmark bus."""
QUEUE = "q"
"""The queue's name for saq, bullmq and eventbus."""
RAW_QUEUE = "q:jobs"
RAW_PROCESSING = "q:processing:{}"
FUNCTION = "qjob"
"""The job function's name for arq and saq (bullmq: the job's name)."""
CONTENDERS = ("raw", "arq", "saq", "bullmq", "eventbus")
BATCH_API = {"raw": True, "arq": False, "saq": False, "bullmq": True, "eventbus": True}


def payloads(count: int, size: int) -> list[dict[str, Any]]:
    """Job ``n``: ``{"n": n, "pad": "xx.."}``, ~``size`` bytes once encoded as JSON."""
    out = []
    for n in range(count):
        bare = len(json.dumps({"n": n, "pad": ""}, separators=(",", ":")))
        out.append({"n": n, "pad": "x" * max(0, size - bare)})
    return out


def versions(contender: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "raw": ["redis", "hiredis"],
        "arq": ["arq", "redis", "hiredis"],
        "saq": ["saq", "redis", "hiredis"],
        "bullmq": ["bullmq", "redis", "hiredis"],
        "eventbus": ["eventbus", "redis", "hiredis", "anyio"],
    }[contender]
    found = {"python": sys.version.split()[0]}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


# -- enqueue ---------------------------------------------------------------------------

Enqueuer = Callable[[list[dict[str, Any]]], Awaitable[None]]
"""Enqueues the jobs of one call: one job (mode ``one``) or a batch (mode ``batch``)."""


async def run_calls(
    jobs: list[dict[str, Any]], call: Enqueuer, *, tasks: int, per_call: int, deadline: float
) -> tuple[int, float, float]:
    """``call`` over ``jobs`` in slices of ``per_call``, from ``tasks`` concurrent tasks.

    Each task takes the next slice when its previous call returned; all stop taking
    new slices at ``deadline`` (monotonic). Returns (jobs enqueued, first call, last reply)
    in ``time.perf_counter`` seconds.
    """
    slices = iter(range(0, len(jobs), per_call))
    done = 0
    t_first = time.perf_counter()

    async def loop() -> None:
        nonlocal done
        for i in slices:
            if time.monotonic() > deadline:
                return
            chunk = jobs[i : i + per_call]
            await call(chunk)
            done += len(chunk)

    await asyncio.gather(*(loop() for _ in range(tasks)))
    return done, t_first, time.perf_counter()


async def enqueue_main(args: argparse.Namespace) -> None:
    if args.mode == "batch" and not BATCH_API[args.contender]:
        raise RuntimeError(f"{args.contender} has no batch enqueue API")
    jobs = payloads(args.jobs, args.size)
    tasks, per_call = (args.tasks, 1) if args.mode == "one" else (1, args.batch)
    deadline = time.monotonic() + args.time_limit
    opener = ENQUEUERS[args.contender]
    async with opener(args.url, args.mode) as call:
        await call(WARMUP)  # opens the connection(s) and loads the scripts, before the clock
        done, t0, t1 = await run_calls(
            jobs, call, tasks=tasks, per_call=per_call, deadline=deadline
        )
    emit(
        event="result",
        enqueued=done,
        seconds=t1 - t0,
        complete=done == args.jobs,
        versions=versions(args.contender),
    )


WARMUP: list[dict[str, Any]] = []
"""The empty call each enqueuer gets first: it only opens its connection."""


@contextlib.asynccontextmanager
async def enqueue_raw(url: str, mode: str) -> Any:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)

    async def call(chunk: list[dict[str, Any]]) -> None:
        if not chunk:
            await r.ping()
        elif mode == "one":
            await r.lpush(RAW_QUEUE, json.dumps(chunk[0], separators=(",", ":")))
        else:
            pipe = r.pipeline(transaction=False)
            for job in chunk:
                pipe.lpush(RAW_QUEUE, json.dumps(job, separators=(",", ":")))
            await pipe.execute()

    try:
        yield call
    finally:
        await r.aclose()


@contextlib.asynccontextmanager
async def enqueue_arq(url: str, mode: str) -> Any:
    from arq import create_pool
    from arq.connections import RedisSettings

    pool = await create_pool(RedisSettings.from_dsn(url))

    async def call(chunk: list[dict[str, Any]]) -> None:
        if not chunk:
            await pool.ping()
            return
        job = chunk[0]
        if await pool.enqueue_job(FUNCTION, job["n"], job["pad"]) is None:
            raise RuntimeError(f"arq refused job {job['n']}")

    try:
        yield call
    finally:
        await pool.aclose()


@contextlib.asynccontextmanager
async def enqueue_saq(url: str, mode: str) -> Any:
    from saq import Queue

    queue = Queue.from_url(url, name=QUEUE)
    await queue.connect()

    async def call(chunk: list[dict[str, Any]]) -> None:
        if not chunk:
            await queue.count("queued")
            return
        job = chunk[0]
        if await queue.enqueue(FUNCTION, n=job["n"], pad=job["pad"]) is None:
            raise RuntimeError(f"saq refused job {job['n']}")

    try:
        yield call
    finally:
        await queue.disconnect()


@contextlib.asynccontextmanager
async def enqueue_bullmq(url: str, mode: str) -> Any:
    from bullmq import Queue

    queue = Queue(QUEUE, {"connection": url})

    async def call(chunk: list[dict[str, Any]]) -> None:
        if not chunk:
            await queue.getJobCounts("wait")
        elif mode == "one":
            await queue.add(QUEUE, chunk[0])
        else:
            await queue.addBulk([{"name": QUEUE, "data": job} for job in chunk])

    try:
        yield call
    finally:
        await queue.close()


@contextlib.asynccontextmanager
async def enqueue_eventbus(url: str, mode: str) -> Any:
    from eventbus import EventBus, Queue

    jobs = Queue(QUEUE, dict)
    async with EventBus(url, prefix=PREFIX) as bus:

        async def call(chunk: list[dict[str, Any]]) -> None:
            if not chunk:
                return  # the bus connected (and PINGed) when it was entered
            if mode == "one":
                await bus.enqueue(jobs, chunk[0])
            else:
                await bus.enqueue_many(jobs, chunk)

        yield call


ENQUEUERS: dict[str, Callable[[str, str], Any]] = {
    "raw": enqueue_raw,
    "arq": enqueue_arq,
    "saq": enqueue_saq,
    "bullmq": enqueue_bullmq,
    "eventbus": enqueue_eventbus,
}


# -- drain -----------------------------------------------------------------------------


class Record:
    """What the handler records: how many times each job number came, the last time."""

    def __init__(self, jobs: int) -> None:
        self.counts = bytearray(jobs)
        self.handled = 0
        self.unknown = 0
        self.t_first = 0.0
        self.t_last = 0.0

    def hit(self, n: int) -> None:
        now = time.time()
        if not self.handled:
            self.t_first = now
        self.handled += 1
        self.t_last = now
        if 0 <= n < len(self.counts):
            if self.counts[n] < 255:
                self.counts[n] += 1
        else:
            self.unknown += 1


Starter = Callable[[], Awaitable[None]]
"""Starts the contender's worker (returns once it runs)."""
Stopper = Callable[[], Awaitable[None]]


async def drain_raw(
    args: argparse.Namespace, rec: Record
) -> tuple[Starter, Stopper, Callable[[], Awaitable[None]]]:
    """``--concurrency`` tasks, each: BLMOVE q:jobs q:processing:I RIGHT LEFT, handle, LREM."""
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(args.url, max_connections=args.concurrency + 4)
    processing = RAW_PROCESSING.format(args.index)
    tasks: list[asyncio.Task[None]] = []
    # Open the connections the tasks block on before the clock: one per task.
    await asyncio.gather(*(r.ping() for _ in range(args.concurrency)))

    async def loop() -> None:
        while True:
            raw = await r.blmove(RAW_QUEUE, processing, 1, "RIGHT", "LEFT")
            if raw is None:
                continue
            rec.hit(json.loads(raw)["n"])  # the no-op handler
            await r.lrem(processing, 1, raw)

    async def start() -> None:
        tasks.extend(asyncio.create_task(loop()) for _ in range(args.concurrency))

    async def stop() -> None:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    return start, stop, r.aclose


async def drain_arq(
    args: argparse.Namespace, rec: Record
) -> tuple[Starter, Stopper, Callable[[], Awaitable[None]]]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    async def qjob(ctx: dict[str, Any], n: int, pad: str) -> None:
        rec.hit(n)

    pool = await create_pool(RedisSettings.from_dsn(args.url))
    worker = Worker(
        functions=[func(qjob, name=FUNCTION)],
        redis_pool=pool,
        handle_signals=False,  # the orchestrator steers it through stdin
        max_jobs=args.concurrency,
        **({} if args.poll_delay is None else {"poll_delay": args.poll_delay}),
    )
    task: list[asyncio.Task[None]] = []

    async def start() -> None:
        task.append(asyncio.create_task(worker.main()))

    async def stop() -> None:
        for t in task:
            t.cancel()
        await asyncio.gather(*task, return_exceptions=True)
        try:
            # close() cancels the jobs in flight, then gathers them: CancelledError
            # when any was (a drain stopped by its time limit).
            await worker.close()
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and getattr(me, "cancelling", lambda: 0)():
                raise  # this task itself is being cancelled

    return start, stop, pool.aclose


async def drain_saq(
    args: argparse.Namespace, rec: Record
) -> tuple[Starter, Stopper, Callable[[], Awaitable[None]]]:
    from saq import Queue, Worker

    async def qjob(ctx: Any, n: int, pad: str) -> None:
        rec.hit(n)

    queue = Queue.from_url(args.url, name=QUEUE)
    await queue.connect()
    await queue.count("queued")  # opens a connection
    worker = Worker(queue, functions=[(FUNCTION, qjob)], concurrency=args.concurrency)
    task: list[asyncio.Task[None]] = []

    async def start() -> None:
        task.append(asyncio.create_task(worker.start()))

    async def stop() -> None:
        await worker.stop()
        for t in task:
            t.cancel()
        await asyncio.gather(*task, return_exceptions=True)

    return start, stop, queue.disconnect


async def drain_bullmq(
    args: argparse.Namespace, rec: Record
) -> tuple[Starter, Stopper, Callable[[], Awaitable[None]]]:
    from bullmq import Worker

    async def process(job: Any, token: str) -> None:
        rec.hit(job.data["n"])

    holder: list[Any] = []
    errors: list[str] = []

    async def start() -> None:
        # Worker() starts its run loop at once: it is created on "go".
        opts = {"connection": bullmq_connection(args.url), "concurrency": args.concurrency}
        worker = Worker(QUEUE, process, opts)
        worker.on("error", lambda err, *_: errors.append(f"{type(err).__name__}: {err}"))
        holder.append(worker)

    async def stop() -> None:
        for worker in holder:
            await worker.close()
        for err in errors[-5:]:  # bullmq only emits them: on stderr for the record
            print(f"bullmq worker error: {err}", file=sys.stderr)

    async def close() -> None:
        return None

    return start, stop, close


async def drain_eventbus(
    args: argparse.Namespace, rec: Record
) -> tuple[Starter, Stopper, Callable[[], Awaitable[None]]]:
    from eventbus import EventBus, Queue

    jobs = Queue(QUEUE, dict)
    bus = EventBus(args.url, prefix=PREFIX)

    @bus.worker(jobs, concurrency=args.concurrency)
    async def handle(job: dict[str, Any]) -> None:
        rec.hit(job["n"])

    stack = contextlib.AsyncExitStack()

    async def start() -> None:
        await stack.enter_async_context(bus)  # connects and starts the worker

    async def stop() -> None:
        await stack.aclose()

    async def close() -> None:
        return None

    return start, stop, close


DRAINERS = {
    "raw": drain_raw,
    "arq": drain_arq,
    "saq": drain_saq,
    "bullmq": drain_bullmq,
    "eventbus": drain_eventbus,
}


async def drain_main(args: argparse.Namespace) -> None:
    control = Control()
    rec = Record(args.jobs)
    start, stop, close = await DRAINERS[args.contender](args, rec)
    try:
        emit(event="ready")
        go = await control.next(args.time_limit)
        if go is None or go.get("go") is None:
            raise RuntimeError("no go line on stdin")
        t_go = time.time()
        await start()
        t_started = time.time()
        stopped = asyncio.create_task(drain_control(control, args.time_limit))
        while not stopped.done():
            emit(event="progress", handled=rec.handled)
            await asyncio.wait({stopped}, timeout=0.05)
        t_stop = time.time()
        stop_error = ""
        try:
            # In this task, not wait_for's: a bus (anyio task group) must be left by
            # the task that entered it (asyncio.timeout: Python 3.11+).
            if hasattr(asyncio, "timeout"):
                async with asyncio.timeout(30):
                    await stop()
            else:
                await asyncio.wait_for(stop(), 30)
        except Exception as exc:  # the counts are worth reporting all the same
            stop_error = f"{type(exc).__name__}: {exc}"
        emit(
            event="result",
            index=args.index,
            handled=rec.handled,
            unknown=rec.unknown,
            t_go=t_go,
            t_started=t_started,
            t_first=rec.t_first,
            t_last=rec.t_last,
            t_stop=t_stop,
            stop_error=stop_error,
            counts=base64.b64encode(bytes(rec.counts)).decode(),
            versions=versions(args.contender),
        )
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(close(), 10)


async def drain_control(control: Control, time_limit: float) -> None:
    """Returns when stdin closes (the orchestrator says stop) or after ``time_limit``."""
    deadline = time.monotonic() + time_limit
    while (left := deadline - time.monotonic()) > 0:
        if await control.next(left) is None:
            return


# -- main ------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("role", choices=["enqueue", "drain"])
    parser.add_argument("--contender", required=True, choices=CONTENDERS)
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100, help="bytes of JSON per job")
    parser.add_argument("--mode", choices=["one", "batch"], default="one")
    parser.add_argument("--tasks", type=int, default=64, help="enqueue one: concurrent tasks")
    parser.add_argument("--batch", type=int, default=1000, help="enqueue batch: jobs per call")
    parser.add_argument("--concurrency", type=int, default=32, help="drain: jobs at a time")
    parser.add_argument("--index", type=int, default=0, help="drain: this worker's number")
    parser.add_argument("--poll-delay", type=float, help="drain: arq Worker poll_delay")
    parser.add_argument("--time-limit", type=float, default=120.0)
    args = parser.parse_args()
    if not args.url.startswith(("redis://127.", "redis://localhost")):
        raise SystemExit(f"refusing {args.url}: the benchmark uses loopback only")
    return args


def main() -> None:
    args = parse_args()
    run = enqueue_main if args.role == "enqueue" else drain_main
    try:
        asyncio.run(run(args))
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc())
        sys.exit(1)


if __name__ == "__main__":
    main()
