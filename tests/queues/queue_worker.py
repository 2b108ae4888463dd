"""A work-queue worker process for the queue fault tests: ``python -m tests.queues.queue_worker``.

A real subprocess, so SIGKILL is real. It opens an ``EventBus`` with one
``@bus.worker`` on the queue ``--queue`` (jobs are ``{"n": <int>}``). The handler
appends a ``start`` line (with ``--log-starts``) to its own ``O_APPEND`` oracle
file, sleeps ``uniform(sleep_min, sleep_max)``, then appends a ``done`` line and
returns, after which the bus acks. So a ``done`` line means "handled", whether or
not the ack reached Redis; the oracle is outside the Redis under test, so it is
written even while Redis refuses writes (OOM) or restarts.

With ``--iterator`` it takes the jobs with ``bus.jobs(queue)`` instead, starting a
task per job that runs the same handler and acks the job (nacks it if it raised).

The job ``n == --poison`` SIGKILLs its own process as it starts (a job that kills
every worker that takes it).

The bus's ``eventbus`` log goes to stderr, one line per record, prefixed with its
``time.time()``: the tests count take attempts from it.

stdout carries one JSON object per line: ``{"event": "ready", ...}`` once the bus
is open, ``{"event": "exit", "stats": ...}`` after it closed (SIGTERM, or
``--max-seconds``, a bound so that a lost worker never outlives its test).
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import signal
import sys
import time
from typing import Any

import anyio
import anyio.abc
import attrs
import orjson

from eventbus import Delivery, EventBus, Job, JobSubscription, Queue, RetryPolicy

from ..streams.oracle import append_line, open_oracle


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.queues.queue_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--queue", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--oracle", required=True, help="this process's O_APPEND oracle file")
    p.add_argument("--concurrency", type=int, default=5)
    p.add_argument("--heartbeat", type=float, default=1.5)
    p.add_argument("--block", type=float, default=2.0)
    p.add_argument("--max-attempts", type=int, default=3)
    p.add_argument("--rate", default="", help="n/per: the queue's rate limit")
    p.add_argument("--sleep-min", type=float, default=0.0)
    p.add_argument("--sleep-max", type=float, default=0.0)
    p.add_argument("--poison", type=int, default=-1, help="the job n that SIGKILLs its worker")
    p.add_argument("--poison-after", type=float, default=0.0, help="seconds before it does")
    p.add_argument("--log-starts", action="store_true")
    p.add_argument(
        "--iterator",
        action="store_true",
        help="take jobs with bus.jobs() (a task per job, acked by it) instead of @bus.worker",
    )
    p.add_argument("--shutdown-grace", type=float, default=3.0)
    p.add_argument("--max-seconds", type=float, default=100.0)
    return p.parse_args(argv)


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


def queue_of(args: argparse.Namespace) -> Queue[Any]:
    if not args.rate:
        return Queue(args.queue)
    n, per = args.rate.split("/")
    return Queue(args.queue, rate=(int(n), float(per)))


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(created).3f %(levelname)s %(message)s"
    )
    pid = os.getpid()
    rng = random.Random(f"{args.name}:{pid}")
    fd = open_oracle(args.oracle)
    bus = EventBus(
        args.url,
        prefix=args.prefix,
        shutdown_grace=args.shutdown_grace,
        client_name=f"qw-{args.name}",
    )
    queue = queue_of(args)
    name = args.name

    options: dict[str, Any] = {
        "concurrency": args.concurrency,
        "max_attempts": args.max_attempts,
        "heartbeat": args.heartbeat,
        "block": args.block,
        "retry": RetryPolicy(max_attempts=args.max_attempts, backoff=0.05, jitter=0.0),
    }

    async def handle(job: dict[str, Any], d: Delivery) -> None:
        n = job["n"]
        if n == args.poison:
            append_line(fd, {"kind": "poison", "n": n, "attempt": d.attempt, "w": name})
            if args.poison_after > 0:
                await anyio.sleep(args.poison_after)  # while the other jobs taken run
            os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        if args.log_starts:
            append_line(fd, {"kind": "start", "n": n, "t": t0, "w": name})
        delay = rng.uniform(args.sleep_min, args.sleep_max)
        if delay > 0:
            await anyio.sleep(delay)
        append_line(
            fd, {"kind": "done", "n": n, "attempt": d.attempt, "t": t0, "w": name, "pid": pid}
        )

    subscription: JobSubscription[Any] | None = None  # the iterator form's, once open
    if not args.iterator:
        bus.worker(queue, **options)(handle)

    def stats() -> dict[str, Any]:
        try:
            if subscription is not None:
                return attrs.asdict(subscription.statistics())
            return attrs.asdict(bus.worker_statistics(handle)[0])
        except Exception as exc:  # report, never crash the worker on a stats call
            return {"error": repr(exc)}

    async def run_one(job: Job[Any]) -> None:
        try:
            await handle(job.value, job.delivery)
        except Exception as exc:
            await job.nack(error=exc)
        else:
            await job.ack()

    async def iterate(*, task_status: anyio.abc.TaskStatus[str]) -> None:
        nonlocal subscription
        async with bus.jobs(queue, **options) as jobs, anyio.create_task_group() as tg:
            subscription = jobs
            task_status.started(jobs.statistics().worker)
            async for job in jobs:  # a task per job: as many at once as the handler form
                tg.start_soon(run_one, job)

    stop = anyio.Event()
    reason = "max-seconds"

    async def watch_sigterm(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal reason
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                reason = "sigterm"
                stop.set()
                return

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch_sigterm)
            async with bus, anyio.create_task_group() as jobs_tg:
                if args.iterator:
                    worker_id = await jobs_tg.start(iterate)
                else:
                    worker_id = bus.worker_statistics(handle)[0].worker
                emit({"event": "ready", "t": time.time(), "pid": pid, "worker": worker_id})
                with anyio.move_on_after(args.max_seconds):
                    await stop.wait()
                jobs_tg.cancel_scope.cancel()  # the iterator's unsettled jobs are put back
            emit({"event": "exit", "t": time.time(), "reason": reason, "stats": stats()})
            tg.cancel_scope.cancel()
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, parse_args(), backend="asyncio"))
