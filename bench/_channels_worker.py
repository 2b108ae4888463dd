"""Worker processes of ``bench/channels.py`` (W7): the publisher and one subscriber per contender.

Started by ``channels.py`` with the contender's own interpreter (its venv), so the
module level imports only the standard library; each contender's library is
imported inside its own class. Every loop is bounded in count and time; each
worker prints its results as JSON lines on stdout (``{"event": ...}``).

    python bench/_channels_worker.py subscribe --contender NAME --url URL --channels N ...
    python bench/_channels_worker.py publish --url URL --mode burst|churn ...

Channels: ``bench:{u<i>}`` (the held channels, i < N), ``bench:{p<i>}`` (the single
subscribes timed during the burst) and ``bench:{c<i>}`` (the churn channels, each
joined once and left once). ``bench:{x}`` is eventbus's channel of the live topic
``x`` (prefix ``bench``), so raw redis-py and broadcaster subscribe the very same
channel names. A message is ``{"c": "<topic>", "s": <seq>}``.

The subscriber runs these phases, one after another, in one process:

1. ``baseline``: the client is open, nothing subscribed: ``VmRSS`` after ``gc.collect()``;
2. ``burst``: N subscribes entered at once (eventbus and broadcaster: one task per
   channel, each entering its own subscription; raw: ``SUBSCRIBE`` in batches of
   ``--raw-batch`` channels), timed until the library reported every one confirmed
   AND ``CLIENT LIST`` shows the N subscriptions at the server; meanwhile single
   subscribes on ``p<i>`` channels, one after another, each timed (latency);
3. ``idle``: ``VmRSS`` (after ``gc.collect()``) minus the baseline, per subscription;
4. ``deliveries``: the publisher process sends ``--messages`` to random held channels
   as fast as it can; deliveries/s from the first delivery to the last;
6. ``resubscribe``: ``CLIENT KILL TYPE pubsub``; time until ``CLIENT LIST`` shows every
   subscription again (the sum of ``sub=`` of the pub/sub clients: ``PUBSUB NUMSUB``
   over every channel, in one command);
5. ``churn``: ``--churn-live`` churn channels joined, then every 10 ms 10 joins (fresh
   channels) and 10 leaves (the oldest) for ``--churn-seconds`` while the publisher
   sends ``--churn-rate`` messages/s to the channels live at that moment (and some
   around them). Then everything is left and the server checked for leftovers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PREFIX = "bench"


def channel(topic: str) -> str:
    return f"{PREFIX}:{{{topic}}}"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def settled_rss_kib() -> int:
    gc.collect()
    return rss_kib()


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def payload_of(data: Any) -> dict[str, Any]:
    if isinstance(data, dict):
        return data
    return json.loads(data)  # type: ignore[no-any-return]


# -- the publisher --------------------------------------------------------------------


def resp(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    out.extend(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    return b"".join(out)


class Wire:
    """PUBLISH commands over a plain socket, in pipelined batches; returns the replies."""

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        self.sock = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def publish_batch(self, batch: list[tuple[str, bytes]]) -> list[int]:
        self.sock.sendall(b"".join(resp(b"PUBLISH", channel(t).encode(), m) for t, m in batch))
        replies: list[int] = []
        while len(replies) < len(batch):
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis-server closed the publisher's connection")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            if not line.startswith(b":"):
                raise RuntimeError(f"unexpected reply {line!r}")
            replies.append(int(line[1:]))
        return replies


def publish_main(args: argparse.Namespace) -> None:
    wire = Wire(args.url)
    rng = random.Random(args.seed)
    began = time.monotonic()
    if args.mode == "burst":
        sent = 0
        while sent < args.messages and time.monotonic() - began < args.time_limit:
            n = min(1000, args.messages - sent)
            batch = []
            for s in range(sent, sent + n):
                t = f"u{rng.randrange(args.channels)}"
                batch.append((t, json.dumps({"c": t, "s": s}).encode()))
            wire.publish_batch(batch)
            sent += n
        emit(event="published", published=sent, seconds=time.monotonic() - began)
        return
    # churn: channel c<k> is live from about t0 + (k - live) / rate_join to t0 + k / rate_join
    t0 = args.t0
    while time.monotonic() < t0:
        time.sleep(0.001)
    records: list[tuple[str, int, float, float, int]] = []
    seq = 0
    tick = 0.01
    per_tick = max(1, round(args.rate * tick))
    end = t0 + args.seconds
    while True:
        now = time.monotonic()
        if now >= end or now - began > args.time_limit:
            break
        k = (now - t0) * args.join_rate  # channels that joined since t0 (c<live + k>)
        lo = max(0, int(k) - args.margin)  # about the oldest live channel, minus a margin
        hi = int(args.live + k) + args.margin
        batch = []
        for _ in range(per_tick):
            t = f"c{rng.randrange(lo, hi)}"
            batch.append((t, json.dumps({"c": t, "s": seq}).encode()))
            seq += 1
        t_write = time.monotonic()
        replies = wire.publish_batch(batch)
        t_reply = time.monotonic()
        for (t, m), r in zip(batch, replies, strict=True):
            records.append((t, json.loads(m)["s"], t_write, t_reply, r))
        # A fixed schedule: the next tick is due at a multiple of `tick`, no drift.
        due = t0 + (int((time.monotonic() - t0) / tick) + 1) * tick
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    with open(args.out, "w") as f:
        json.dump(records, f)
    emit(event="published", published=len(records), seconds=time.monotonic() - t0)


# -- the contenders -------------------------------------------------------------------
#
# Each one routes a received message to `on_message(topic_subscribed, data)`; `join`
# returns once the subscription is confirmed (as far as the library says), `leave`
# once the library let go of it.

OnMessage = Callable[[str, Any], None]


class EventbusSubs:
    """``async with bus.subscribe(topic) as sub: async for e in sub`` per channel, one bus."""

    def __init__(self, url: str, on_message: OnMessage) -> None:
        from eventbus import EventBus

        self.bus = EventBus(url, prefix=PREFIX, shutdown_grace=2.0)
        self.on_message = on_message
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.bus.__aenter__()

    async def stop(self) -> None:
        await self.bus.__aexit__(None, None, None)

    async def _hold(self, topic: str, confirmed: asyncio.Future[None]) -> None:
        try:
            async with self.bus.subscribe(topic) as sub:
                confirmed.set_result(None)
                on_message = self.on_message
                async for event in sub:
                    on_message(topic, event)
        except BaseException as exc:
            if not confirmed.done():
                confirmed.set_exception(exc)
            raise

    async def join(self, topics: list[str]) -> None:
        futs = []
        for topic in topics:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.tasks[topic] = asyncio.create_task(self._hold(topic, fut))
            futs.append(fut)
        await asyncio.gather(*futs)

    async def leave(self, topics: list[str]) -> None:
        tasks = [self.tasks.pop(t) for t in topics]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class RawSubs:
    """One redis-py ``PubSub``; SUBSCRIBE/UNSUBSCRIBE in batches; a dict routes messages."""

    def __init__(self, url: str, on_message: OnMessage, batch: int) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis.from_url(url)
        self.pubsub = self.client.pubsub()
        self.on_message = on_message
        self.batch = batch
        self.routes: dict[bytes, str] = {}
        self.pending: dict[bytes, asyncio.Future[None]] = {}
        self.reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A first channel so that the reader has a connection to read from.
        await self.pubsub.subscribe(channel("_"))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        import redis

        while True:
            try:
                msg = await self.pubsub.get_message(timeout=1.0)
            except redis.ConnectionError:
                # The next get_message reconnects, and PubSub.on_connect resubscribes
                # every channel it holds (one SUBSCRIBE with all of them).
                await asyncio.sleep(0.01)
                continue
            if msg is None:
                continue
            kind = msg["type"]
            if kind == "message":
                topic = self.routes.get(msg["channel"])
                if topic is not None:  # a late message of a channel just left: dropped
                    self.on_message(topic, msg["data"])
            elif kind == "subscribe":
                fut = self.pending.pop(msg["channel"], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def stop(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
        await self.pubsub.aclose()
        await self.client.aclose()

    async def join(self, topics: list[str]) -> None:
        loop = asyncio.get_running_loop()
        futs = []
        for i in range(0, len(topics), self.batch):
            names = [channel(t).encode() for t in topics[i : i + self.batch]]
            for t, name in zip(topics[i : i + self.batch], names, strict=True):
                fut: asyncio.Future[None] = loop.create_future()
                self.pending[name] = fut
                self.routes[name] = t
                futs.append(fut)
            await self.pubsub.subscribe(*names)
        await asyncio.gather(*futs)

    async def leave(self, topics: list[str]) -> None:
        names = [channel(t).encode() for t in topics]
        for name in names:
            self.routes.pop(name, None)
        for i in range(0, len(names), self.batch):
            await self.pubsub.unsubscribe(*names[i : i + self.batch])


class BroadcasterSubs:
    """broadcaster 0.3.1: ``async with broadcast.subscribe(channel=...)`` per channel."""

    def __init__(self, url: str, on_message: OnMessage) -> None:
        from broadcaster import Broadcast

        self.broadcast = Broadcast(url)
        self.on_message = on_message
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.broadcast.connect()

    async def stop(self) -> None:
        await self.broadcast.disconnect()

    async def _hold(self, topic: str, entered: asyncio.Future[None]) -> None:
        try:
            async with self.broadcast.subscribe(channel=channel(topic)) as sub:
                entered.set_result(None)
                on_message = self.on_message
                async for event in sub:  # type: ignore[attr-defined]
                    on_message(topic, event.message)
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            raise

    async def join(self, topics: list[str]) -> None:
        futs = []
        for topic in topics:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.tasks[topic] = asyncio.create_task(self._hold(topic, fut))
            futs.append(fut)
        await asyncio.gather(*futs)

    async def leave(self, topics: list[str]) -> None:
        tasks = [self.tasks.pop(t) for t in topics]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# -- server-side view -----------------------------------------------------------------


class Admin:
    """A plain socket to redis-server for CLIENT LIST / CLIENT KILL / PUBSUB (no library)."""

    def __init__(self, url: str) -> None:
        self.wire = Wire(url)

    def command(self, *parts: str) -> bytes:
        w = self.wire
        w.sock.sendall(resp(*(p.encode() for p in parts)))
        while b"\r\n" not in w.buf:
            w.buf += w.sock.recv(65536)
        head, rest = w.buf.split(b"\r\n", 1)
        if head[:1] == b"$":
            n = int(head[1:])
            while len(rest) < n + 2:
                rest += w.sock.recv(max(65536, n + 2 - len(rest)))
            w.buf = rest[n + 2 :]
            return rest[:n]
        if head[:1] == b"*":  # PUBSUB CHANNELS: an array of bulk strings
            w.buf = rest
            count = int(head[1:])
            items = [self._bulk() for _ in range(count)]
            return b"\n".join(items)
        w.buf = rest
        return head

    def _bulk(self) -> bytes:
        w = self.wire
        while b"\r\n" not in w.buf:
            w.buf += w.sock.recv(65536)
        head, rest = w.buf.split(b"\r\n", 1)
        n = int(head[1:])
        while len(rest) < n + 2:
            rest += w.sock.recv(65536)
        w.buf = rest[n + 2 :]
        return rest[:n]

    def subscriptions(self) -> int:
        """Channels subscribed by all the pub/sub clients (sum of CLIENT LIST ``sub=``)."""
        total = 0
        for line in self.command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines():
            for field in line.split():
                if field.startswith("sub="):
                    total += int(field[4:])
        return total

    def pubsub_clients(self) -> int:
        return len(self.command("CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines())

    def channels(self, pattern: str) -> int:
        out = self.command("PUBSUB", "CHANNELS", pattern)
        return len(out.splitlines()) if out and not out.startswith(b"*0") else 0


async def wait_subscriptions(admin: Admin, want: int, timeout: float) -> float | None:
    """Seconds until the server shows ``want`` subscriptions (polled), None on timeout."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if await asyncio.to_thread(admin.subscriptions) >= want:
            return time.monotonic() - began
        await asyncio.sleep(0.005)
    return None


