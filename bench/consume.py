"""W3, drain a stream with one group consumer: eventbus vs raw redis-py, FastStream, walrus.

Each run prefills one Redis Stream with ``--events`` (100,000) ~100-byte events,
in the format the contender reads (pipelined ``XADD`` of eventbus's ``id`` +
``env`` entries, of a ``data`` field for raw redis-py and walrus; FastStream's
own ``publish`` for FastStream), then drains it with ONE consumer of one consumer
group and a no-op handler. The run ends when every event was handled AND acked
(``XPENDING`` 0), or at the time limit:

* ``eventbus``: ``@bus.on(topic, group=...)`` with the library's defaults;
* ``eventbus-c64``: the same with ``concurrency=64, batch=1000``;
* ``raw``: ``XREADGROUP COUNT 1000`` + one ``XACK`` of the 1,000 ids (the ceiling);
* ``faststream``: ``@broker.subscriber(stream=StreamSub(..., group, consumer,
  max_records=1000))``, time-bounded;
* ``walrus``: the sync library: ``Database.consumer_group(group, [key], consumer)``,
  ``.read(count=1000, block=1000)`` + ``ConsumerGroupStream.ack`` of the 1,000 ids.

Events/s is events divided by the time from the first handler call to the
moment ``XPENDING`` reads 0. Run ``python bench/consume.py --help``; see
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import _streams_common as common

TOPIC = "w3"
BATCH = 1000


# -- worker (runs in the contender's interpreter) ------------------------------------------


def stream_of(family: str) -> str:
    key = common.stream_key(TOPIC)
    return common.faststream_name(key) if family == "faststream" else key


async def prefill_raw(
    client: Any, key: str, fields: Callable[[int], dict[str, bytes]], n: int
) -> None:
    """``n`` entries with pipelined ``XADD`` (1,000 per round trip)."""
    for start in range(0, n, BATCH):
        pipe = client.pipeline(transaction=False)
        for i in range(start, min(n, start + BATCH)):
            pipe.xadd(key, fields(i))
        await pipe.execute()


async def prefill_envelopes(client: Any, key: str, n: int, size: int) -> None:
    """``n`` entries as eventbus writes them. The payloads go when this returns: the
    garbage collector would walk 100,000 dicts left alive during the drain."""
    publisher = uuid.uuid4().hex[:16]
    events = common.payloads(n, size)
    await prefill_raw(
        client, key, lambda i: common.envelope_fields(events[i], seq=i + 1, publisher=publisher), n
    )


async def drain(args: argparse.Namespace, progress: common.Progress, client: Any) -> dict[str, Any]:
    """Wait for the end of the run (handled, then acked); the timing part of the result."""
    how, t_end, handled = await progress.wait(
        time_limit=args.max_seconds, idle_limit=args.idle_limit
    )
    pending = -1
    if how == "complete":
        t_end, pending = await common.wait_acked(
            client, stream_of(args.family), common.GROUP, timeout=10
        )
    seconds = t_end - progress.t_first if progress.t_first else 0.0
    return {"ended": how, "handled": handled, "seconds": seconds, "pending_at_end": pending}


async def run_eventbus(args: argparse.Namespace, client: Any) -> None:
    from eventbus import EventBus, Topic

    key = stream_of(args.family)
    await prefill_envelopes(client, key, args.events, args.size)
    telemetry = None
    if args.otel:
        from _otel import telemetry as make_telemetry  # bench/: on sys.path

        telemetry = make_telemetry()
    bus = EventBus(args.url, prefix=common.PREFIX, shutdown_grace=5.0, telemetry=telemetry)
    progress = common.Progress(args.events)
    options: dict[str, Any] = {}
    if args.concurrency:
        options["concurrency"] = args.concurrency
    if args.batch:
        options["batch"] = args.batch

    @bus.on(Topic(TOPIC, durable=True), group=common.GROUP, consumer=common.CONSUMER, **options)
    async def handle(event: Any) -> None:
        progress.hit()

    async with bus:
        result = await drain(args, progress, client)
        found = bus.consumer_statistics(handle)  # one per member (a list), or one object
        totals: dict[str, int] = {}
        for stats in found if isinstance(found, list) else [found]:
            for name in (k for k in dir(stats) if not k.startswith("_")):
                if isinstance(value := getattr(stats, name), int):
                    totals[name] = totals.get(name, 0) + value
        common.emit_result(args, {**result, "library_stats": totals})  # before the shutdown


async def run_raw(args: argparse.Namespace, client: Any) -> None:
    key = stream_of(args.family)
    events = [common.encode(e) for e in common.payloads(args.events, args.size)]
    await prefill_raw(client, key, lambda i: {"data": events[i]}, args.events)
    await client.xgroup_create(key, common.GROUP, id="0")
    progress = common.Progress(args.events)
    reads = 0

    def handle(fields: Any) -> None:
        progress.hit()

    async def consume() -> None:
        nonlocal reads
        deadline = time.perf_counter() + args.max_seconds
        streams = {key: ">"}
        while progress.count < args.events and time.perf_counter() < deadline:
            reply = await client.xreadgroup(
                common.GROUP, common.CONSUMER, streams, count=BATCH, block=1000
            )
            reads += 1
            if not reply:
                continue
            # RESP2: [[key, entries]]; RESP3: {key: [entries]}
            entries = reply[0][1] if isinstance(reply, list) else next(iter(reply.values()))[0]
            ids = []
            for entry_id, fields in entries:
                handle(fields)
                ids.append(entry_id)
            await client.xack(key, common.GROUP, *ids)

    task = asyncio.create_task(consume())
    result = await drain(args, progress, client)
    await task
    common.emit_result(args, {**result, "library_stats": {"reads": reads}})


async def run_faststream(args: argparse.Namespace, client: Any) -> None:
    from faststream.redis import RedisBroker, StreamSub

    key = stream_of(args.family)
    broker = RedisBroker(args.url, logger=None)
    progress = common.Progress(args.events)
    sub = StreamSub(key, group=common.GROUP, consumer=common.CONSUMER, max_records=BATCH)

    @broker.subscriber(stream=sub)
    async def handle(body: Any) -> None:
        progress.hit()

    events = common.payloads(args.events, args.size)
    async with broker:
        for start in range(0, args.events, BATCH):  # prefill in FastStream's own format
            async with broker._connection.pipeline(transaction=False) as pipe:
                for event in events[start : start + BATCH]:
                    await broker.publish(event, stream=key, pipeline=pipe)
                await pipe.execute()
        # FastStream creates a missing group at "$" (new entries only): create it at "0".
        await client.xgroup_create(key, common.GROUP, id="0")
        await broker.start()
        common.emit_result(args, await drain(args, progress, client))  # before the shutdown


async def run_walrus(args: argparse.Namespace, client: Any) -> None:
    """walrus's consumer-group API, as its users write it: a sync loop of ``read`` + ``ack``.

    The loop runs in a thread (walrus is sync) while the event loop only waits for the
    progress watcher, then polls ``XPENDING`` once everything was handled.
    """
    from walrus import Database

    key = stream_of(args.family)
    events = [common.encode(e) for e in common.payloads(args.events, args.size)]
    await prefill_raw(client, key, lambda i: {"data": events[i]}, args.events)
    db = Database.from_url(args.url)
    group = db.consumer_group(common.GROUP, [key], consumer=common.CONSUMER)
    group.create()  # at "0-0": the entries already in the stream
    stream = group.streams[key]  # its ConsumerGroupStream (acks)
    progress = common.Progress(args.events)
    reads = 0

    def handle(fields: Any) -> None:
        progress.hit()

    def consume() -> None:
        nonlocal reads
        deadline = time.perf_counter() + args.max_seconds
        while progress.count < args.events and time.perf_counter() < deadline:
            reply = group.read(count=BATCH, block=1000)  # [(key, [(id, fields), ...])]
            reads += 1
            for _key, entries in reply or ():
                ids = []
                for entry_id, fields in entries:
                    handle(fields)
                    ids.append(entry_id)
                if ids:
                    stream.ack(*ids)

    task = asyncio.create_task(asyncio.to_thread(consume))
    try:
        result = await drain(args, progress, client)
        await task
    finally:
        db.close()
    common.emit_result(args, {**result, "library_stats": {"reads": reads}})


RUNNERS: dict[str, Callable[[argparse.Namespace, Any], Awaitable[None]]] = {
    "eventbus": run_eventbus,
    "raw": run_raw,
    "faststream": run_faststream,
    "walrus": run_walrus,
}


async def consume_worker(args: argparse.Namespace) -> None:
    """Prefill, drain; the runner prints the result as soon as it is known."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(args.url)
    try:
        await RUNNERS[args.family](args, client)
    finally:
        await client.aclose()


