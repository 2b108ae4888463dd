"""Worker processes of ``bench/fanout.py``: the publisher and one subscriber per contender.

Started by ``fanout.py`` with the contender's own interpreter (its venv), so the
module level imports only the standard library; each contender's library is
imported inside its own function. Every worker is bounded in count and time and
stops by itself; each prints its result as ONE JSON line on stdout.

    python bench/_fanout_worker.py publish --url URL --channel CH --messages N
    python bench/_fanout_worker.py subscribe --contender NAME --url URL --channel CH \\
        --messages N --subscribers S [--time-limit SECONDS]

Subscriber protocol: a ``{"event": "ready", ...}`` line once every subscriber is
set up, then a ``{"event": "result", ...}`` line once every subscriber has seen
every message, or the time limit, the idle limit or the start timeout is hit.

Every contender counts with the same few lines per delivery (its own counter,
then a comparison with 1 and with the target), inline where the user writes
the loop (raw redis-py, broadcaster) and in the handler where the library
calls it (eventbus, FastStream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

# -- shared bookkeeping ---------------------------------------------------------------


class Tally:
    """Per-subscriber delivery counters, shared by every contender.

    The handlers record when the first delivery of the run happened and when the
    last subscriber got its last message; a monitor polls the counters for the
    time and idle limits (and for nothing else: the exact end time comes from
    the handler that completed last).
    """

    def __init__(self, subscribers: int, messages: int) -> None:
        self.counts = [0] * subscribers
        self.target = messages
        self.remaining = subscribers
        self.t_first = 0.0
        self.t_done = 0.0
        self.probe: Callable[[], dict[str, Any]] = dict
        """Extra counters of the library, read by the monitor thread at the end."""

    def first(self) -> None:
        if not self.t_first:
            self.t_first = time.perf_counter()

    def finished(self) -> None:
        self.remaining -= 1
        if self.remaining == 0:
            self.t_done = time.perf_counter()

    def total(self) -> int:
        return sum(self.counts)


def watch(
    tally: Tally, *, time_limit: float, idle_limit: float, start_timeout: float
) -> tuple[str, float]:
    """Wait for the end of the run; return (how it ended, its end time).

    ``complete``: every subscriber saw every message. ``time-bounded``: the time
    limit (counted from the first delivery) ran out. ``idle``: nothing was
    delivered for ``idle_limit`` seconds (losses). ``no-messages``: nothing
    arrived within ``start_timeout`` seconds.

    Runs in a thread: a contender that keeps its event loop busy for seconds at
    a time (FastStream does) must not stretch the time limit.
    """
    started = time.perf_counter()
    last_total = -1
    last_change = started
    while True:
        time.sleep(0.02)
        now = time.perf_counter()
        if tally.t_done:
            return "complete", tally.t_done
        if not tally.t_first:
            if now - started > start_timeout:
                return "no-messages", now
            continue
        if now - tally.t_first >= time_limit:
            return "time-bounded", now
        total = tally.total()
        if total != last_total:
            last_total, last_change = total, now
        elif now - last_change >= idle_limit:
            return "idle", last_change


def proc_status_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in KiB.

    Not ``getrusage().ru_maxrss``: on Linux it survives ``exec`` and so reports the
    RSS of the forking parent (the orchestrator) when that was larger.
    """
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # not Linux: best effort


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


# -- the contenders' subscriber sides ---------------------------------------------------
#
# Each one sets up ``args.subscribers`` subscribers that count into ``tally``, calls
# ``ready(k)`` (k = how many server-side subscriptions of the channel it holds), then
# awaits ``finish()`` (the end of the run) and shuts down.

Ready = Callable[[int, dict[str, Any]], None]
Finish = Callable[[], Awaitable[None]]