# -- the subscriber ---------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.on = False
        self.deliveries = 0
        self.t_first = 0.0
        self.t_last = 0.0
        self.misrouted = 0
        self.received: dict[str, list[int]] = {}
        self.max_seq = -1
        """The highest sequence number received: the push connection's reader passed it."""
        self.recv_times: dict[int, float] = {}

    def __call__(self, topic: str, data: Any) -> None:
        if not self.on:
            return
        now = time.monotonic()
        if not self.t_first:
            self.t_first = now
        self.t_last = now
        self.deliveries += 1
        p = payload_of(data)
        if p["c"] != topic:
            self.misrouted += 1
        s = p["s"]
        self.received.setdefault(topic, []).append(s)
        if s > self.max_seq:
            self.max_seq = s
        self.recv_times[s] = now


def make_subs(args: argparse.Namespace, rec: Recorder) -> Any:
    if args.contender == "eventbus":
        return EventbusSubs(args.url, rec)
    if args.contender == "raw":
        return RawSubs(args.url, rec, args.raw_batch)
    if args.contender == "broadcaster":
        return BroadcasterSubs(args.url, rec)
    raise SystemExit(f"unknown contender {args.contender}")


def publisher(args: argparse.Namespace, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [args.pub_python, os.path.abspath(__file__), "publish", "--url", args.url, *extra],
        stdout=subprocess.PIPE,
        text=True,
    )


