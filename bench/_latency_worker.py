"""Worker processes of ``bench/latency.py``: a paced publisher and a consumer per contender.

Started by ``latency.py`` with the contender's interpreter (FastStream: its venv),
so the module level imports only the standard library. Both roles are bounded
in count and time and print ONE JSON line on stdout (the consumer also prints a
``ready`` line once it is subscribed / its group exists).

    python bench/_latency_worker.py publish --family F --mode M --url URL --events N --rate R
    python bench/_latency_worker.py consume --family F --mode M --url URL --events N

``--mode durable``: a Redis Stream and a consumer group; ``--mode live``: pub/sub.
Every event carries ``time.time_ns()`` taken just before the publish call; the
consumer's handler subtracts it from its own ``time.time_ns()`` (one machine, one
clock, comparable across processes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import _streams_common as common

TOPIC = "w4"
LIVE_TOPIC = "w4-live"

Send = Callable[[dict[str, Any]], Awaitable[Any]]
Record = Callable[[int], None]
"""The consumer's handler calls it with the event's ``t`` (ns)."""


def raw_name(mode: str) -> str:
    return common.stream_key(TOPIC) if mode == "durable" else common.live_channel(LIVE_TOPIC)


# -- publishers: yield a coroutine function sending one event -------------------------------


@contextlib.asynccontextmanager
async def eventbus_sender(url: str, mode: str) -> AsyncIterator[Send]:
    from eventbus import EventBus, Topic

    bus = EventBus(url, prefix=common.PREFIX)
    topic = Topic(TOPIC, durable=True) if mode == "durable" else Topic(LIVE_TOPIC)
    async with bus:
        yield lambda event: bus.publish(topic, event)


@contextlib.asynccontextmanager
async def raw_sender(url: str, mode: str) -> AsyncIterator[Send]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    name = raw_name(mode)
    try:
        if mode == "durable":
            yield lambda event: client.xadd(name, {"data": common.encode(event)})
        else:
            yield lambda event: client.publish(name, common.encode(event))
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def faststream_sender(url: str, mode: str) -> AsyncIterator[Send]:
    from faststream.redis import RedisBroker

    broker = RedisBroker(url, logger=None)
    name = common.faststream_name(raw_name(mode))
    async with broker:
        await broker.start()
        if mode == "durable":
            yield lambda event: broker.publish(event, stream=name)
        else:
            yield lambda event: broker.publish(event, channel=name)


SENDERS = {"eventbus": eventbus_sender, "raw": raw_sender, "faststream": faststream_sender}


async def publish(args: argparse.Namespace) -> dict[str, Any]:
    """``--events`` events at ``--rate``/s, each due at an absolute time (no drift)."""
    pad = "x" * max(0, args.size - 40)
    late: list[float] = []
    async with SENDERS[args.family](args.url, args.mode) as send:
        cpu = time.process_time()
        interval = 1.0 / args.rate
        start = time.perf_counter() + 0.05
        hard_stop = start + args.max_seconds
        for i in range(args.events):
            due = start + i * interval
            now = time.perf_counter()
            if now > hard_stop:
                break
            if due > now:
                await asyncio.sleep(due - now)
            late.append(time.perf_counter() - due)
            await send({"t": time.time_ns(), "i": i, "pad": pad})
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu
    late.sort()
    return {
        "sent": len(late),
        "seconds": seconds,
        "late_p50_ms": common.percentile(late, 50) * 1000,
        "late_p99_ms": common.percentile(late, 99) * 1000,
        "late_max_ms": late[-1] * 1000 if late else 0.0,
        "run_cpu_seconds": cpu,
    }


# -- consumers: register a handler calling ``record``, then ``ready()``, then wait ---------


async def eventbus_consumer(
    args: argparse.Namespace, record: Record, ready: Callable[[], None], finish: asyncio.Event
) -> None:
    from eventbus import EventBus, Topic

    bus = EventBus(args.url, prefix=common.PREFIX, shutdown_grace=2.0)
    if args.mode == "durable":
        on = bus.on(Topic(TOPIC, durable=True), group=common.GROUP, consumer=common.CONSUMER)
    else:
        on = bus.on(Topic(LIVE_TOPIC))

    @on
    async def handle(event: Any) -> None:
        record(event["t"])

    async with bus:
        ready()
        await finish.wait()


async def raw_consumer(
    args: argparse.Namespace, record: Record, ready: Callable[[], None], finish: asyncio.Event
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(args.url)
    name = raw_name(args.mode)

    # The loops stop by themselves once ``finish`` is set (short blocking reads):
    # cancelling a read blocked inside redis-py could hang the shutdown.
    async def read_group() -> None:
        streams = {name: ">"}
        while not finish.is_set():
            reply = await client.xreadgroup(
                common.GROUP, common.CONSUMER, streams, count=100, block=100
            )
            if not reply:
                continue
            # RESP2: [[key, entries]]; RESP3: {key: [entries]}
            entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
            for _entry_id, fields in entries:
                record(json.loads(fields[b"data"])["t"])
            await client.xack(name, common.GROUP, *(entry_id for entry_id, _ in entries))

    async def listen() -> None:
        while not finish.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if message is not None and message["type"] == "message":
                record(json.loads(message["data"])["t"])

    pubsub = client.pubsub()
    if args.mode == "durable":
        await client.xgroup_create(name, common.GROUP, id="$", mkstream=True)
        loop = read_group
    else:
        await pubsub.subscribe(name)
        for _ in range(100):  # the confirmation: subscribed before we say ready
            if (await pubsub.get_message(timeout=0.1) or {}).get("type") == "subscribe":
                break
        else:
            raise RuntimeError(f"no confirmation of SUBSCRIBE {name}")
        loop = listen
    ready()
    try:
        await loop()
    finally:
        await pubsub.aclose()
        await client.aclose()


async def faststream_consumer(
    args: argparse.Namespace, record: Record, ready: Callable[[], None], finish: asyncio.Event
) -> None:
    from faststream.redis import RedisBroker, StreamSub

    broker = RedisBroker(args.url, logger=None)
    name = common.faststream_name(raw_name(args.mode))
    if args.mode == "durable":
        source: dict[str, Any] = {
            "stream": StreamSub(name, group=common.GROUP, consumer=common.CONSUMER)
        }
    else:
        source = {"channel": name}

    @broker.subscriber(**source)
    async def handle(body: Any) -> None:
        record(body["t"])

    async with broker:
        await broker.start()
        ready()
        await finish.wait()


CONSUMERS = {"eventbus": eventbus_consumer, "raw": raw_consumer, "faststream": faststream_consumer}


async def consume(args: argparse.Namespace) -> None:
    """Collect one latency per event until all came, or the idle or time limit.

    Prints the result as soon as the run ended, before the library shuts down.
    """
    progress = common.Progress(args.events)
    latencies: list[int] = []
    now_ns = time.time_ns

    def record(t_ns: int) -> None:
        latencies.append(now_ns() - t_ns)
        progress.hit()

    stop = asyncio.Event()
    watcher: asyncio.Task[None] | None = None  # held: the loop keeps only weak references

    async def watch() -> None:
        cpu = time.process_time()
        how, _t_end, count = await progress.wait(
            time_limit=args.max_seconds, idle_limit=args.idle_limit
        )
        cpu = time.process_time() - cpu
        ms = sorted(x / 1e6 for x in latencies[args.warmup :])
        common.emit_result(
            args,
            {
                "ended": how,
                "received": count,
                "run_cpu_seconds": cpu,
                "measured": len(ms),
                "p50_ms": common.percentile(ms, 50),
                "p90_ms": common.percentile(ms, 90),
                "p99_ms": common.percentile(ms, 99),
                "max_ms": ms[-1] if ms else 0.0,
            },
        )
        stop.set()

    def ready() -> None:
        nonlocal watcher
        common.emit(event="ready")
        watcher = asyncio.create_task(watch())

    await CONSUMERS[args.family](args, record, ready, stop)


def main(argv: list[str]) -> None:
    role = argv[0] if argv else ""
    if role not in ("publish", "consume"):
        raise SystemExit(f"usage: {sys.argv[0]} publish|consume --help")
    parser = common.worker_parser(__doc__)
    parser.add_argument("--mode", choices=("durable", "live"), required=True)
    if role == "publish":
        parser.add_argument("--rate", type=float, required=True, help="events per second")
        common.worker_main(publish, parser.parse_args(argv[1:]))
    else:
        parser.add_argument("--warmup", type=int, default=0, help="first N not measured")
        parser.add_argument("--idle-limit", type=float, default=3.0)
        common.worker_main(consume, parser.parse_args(argv[1:]))


if __name__ == "__main__":
    main(sys.argv[1:])
