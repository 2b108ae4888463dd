"""A durable-topic consumer process for crash tests: ``python -m tests.streams.worker ...``.

Run as a real subprocess so SIGKILL, SIGSTOP and SIGTERM are real. It joins one
consumer group with the given knobs; its handler sleeps ``uniform(sleep_min,
sleep_max)`` (seeded), then appends one JSON line to its own ``O_APPEND`` oracle
file (one ``os.write``) and returns, after which the bus acks. So a line in the
oracle means "handled", whether or not the ack reached Redis.

stdout carries one JSON object per line, for the test to parse:

* ``{"event": "ready", ...}`` once ``async with bus`` returned (the group is read);
* ``{"event": "sigterm", "t", "stats"}`` when SIGTERM arrives (a counter snapshot);
* ``{"event": "exit", "t", "reason", "stats"}`` after the bus closed.

``stats`` is ``bus.consumer_statistics(handler)`` as a dict. SIGTERM leaves the bus
gracefully and exits 0; so does reaching ``--max-seconds`` (a bound, so a lost
worker never outlives its test).
"""

from __future__ import annotations

import argparse
import dataclasses
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

from eventbus import ClaimPolicy, Delivery, EventBus, RetryPolicy, Topic

from .oracle import append_line, open_oracle, payload_ok

DEFAULT_RETRY = RetryPolicy()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.streams.worker")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--consumer", required=True)
    p.add_argument("--oracle", required=True, help="this process's O_APPEND oracle file")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--claim-idle", type=float, default=2.0)
    p.add_argument("--claim-interval", type=float, default=0.5)
    p.add_argument("--claim-count", type=int, default=100)
    p.add_argument("--block", type=float, default=1.0)
    p.add_argument("--max-attempts", type=int, default=4)
    p.add_argument("--sleep-min", type=float, default=0.0)
    p.add_argument("--sleep-max", type=float, default=0.005)
    p.add_argument("--shutdown-grace", type=float, default=5.0)
    p.add_argument("--max-seconds", type=float, default=90.0)
    p.add_argument("--seed", default="0")
    p.add_argument(
        "--log-starts", action="store_true", help="also log a 'start' line when a handler begins"
    )
    p.add_argument("--fail-attempts", type=int, default=0, help="raise on attempts up to this")
    p.add_argument("--retry-backoff", type=float, default=None, help="RetryPolicy.backoff")
    return p.parse_args(argv)


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


def as_dict(stats: object) -> dict[str, Any]:
    if attrs.has(type(stats)):
        return attrs.asdict(stats)  # type: ignore[arg-type]
    if dataclasses.is_dataclass(stats) and not isinstance(stats, type):
        return dataclasses.asdict(stats)
    if hasattr(stats, "_asdict"):
        return dict(stats._asdict())
    return {k: getattr(stats, k) for k in dir(stats) if not k.startswith("_")}


async def main(args: argparse.Namespace) -> int:
    pid = os.getpid()
    rng = random.Random(f"{args.seed}:{args.consumer}:{pid}")
    fd = open_oracle(args.oracle)
    bus = EventBus(
        args.url,
        prefix=args.prefix,
        shutdown_grace=args.shutdown_grace,
        client_name=f"w-{args.consumer}",
    )
    topic = Topic(args.topic, durable=True)
    worker = args.consumer

    @bus.on(
        topic,
        group=args.group,
        consumer=args.consumer,
        concurrency=args.concurrency,
        max_attempts=args.max_attempts,
        claim_idle=args.claim_idle,
        claim=ClaimPolicy(
            idle=args.claim_idle, interval=args.claim_interval, count=args.claim_count
        ),
        batch=args.batch,
        block=args.block,
        retry=RetryPolicy(
            max_attempts=args.max_attempts,
            backoff=args.retry_backoff,
            backoff_max=max(args.retry_backoff, 30.0),
            jitter=0.0,
        )
        if args.retry_backoff is not None
        else DEFAULT_RETRY,
    )
    async def handle(event, d: Delivery) -> None:  # type: ignore[no-untyped-def]
        base = {
            "event_id": d.id,
            "stream_id": d.stream_id,
            "attempt": d.attempt,
            "worker": worker,
            "pid": pid,
        }
        if args.log_starts:
            append_line(fd, {"kind": "start", **base, "t": time.time()})
        if d.attempt <= args.fail_attempts:
            append_line(fd, {"kind": "fail", **base, "t": time.time()})
            raise RuntimeError(f"failing attempt {d.attempt} on purpose")
        delay = rng.uniform(args.sleep_min, args.sleep_max)
        if delay > 0:
            await anyio.sleep(delay)
        seq = event.get("seq") if isinstance(event, dict) else None
        append_line(
            fd, {"kind": "done", **base, "t": time.time(), "seq": seq, "ok": payload_ok(event)}
        )

    def stats() -> dict[str, Any]:
        try:
            (one,) = bus.consumer_statistics(handle)  # one group membership per process
            return as_dict(one)
        except Exception as exc:  # report, never crash the worker on a stats call
            return {"error": repr(exc)}

    stop = anyio.Event()
    reason = "max-seconds"

    async def watch_sigterm(*, task_status: anyio.abc.TaskStatus[None]) -> None:
        nonlocal reason
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                # Snapshot first: after this, the bus must issue no XREADGROUP.
                emit({"event": "sigterm", "t": time.time(), "pid": pid, "stats": stats()})
                reason = "sigterm"
                stop.set()
                return

    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch_sigterm)
            async with bus:
                emit({"event": "ready", "t": time.time(), "pid": pid, "consumer": worker})
                with anyio.move_on_after(args.max_seconds):
                    await stop.wait()
                emit({"event": "leaving", "t": time.time(), "reason": reason, "stats": stats()})
            emit({"event": "exit", "t": time.time(), "reason": reason, "stats": stats()})
            tg.cancel_scope.cancel()
    finally:
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(anyio.run(main, parse_args(), backend="asyncio"))