# -- orchestrator ----------------------------------------------------------------------------


def rows() -> list[common.Row]:
    return [
        common.Row("eventbus", "eventbus", "@bus.on(topic, group=...): library defaults"),
        common.Row(
            "eventbus-c64",
            "eventbus",
            "@bus.on(topic, group=..., concurrency=64, batch=1000)",
            ("--concurrency", "64", "--batch", "1000"),
        ),
        common.Row(
            "eventbus-otel",
            "eventbus",
            "as eventbus, with eventbus.otel (SDK, batch span processor, exports discarded)",
            ("--otel",),
        ),
        common.Row("raw", "raw", "XREADGROUP COUNT 1000 BLOCK 1000 + XACK of the 1,000 ids"),
        common.Row(
            "faststream",
            "faststream",
            "@broker.subscriber(stream=StreamSub(group, consumer, max_records=1000))",
            slow=True,
        ),
        common.Row(
            "walrus",
            "walrus",
            "sync: db.consumer_group(...).read(count=1000, block=1000) + stream.ack(*ids)",
        ),
    ]


def trial(ctx: common.Context, row: common.Row, run: int) -> common.Trial:
    opts = ctx.opts
    seconds = opts.faststream_seconds if row.slow else opts.max_seconds
    cmd = [
        ctx.python(row), str(Path(__file__).resolve()), "worker",
        "--row", row.name, "--family", row.family, "--url", ctx.url,
        "--events", str(opts.events), "--size", str(opts.size),
        "--max-seconds", str(seconds), "--idle-limit", str(opts.idle_limit), *row.args,
    ]  # fmt: skip
    result, error = common.run_worker(cmd, timeout=seconds + 60)
    t = common.Trial(row.name, run, result, error)
    if error:
        return t
    key = stream_of(row.family)
    result["pending"] = int(ctx.admin.xpending(key, common.GROUP)["pending"])
    result["rate"] = result["handled"] / result["seconds"] if result["seconds"] else 0.0
    result["time_bounded"] = result["ended"] == "time-bounded"
    if result["ended"] == "complete" and result["pending"]:
        t.error = f"all {result['handled']:,} handled, but {result['pending']:,} still pending"
    elif result["ended"] not in ("complete", "time-bounded"):
        t.error = f"ended {result['ended']}: {result['handled']:,} handled"
    return t