async def wait_process(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    try:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
        return {"error": "publisher timed out"}
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    return lines[-1] if lines else {"error": f"publisher exited {proc.returncode}"}


async def phase_burst(args: argparse.Namespace, subs: Any, admin: Admin, base: int) -> list[str]:
    topics = [f"u{i}" for i in range(args.channels)]
    probe_latencies: list[float] = []
    probes: list[str] = []
    burst_done = asyncio.Event()

    async def probe() -> None:
        await asyncio.sleep(0)  # let the burst's subscribes go first
        i = 0
        while not burst_done.is_set() and i < args.max_probes:
            t = f"p{i}"
            began = time.monotonic()
            await subs.join([t])
            probe_latencies.append(time.monotonic() - began)
            probes.append(t)
            i += 1

    began = time.monotonic()
    probe_task = asyncio.create_task(probe())
    await asyncio.wait_for(subs.join(topics), args.phase_timeout)
    t_api = time.monotonic() - began
    server = await wait_subscriptions(admin, base + args.channels, args.phase_timeout)
    t_all = time.monotonic() - began
    burst_done.set()
    await asyncio.wait_for(probe_task, args.phase_timeout)
    lat = sorted(probe_latencies)

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    emit(
        event="burst",
        seconds_api=t_api,
        seconds=t_all if server is not None else None,
        probes=len(lat),
        probe_p50=pct(0.5),
        probe_p99=pct(0.99),
    )
    return probes


async def subscribe_main(args: argparse.Namespace) -> None:
    rec = Recorder()
    admin = Admin(args.url)
    subs = make_subs(args, rec)
    await subs.start()
    base = await asyncio.to_thread(admin.subscriptions)  # raw's placeholder channel
    baseline = settled_rss_kib()
    objects_baseline = len(gc.get_objects())
    emit(event="ready", base=base, rss_kib=baseline)
    try:
        probes = await phase_burst(args, subs, admin, base)
        held = args.channels + len(probes)
        idle = settled_rss_kib()
        objects_idle = len(gc.get_objects())
        emit(
            event="idle",
            rss_baseline_kib=baseline,
            rss_idle_kib=idle,
            subscriptions=held,
            bytes_per_subscription=(idle - baseline) * 1024 / held,
            gc_objects_per_subscription=(objects_idle - objects_baseline) / held,
            pubsub_clients=await asyncio.to_thread(admin.pubsub_clients),
        )

        # deliveries/s across the held channels
        rec.on = True
        proc = publisher(
            args, "--mode", "burst", "--channels", str(args.channels),
            "--messages", str(args.messages), "--time-limit", str(args.phase_timeout),
        )  # fmt: skip
        published = await wait_process(proc, args.phase_timeout + 30)
        deadline = time.monotonic() + args.phase_timeout
        last, last_change = -1, time.monotonic()
        while rec.deliveries < args.messages and time.monotonic() < deadline:
            if rec.deliveries != last:
                last, last_change = rec.deliveries, time.monotonic()
            elif time.monotonic() - last_change > args.idle_limit:
                break
            await asyncio.sleep(0.01)
        span = rec.t_last - rec.t_first
        emit(
            event="deliveries",
            published=published.get("published", 0),
            deliveries=rec.deliveries,
            misrouted=rec.misrouted,
            seconds=span,
            rate=rec.deliveries / span if span > 0 else 0.0,
            publish_seconds=published.get("seconds"),
        )
        rec.on = False
        rec.received.clear()
        rec.recv_times.clear()
        rec.max_seq = -1
        rec.misrouted = 0

        if args.churn_seconds > 0:
            await phase_churn(args, subs, admin, rec, base + held)
        # resubscribe after the push connection is killed
        await asyncio.to_thread(admin.command, "CLIENT", "KILL", "TYPE", "pubsub")
        began = time.monotonic()
        # the kill takes the subscriptions with the connection: see them gone first
        gone = None
        while time.monotonic() - began < 2.0:
            gone = await asyncio.to_thread(admin.subscriptions)
            if gone < base + held:
                break
            await asyncio.sleep(0.001)
        # the subscriptions disappear with the connection; wait until all are back
        back = await wait_subscriptions(admin, base + held, args.resubscribe_timeout)
        back_at = time.monotonic()
        emit(
            event="resubscribe",
            seconds=None if back is None else back_at - began,
            subscriptions_now=await asyncio.to_thread(admin.subscriptions),
            wanted=base + held,
            seen_after_kill=gone,
            after=time.monotonic() - began,
        )

        # leave everything: nothing may be left at the server
        await asyncio.wait_for(
            subs.leave([f"u{i}" for i in range(args.channels)] + probes), args.phase_timeout
        )
        leftover = await wait_zero(admin, base, 5.0)
        emit(event="end", leftover_subscriptions=leftover, rss_kib=settled_rss_kib())
    finally:
        # Not under wait_for: a bus is left in the task that entered it.
        await subs.stop()


async def wait_zero(admin: Admin, base: int, timeout: float) -> int:
    """Subscriptions above ``base`` left at the server after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        n = await asyncio.to_thread(admin.subscriptions) - base
        if n <= 0 or time.monotonic() > deadline:
            return max(n, 0)
        await asyncio.sleep(0.05)


async def phase_churn(
    args: argparse.Namespace, subs: Any, admin: Admin, rec: Recorder, held: int
) -> None:
    live = args.churn_live
    per_tick = max(1, round(args.churn_join_rate * 0.01))
    rss_before = settled_rss_kib()
    objects_before = len(gc.get_objects())  # gc-tracked objects: a leak shows here
    joined: dict[str, tuple[float, float]] = {}  # topic -> (join called, confirmed)
    left: dict[str, float] = {}  # topic -> leave called
    reader_at: dict[str, int] = {}  # topic -> highest seq received anywhere at its leave
    t = time.monotonic()
    initial = [f"c{i}" for i in range(live)]
    await asyncio.wait_for(subs.join(initial), args.phase_timeout)
    now = time.monotonic()
    for x in initial:
        joined[x] = (t, now)
    rec.received.clear()
    rec.recv_times.clear()
    rec.max_seq = -1
    rec.misrouted = 0
    rec.on = True
    t0 = time.monotonic() + 0.5
    out = os.path.join(args.tmp, f"churn-{os.getpid()}.json")
    proc = publisher(
        args, "--mode", "churn", "--t0", repr(t0), "--seconds", str(args.churn_seconds),
        "--rate", str(args.churn_rate), "--join-rate", str(args.churn_join_rate),
        "--live", str(live), "--margin", str(args.churn_margin), "--out", out,
        "--time-limit", str(args.churn_seconds + 30),
    )  # fmt: skip
    await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    next_join, next_leave = live, 0
    lag = 0.0
    tick = 0.01
    inflight: set[asyncio.Task[None]] = set()

    async def join(batch: list[str]) -> None:
        began = time.monotonic()
        await subs.join(batch)
        done = time.monotonic()
        for x in batch:
            joined[x] = (began, done)

    async def leave(batch: list[str]) -> None:
        # wait for a joining batch of these channels to be confirmed first
        for x in batch:
            while x not in joined:  # noqa: ASYNC110  (a poll of a dict, bounded by the churn)
                await asyncio.sleep(0.001)
        now = time.monotonic()
        for x in batch:
            left[x] = now
            reader_at[x] = rec.max_seq
        await subs.leave(batch)

    end = t0 + args.churn_seconds
    n_tick = 0
    while time.monotonic() < end:
        jb = [f"c{i}" for i in range(next_join, next_join + per_tick)]
        lb = [f"c{i}" for i in range(next_leave, next_leave + per_tick)]
        next_join += per_tick
        next_leave += per_tick
        for coro in (join(jb), leave(lb)):
            task = asyncio.create_task(coro)
            inflight.add(task)
            task.add_done_callback(inflight.discard)
        n_tick += 1
        due = t0 + n_tick * tick
        delay = due - time.monotonic()
        lag = max(lag, -delay)
        if delay > 0:
            await asyncio.sleep(delay)
    if inflight:
        await asyncio.wait_for(asyncio.gather(*inflight), args.phase_timeout)
    published = await wait_process(proc, args.churn_seconds + 60)
    # let what is in flight arrive, then leave the rest
    await asyncio.sleep(args.churn_grace)
    rest = [f"c{i}" for i in range(next_leave, next_join)]
    now = time.monotonic()
    for x in rest:
        left[x] = now
        reader_at[x] = rec.max_seq
    await asyncio.wait_for(subs.leave(rest), args.phase_timeout)
    rec.on = False
    leaked_server = await wait_zero(admin, held, 5.0)
    leaked_channels = await asyncio.to_thread(admin.channels, channel("c*"))
    rss_after = settled_rss_kib()
    # the bench's own records (received, recv_times) are still alive: small against N
    objects_after = len(gc.get_objects())

    records = await asyncio.to_thread(lambda: json.loads(Path(out).read_text()))
    os.unlink(out)
    received = {t: set(v) for t, v in rec.received.items()}
    seqs: dict[int, tuple[str, float, float, int]] = {}
    must = lost = unread = 0
    for t, s, t_write, t_reply, reply in records:
        seqs[s] = (t, t_write, t_reply, reply)
        if t not in joined or t not in left:
            continue
        _, confirmed = joined[t]
        # Sent after the confirmation, answered by Redis well before the leave
        # (by --churn-window): the subscriber must have had it.
        if t_write >= confirmed and t_reply <= left[t] - args.churn_window:
            if s > reader_at[t]:
                # The process had not read that far when it left (it lags by more
                # than the window): not counted, reported as `unread_at_leave`.
                unread += 1
                continue
            must += 1
            if s not in received.get(t, ()):
                lost += 1
    lags = sorted(rec.recv_times[s] - seqs[s][2] for s in rec.recv_times if s in seqs)

    def lag_pct(q: float) -> float | None:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else None

    stale = 0
    for t, got in received.items():
        for s in got:
            topic, _, t_reply, _ = seqs.get(s, ("?", 0.0, 0.0, 0))
            if topic != t:
                continue  # counted by rec.misrouted already
            # answered by Redis before this subscriber even asked to join: not its own
            if t_reply < joined[t][0]:
                stale += 1
    emit(
        event="churn",
        seconds=args.churn_seconds,
        joins=next_join - live,
        leaves=next_leave,
        left_at_end=len(rest),
        published=published.get("published", 0),
        deliveries=rec.deliveries,
        must_deliver=must,
        unread_at_leave=unread,
        lag_p50=lag_pct(0.5),
        lag_p99=lag_pct(0.99),
        lag_max=lag_pct(1.0),
        lost=lost,
        misrouted=rec.misrouted + stale,
        leaked_server=leaked_server,
        leaked_channels=leaked_channels,
        rss_before_kib=rss_before,
        rss_after_kib=rss_after,
        objects_before=objects_before,
        objects_after=objects_after,
        tick_lag_max=lag,
        window=args.churn_window,
    )


# -- FastStream: at which channel count does it stop being usable ----------------------


async def faststream_main(args: argparse.Namespace) -> None:
    from faststream.redis import RedisBroker

    admin = Admin(args.url)
    for count in [int(x) for x in args.faststream_counts.split(",")]:
        # Its connection pool refuses more than 100 connections by default
        # (MaxConnectionsError): a user holding `count` subscribers raises it.
        broker = RedisBroker(args.url, logger=None, max_connections=count + 16)

        def make() -> Callable[[Any], Any]:
            async def handler(body: Any) -> None:
                return None

            return handler

        for i in range(count):
            broker.subscriber(channel(f"u{i}").replace("{", "{{").replace("}", "}}"))(make())
        baseline = settled_rss_kib()
        began = time.monotonic()
        result: dict[str, Any] = {"event": "faststream", "channels": count}
        try:
            await asyncio.wait_for(broker.start(), args.faststream_seconds)
            server = await wait_subscriptions(
                admin, count, max(0.1, args.faststream_seconds - (time.monotonic() - began))
            )
            elapsed = time.monotonic() - began
            result["seconds"] = elapsed if server is not None else None
            if elapsed > args.faststream_seconds:
                # Its connection setup holds the event loop, so wait_for fires late:
                # the verdict goes by the time it took.
                result["seconds"] = None
                result["error"] = (
                    f"took {elapsed:.1f}s, over the {args.faststream_seconds:g}s bound "
                    "(its event loop was blocked past the bound)"
                )
                result["subscriptions_reached"] = await asyncio.to_thread(admin.subscriptions)
            result["pubsub_clients"] = await asyncio.to_thread(admin.pubsub_clients)
            result["bytes_per_subscription"] = (settled_rss_kib() - baseline) * 1024 / count
        except (asyncio.TimeoutError, OSError, Exception) as exc:
            result["seconds"] = None
            result["error"] = f"{type(exc).__name__}: {exc}"[:200]
            result["subscriptions_reached"] = await asyncio.to_thread(admin.subscriptions)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(broker.stop(), 30)
        emit(**result)
        if result.get("seconds") is None:
            break  # it stopped being usable: larger counts would only take longer


async def taskcost_main(args: argparse.Namespace) -> None:
    """The control: what an idle asyncio task per channel costs, with no library at all.

    eventbus and broadcaster are driven by a task per channel (the shape of a server
    holding a task per connected client), raw redis-py by one reader task and a dict;
    this separates the user's task from what the library holds per subscription.
    """
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def hold(topic: str) -> None:
        async with contextlib.AsyncExitStack():
            await never

    baseline = settled_rss_kib()
    tasks = [asyncio.create_task(hold(f"u{i}")) for i in range(args.channels)]
    await asyncio.sleep(0)  # every task started and parked on the future
    idle = settled_rss_kib()
    emit(event="taskcost", bytes_per_task=(idle - baseline) * 1024 / args.channels)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    emit(event="end")


def library_versions(contender: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str] = {}
    for name in ["eventbus", "broadcaster", "faststream", "redis", "hiredis"]:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("publish")
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=["burst", "churn"], required=True)
    p.add_argument("--channels", type=int, default=0)
    p.add_argument("--messages", type=int, default=0)
    p.add_argument("--time-limit", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--t0", type=float, default=0.0)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=5000.0)
    p.add_argument("--join-rate", type=float, default=1000.0)
    p.add_argument("--live", type=int, default=5000)
    p.add_argument("--margin", type=int, default=200)
    p.add_argument("--out", default="")
    s = sub.add_parser("subscribe")
    s.add_argument("--contender", required=True)
    s.add_argument("--url", required=True)
    s.add_argument("--pub-python", required=True)
    s.add_argument("--channels", type=int, required=True)
    s.add_argument("--messages", type=int, default=50_000)
    s.add_argument("--raw-batch", type=int, default=1000)
    s.add_argument("--max-probes", type=int, default=1000)
    s.add_argument("--phase-timeout", type=float, default=120.0)
    s.add_argument("--idle-limit", type=float, default=2.0)
    s.add_argument("--resubscribe-timeout", type=float, default=30.0)
    s.add_argument("--churn-seconds", type=float, default=10.0)
    s.add_argument("--churn-join-rate", type=float, default=1000.0)
    s.add_argument("--churn-live", type=int, default=5000)
    s.add_argument("--churn-rate", type=float, default=5000.0)
    s.add_argument("--churn-margin", type=int, default=200)
    s.add_argument("--churn-window", type=float, default=0.5)
    s.add_argument("--churn-grace", type=float, default=1.0)
    s.add_argument("--tmp", default="/tmp")
    s.add_argument("--faststream-counts", default="100,1000,5000")
    s.add_argument("--faststream-seconds", type=float, default=30.0)
    args = parser.parse_args()
    if args.cmd == "publish":
        publish_main(args)
        return
    emit(event="versions", versions=library_versions(args.contender))
    if args.contender == "faststream":
        asyncio.run(faststream_main(args))
    elif args.contender == "taskcost":
        asyncio.run(taskcost_main(args))
    else:
        asyncio.run(subscribe_main(args))


if __name__ == "__main__":
    main()