async def run_eventbus(
    args: argparse.Namespace, tally: Tally, ready: Ready, finish: Finish
) -> None:
    from eventbus import EventBus, LivePolicy

    # ping_timeout > 0 overrides the keepalive's PONG deadline (see fanout.py --ping-timeout).
    live = LivePolicy(ping_timeout=args.ping_timeout) if args.ping_timeout > 0 else LivePolicy()
    telemetry = None
    if args.otel:
        from _otel import telemetry as make_telemetry  # bench/: run from its directory

        telemetry = make_telemetry(args.otel_kinds.split(",") if args.otel_kinds else None)
    bus = EventBus(
        args.url,
        prefix=args.prefix,
        live=live,
        protocol=args.protocol,
        shutdown_grace=2.0,
        telemetry=telemetry,
    )
    tally.probe = lambda: {"reconnects": bus.reconnects}
    counts = tally.counts
    target = tally.target

    def make(i: int) -> Callable[[object], Awaitable[None]]:
        async def handler(payload: object) -> None:
            n = counts[i] + 1
            counts[i] = n
            if n == 1:
                tally.first()
            if n == target:
                tally.finished()

        return handler

    for i in range(args.subscribers):
        bus.on(args.topic, buffer=args.buffer, overflow=args.overflow)(make(i))

    async with bus:  # returns once Redis confirmed the subscription
        ready(
            1,
            {
                "overflow": args.overflow,
                "buffer": args.buffer,
                "ping_timeout": live.ping_timeout,
                "ping_interval": live.ping_interval,
                "protocol": args.protocol,
            },
        )
        await finish()
        # Leaving the block lets handlers drain their buffers; a drop run ended
        # by the time or idle limit has nothing worth waiting for.


async def run_raw(args: argparse.Namespace, tally: Tally, ready: Ready, finish: Finish) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(args.url)
    pubsub = client.pubsub()
    await pubsub.subscribe(args.channel)
    while True:  # the confirmation, so the subscription is live before we say ready
        msg = await pubsub.get_message(timeout=5.0)
        if msg is not None and msg["type"] == "subscribe":
            break

    queues: list[asyncio.Queue[bytes]] = [asyncio.Queue() for _ in range(args.subscribers)]
    counts = tally.counts
    target = tally.target

    async def read() -> None:
        async for message in pubsub.listen():
            if message["type"] == "message":
                data = message["data"]
                for q in queues:
                    q.put_nowait(data)

    async def consume(i: int, q: asyncio.Queue[bytes]) -> None:
        get = q.get
        while True:
            await get()
            n = counts[i] + 1
            counts[i] = n
            if n == 1:
                tally.first()
            if n == target:
                tally.finished()

    tasks = [asyncio.create_task(read())]
    tasks += [asyncio.create_task(consume(i, q)) for i, q in enumerate(queues)]
    ready(1, {"queue": "unbounded asyncio.Queue"})
    try:
        await finish()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pubsub.aclose()
        await client.aclose()


async def run_broadcaster(
    args: argparse.Namespace, tally: Tally, ready: Ready, finish: Finish
) -> None:
    from broadcaster import Broadcast

    counts = tally.counts
    target = tally.target
    entered = 0
    all_entered = asyncio.Event()

    async def subscriber(i: int, broadcast: Broadcast) -> None:
        nonlocal entered
        async with broadcast.subscribe(channel=args.channel) as sub:
            entered += 1
            if entered == args.subscribers:
                all_entered.set()
            async for _event in sub:  # type: ignore[attr-defined]
                n = counts[i] + 1
                counts[i] = n
                if n == 1:
                    tally.first()
                if n == target:
                    tally.finished()

    async with Broadcast(args.url) as broadcast:
        tasks = [asyncio.create_task(subscriber(i, broadcast)) for i in range(args.subscribers)]
        await asyncio.wait_for(all_entered.wait(), 30)
        ready(1, {"queue": "unbounded asyncio.Queue (backend + per subscriber)"})
        try:
            await finish()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def run_faststream(
    args: argparse.Namespace, tally: Tally, ready: Ready, finish: Finish
) -> None:
    from faststream.redis import RedisBroker

    # logger=None: no "Received"/"Processed" log line per message, which would
    # otherwise dominate its cost (the other contenders log nothing either).
    broker = RedisBroker(args.url, logger=None)
    counts = tally.counts
    target = tally.target
    # FastStream reads "{name}" as a path parameter (a PSUBSCRIBE pattern); "{{" is
    # its escape for a literal brace, so this SUBSCRIBEs the very same channel.
    declared = args.channel.replace("{", "{{").replace("}", "}}")

    def make(i: int) -> Callable[[Any], Awaitable[None]]:
        async def handler(body: Any) -> None:
            n = counts[i] + 1
            counts[i] = n
            if n == 1:
                tally.first()
            if n == target:
                tally.finished()

        return handler

    for i in range(args.subscribers):
        broker.subscriber(declared)(make(i))

    async with broker:
        await broker.start()
        ready(args.subscribers, {"subscriber": "@broker.subscriber, one pub/sub connection each"})
        await finish()