def describe(t: common.Trial) -> str:
    r = t.result
    reads = r.get("library_stats", {}).get("reads")
    return (
        f"{common.fmt_int(r['rate']):>9} events/s  {r['handled']:,} handled in "
        f"{r['seconds']:.2f}s ({r['ended']}), XPENDING {r['pending']:,}"
        + (f", {reads:,} reads" if reads else "")
    )


def report(results: common.Results) -> None:
    def reads(res: common.Results, name: str) -> str:
        if not all("reads" in r.get("library_stats", {}) for r in res.ok(name)):
            return "-"
        return common.fmt_int(res.median(name, lambda r: r["library_stats"]["reads"]))

    columns = [
        common.Column("events/s", 10, lambda res, n: common.fmt_int(res.median(n, "rate"))),
        common.Column(
            "(min-max)", 15, lambda res, n: res.spread(n, "rate", common.fmt_k), left=True
        ),
        common.Column(
            "handled, XPENDING (each run)",
            34,
            lambda res, n: "; ".join(f"{r['handled']:,}, {r['pending']:,}" for r in res.ok(n)),
            left=True,
        ),
        common.Column("reads", 6, reads),
    ]
    ok = results.ok("raw") or next((results.ok(r.name) for r in results.rows), [])
    events = ok[0]["handled"] if ok else 0
    common.print_table(
        f"W3: drain {events:,} prefilled events, one group consumer, no-op handler, all acked",
        results,
        columns,
        "events/s: median of the runs, first handler call to XPENDING 0; XPENDING: pending "
        "entries of the group after the run; reads: XREADGROUP calls; * time-bounded "
        "(--faststream-seconds): its rate is what it handled in that time",
    )
    med = {r.name: results.median(r.name, "rate") for r in results.rows if results.has(r.name)}
    checks: list[common.Check] = []
    raw = med.get("raw")
    fs = med.get("faststream")
    wal = med.get("walrus")
    for name in ("eventbus", "eventbus-c64"):
        if (eb := med.get(name)) is None:
            continue
        if raw:
            share = f"{eb / raw:.0%} ({common.fmt_int(eb)} vs {common.fmt_int(raw)})"
            checks.append((eb >= 0.8 * raw, f"{name} >= 80% of raw: {share}"))
        if fs:
            checks.append((None, f"{name} vs faststream: {common.ratio(eb, fs)}"))
        if wal:
            checks.append((None, f"{name} vs walrus: {common.ratio(eb, wal)}"))
    if wal and raw:
        checks.append((None, f"walrus vs raw: {common.ratio(wal, raw)}"))
    common.print_checks("targets and ratios (medians)", checks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events prefilled per run")
    parser.add_argument("--size", type=int, default=100, help="event size in bytes (JSON)")
    parser.add_argument("--faststream-seconds", type=float, default=30.0,
                        help="time bound of a FastStream run")  # fmt: skip
    parser.add_argument("--idle-limit", type=float, default=5.0,
                        help="a run with nothing handled for this long has ended")  # fmt: skip
    common.add_common_args(parser, rows())
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv[:1] == ["worker"]:
        parser = common.worker_parser(__doc__)
        parser.add_argument("--concurrency", type=int, default=0)
        parser.add_argument("--otel", action="store_true")
        parser.add_argument("--batch", type=int, default=0)
        parser.add_argument("--idle-limit", type=float, default=5.0)
        common.worker_main(consume_worker, parser.parse_args(argv[1:]))
        return
    opts = parse_args(argv)
    common.run_bench(
        name="consume (W3)",
        header=f"drain {opts.events:,} events of ~{opts.size} B with one group consumer",
        opts=opts,
        rows=rows(),
        trial=trial,
        describe=describe,
        report=report,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