CONTENDERS: dict[str, Callable[..., Awaitable[None]]] = {
    "eventbus": run_eventbus,
    "raw": run_raw,
    "broadcaster": run_broadcaster,
    "faststream": run_faststream,
}


def library_versions(contender: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "eventbus": ["eventbus", "redis", "hiredis", "anyio"],
        "raw": ["redis", "hiredis"],
        "broadcaster": ["broadcaster", "redis", "hiredis"],
        "faststream": ["faststream", "redis", "hiredis"],
    }[contender]
    found: dict[str, str] = {}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


async def subscribe_main(args: argparse.Namespace) -> None:
    tally = Tally(args.subscribers, args.messages)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reported = threading.Event()

    def monitor() -> None:
        how, t_end = watch(
            tally,
            time_limit=args.time_limit,
            idle_limit=args.idle_limit,
            start_timeout=args.start_timeout,
        )
        counts = list(tally.counts)  # a snapshot: a drop/time-bounded run is still running
        emit(
            event="result",
            ended=how,
            deliveries=sum(counts),
            expected=args.messages * args.subscribers,
            min_per_subscriber=min(counts),
            max_per_subscriber=max(counts),
            seconds=(t_end - tally.t_first) if tally.t_first else 0.0,
            peak_rss_kib=proc_status_kib("VmHWM"),
            **tally.probe(),
        )
        reported.set()
        loop.call_soon_threadsafe(stop.set)

    def ready(channel_subscriptions: int, info: dict[str, Any]) -> None:
        emit(
            event="ready",
            pid=os.getpid(),
            channel_subscriptions=channel_subscriptions,
            rss_ready_kib=proc_status_kib("VmRSS"),
            versions=library_versions(args.contender),
            python=sys.version.split()[0],
            **info,
        )
        threading.Thread(target=monitor, name="monitor", daemon=True).start()

    async def finish() -> None:
        await stop.wait()

    try:
        # The orchestrator kills us if the library's own shutdown takes too long:
        # the result is printed by then.
        await CONTENDERS[args.contender](args, tally, ready, finish)
    except Exception as exc:
        if reported.is_set():
            return  # failed while shutting down, after the result: not our concern here
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        raise


# -- the publisher -----------------------------------------------------------------------


def envelope_payloads(messages: int, size: int) -> list[bytes]:
    """eventbus envelopes (wire format v1), one publisher, seq 1..N, ~``size``-byte data."""
    import uuid

    publisher = uuid.uuid4().hex[:16]
    now_ms = time.time_ns() // 1_000_000
    out = []
    for seq in range(1, messages + 1):
        doc = {
            "eventbus": 1,
            "id": uuid.uuid4().hex,
            "pub": publisher,
            "seq": seq,
            "ts": now_ms,
            "ct": "application/json",
            "data": {"i": seq},
        }
        raw = json.dumps(doc, separators=(",", ":"))
        doc["data"] = {"i": seq, "pad": "x" * max(0, size - len(raw) - 9)}
        out.append(json.dumps(doc, separators=(",", ":")).encode())
    return out


def plain_payloads(messages: int, size: int) -> list[bytes]:
    """~``size``-byte JSON objects (a bare payload for eventbus; plain data for the rest)."""
    out = []
    for i in range(messages):
        head = json.dumps({"i": i, "pad": ""}, separators=(",", ":"))
        pad = "x" * max(0, size - len(head))
        out.append(json.dumps({"i": i, "pad": pad}, separators=(",", ":")).encode())
    return out


def resp_publish(channel: bytes, payload: bytes) -> bytes:
    """One ``PUBLISH channel payload`` in RESP, as any client sends it."""
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


def publish_main(args: argparse.Namespace) -> None:
    """Pipelined PUBLISH as fast as the server takes it.

    The commands are encoded before the clock starts and written in batches of
    ``--batch``, each batch's replies read before the next is sent (bounded in
    flight). A plain socket rather than a redis-py pipeline: packing 50,000
    commands in Python took longer than delivering them to 10 subscribers, which
    made the publisher, not the subscriber, the bottleneck.
    """
    parts = urlsplit(args.url)
    if parts.hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"refusing to publish to {parts.hostname}: loopback only")
    make = envelope_payloads if args.envelope else plain_payloads
    payloads = make(args.messages, args.size)
    channel = args.channel.encode()
    batches = [
        b"".join(resp_publish(channel, p) for p in payloads[i : i + args.batch])
        for i in range(0, len(payloads), args.batch)
    ]
    receivers: int | None = None
    sent = 0
    with socket.create_connection(("127.0.0.1", parts.port or 6379), timeout=30) as sock:
        started = time.perf_counter()
        deadline = started + args.time_limit
        for i, batch in enumerate(batches):
            if time.perf_counter() > deadline:
                break
            sock.sendall(batch)
            want = min(args.batch, len(payloads) - i * args.batch)
            replies = bytearray()
            while replies.count(b"\n") < want:  # each reply is ":<receivers>\r\n"
                chunk = sock.recv(65536)
                if not chunk:
                    raise SystemExit("redis-server closed the connection")
                replies += chunk
            if not replies.startswith(b":"):
                raise SystemExit(f"PUBLISH failed: {bytes(replies[:200])!r}")
            if receivers is None:
                receivers = int(replies[1 : replies.index(b"\r")])
            sent += want
        seconds = time.perf_counter() - started
    emit(
        event="published",
        published=sent,
        seconds=seconds,
        bytes_per_message=round(sum(map(len, payloads)) / max(1, len(payloads))),
        receivers_first=receivers,
    )


# -- command line --------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    roles = parser.add_subparsers(dest="role", required=True)

    pub = roles.add_parser("publish")
    pub.add_argument("--url", required=True)
    pub.add_argument("--channel", required=True)
    pub.add_argument("--messages", type=int, required=True)
    pub.add_argument("--size", type=int, default=100)
    pub.add_argument("--batch", type=int, default=1000)
    pub.add_argument("--envelope", action="store_true")
    pub.add_argument("--time-limit", type=float, default=60.0)

    sub = roles.add_parser("subscribe")
    sub.add_argument("--contender", choices=sorted(CONTENDERS), required=True)
    sub.add_argument("--url", required=True)
    sub.add_argument("--channel", required=True)
    sub.add_argument("--prefix", default="bench")
    sub.add_argument("--topic", default="fan")
    sub.add_argument("--messages", type=int, required=True)
    sub.add_argument("--subscribers", type=int, required=True)
    sub.add_argument("--buffer", type=int, default=1024)
    sub.add_argument("--overflow", default="block")
    sub.add_argument("--ping-timeout", type=float, default=0.0)
    sub.add_argument("--protocol", type=int, default=3, help="eventbus: RESP version")
    sub.add_argument("--otel", action="store_true", help="eventbus: with eventbus.otel")
    sub.add_argument("--otel-kinds", default="", help="eventbus.otel process_kinds (a,b)")
    sub.add_argument("--time-limit", type=float, default=90.0)
    sub.add_argument("--idle-limit", type=float, default=2.0)
    sub.add_argument("--start-timeout", type=float, default=30.0)
    return parser.parse_args(argv)


def main() -> None:
    args = parse(sys.argv[1:])
    if args.role == "publish":
        publish_main(args)
    else:
        asyncio.run(subscribe_main(args))


if __name__ == "__main__":
    main()
