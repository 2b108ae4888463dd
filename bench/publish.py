"""W1, publish throughput to one durable topic: eventbus vs raw redis-py and FastStream.

``--events`` (100,000) ~100-byte events to one Redis Stream, per contender:

* ``eventbus-64``: 64 tasks each awaiting ``bus.publish(topic, event)`` (eventbus
  coalesces concurrent publishes into pipelines); ``eventbus-serial``: one task;
  ``eventbus-many``: ``bus.publish_many`` in batches of 1,000;
* ``raw-pipeline``: redis-py ``XADD`` pipelined in batches of 1,000 (the ceiling);
  ``raw-64``: 64 tasks awaiting ``XADD``; ``raw-serial``: one task;
* ``faststream-64``: 64 tasks awaiting ``broker.publish(event, stream=...)``;
  ``faststream-pipeline``: the same calls on a redis-py pipeline passed as
  ``pipeline=`` and executed every 1,000 (FastStream's ``publish_batch`` only
  writes to lists); ``faststream-serial``: one task.

Each contender runs in its own interpreter (FastStream in its venv, created on
demand), on a private redis-server; the rows take turns. Events/s is events
divided by the time from the first call to the last reply. Run
``python bench/publish.py --help``; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple

import _streams_common as common

TOPIC = "w1"
WARM_TOPIC = "w1-warm"
BATCH = 1000


# -- worker (runs in the contender's interpreter) ------------------------------------------


class Sink(NamedTuple):
    """How a contender publishes one event, and a batch of events, to one stream."""

    one: Callable[[Any], Awaitable[Any]]
    many: Callable[[list[Any]], Awaitable[Any]]


Sinks = Callable[[str], Sink]
"""Topic name -> its sink (the measured stream, or the warm-up one)."""


@contextlib.asynccontextmanager
async def eventbus_sinks(url: str) -> AsyncIterator[Sinks]:
    from eventbus import EventBus, Topic

    bus = EventBus(url, prefix=common.PREFIX)

    def sink(name: str) -> Sink:
        topic = Topic(name, durable=True)
        return Sink(
            lambda event: bus.publish(topic, event),
            lambda events: bus.publish_many(topic, events),
        )

    async with bus:
        yield sink


@contextlib.asynccontextmanager
async def raw_sinks(url: str) -> AsyncIterator[Sinks]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)

    def sink(name: str) -> Sink:
        key = common.stream_key(name)

        async def many(events: list[bytes]) -> None:
            pipe = client.pipeline(transaction=False)
            for data in events:
                pipe.xadd(key, {"data": data})
            await pipe.execute()

        return Sink(lambda data: client.xadd(key, {"data": data}), many)

    try:
        yield sink
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def faststream_sinks(url: str) -> AsyncIterator[Sinks]:
    from faststream.redis import RedisBroker

    broker = RedisBroker(url, logger=None)

    def sink(name: str) -> Sink:
        key = common.faststream_name(common.stream_key(name))

        async def many(events: list[Any]) -> None:
            # FastStream's documented way to batch (its ``Pipeline`` dependency opens
            # the same), without MULTI/EXEC like the other contenders' pipelines.
            async with broker._connection.pipeline(transaction=False) as pipe:
                for event in events:
                    await broker.publish(event, stream=key, pipeline=pipe)
                await pipe.execute()

        return Sink(lambda event: broker.publish(event, stream=key), many)

    async with broker:
        await broker.start()
        yield sink


SINKS = {"eventbus": eventbus_sinks, "raw": raw_sinks, "faststream": faststream_sinks}


async def drive(sink: Sink, events: list[Any], *, tasks: int, batch: int, deadline: float) -> int:
    """Publish ``events`` (in batches, or from ``tasks`` tasks); return how many went out."""
    if batch:
        sent = 0
        for start in range(0, len(events), batch):
            if time.perf_counter() > deadline:
                break
            chunk = events[start : start + batch]
            await sink.many(chunk)
            sent += len(chunk)
        return sent

    index = itertools.count()
    total = len(events)
    done = 0

    async def publisher() -> None:
        nonlocal done
        one = sink.one
        while (i := next(index)) < total and time.perf_counter() < deadline:
            await one(events[i])
            done += 1

    await asyncio.gather(*(publisher() for _ in range(tasks)))
    return done


async def publish_worker(args: argparse.Namespace) -> dict[str, Any]:
    events: list[Any] = common.payloads(args.events, args.size)
    if args.family == "raw":  # the ceiling: encoded before the clock
        events = [common.encode(e) for e in events]
    async with SINKS[args.family](args.url) as sinks:
        # Warm-up on another stream: connections (a pool of `tasks`), imports, caches.
        warm = events[: max(args.tasks, 10)]
        deadline = time.perf_counter() + 10
        warm_batch = 10 if args.batch else 0
        await drive(sinks(WARM_TOPIC), warm, tasks=args.tasks, batch=warm_batch, deadline=deadline)
        sink = sinks(TOPIC)
        cpu = time.process_time()
        started = time.perf_counter()
        sent = await drive(
            sink, events, tasks=args.tasks, batch=args.batch, deadline=started + args.max_seconds
        )
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
    return {
        "sent": sent,
        "seconds": seconds,
        "run_cpu_seconds": cpu,
        "time_bounded": sent < len(events),
    }


# -- orchestrator ----------------------------------------------------------------------------


def rows() -> list[common.Row]:
    def row(name: str, family: str, note: str, tasks: int = 1, batch: int = 0) -> common.Row:
        args = ("--tasks", str(tasks), "--batch", str(batch))
        return common.Row(name, family, note, args, slow=tasks == 1 and not batch)

    return [
        row("eventbus-64", "eventbus", "64 tasks x await bus.publish(topic, dict)", tasks=64),
        row("eventbus-many", "eventbus", "await bus.publish_many(topic, 1,000 dicts)", batch=BATCH),
        row("eventbus-serial", "eventbus", "1 task x await bus.publish(topic, dict)"),
        row("raw-pipeline", "raw", "pipeline(transaction=False): 1,000 XADD, execute", batch=BATCH),
        row("raw-64", "raw", "64 tasks x await client.xadd(key, {data: bytes})", tasks=64),
        row("raw-serial", "raw", "1 task x await client.xadd(key, {data: bytes})"),
        row("faststream-64", "faststream", "64 tasks x await broker.publish(dict, stream=)", 64),
        row(
            "faststream-pipeline",
            "faststream",
            "broker.publish(dict, stream=, pipeline=pipe) x 1,000, pipe.execute()",
            batch=BATCH,
        ),
        row("faststream-serial", "faststream", "1 task x await broker.publish(dict, stream=)"),
    ]


def stream_of(row: common.Row) -> str:
    key = common.stream_key(TOPIC)
    return common.faststream_name(key) if row.family == "faststream" else key


def trial(ctx: common.Context, row: common.Row, run: int) -> common.Trial:
    opts = ctx.opts
    seconds = opts.max_seconds
    cmd = [
        ctx.python(row), str(Path(__file__).resolve()), "worker",
        "--row", row.name, "--family", row.family, "--url", ctx.url,
        "--events", str(opts.events), "--size", str(opts.size),
        "--max-seconds", str(seconds), *row.args,
    ]  # fmt: skip
    result, error = common.run_worker(cmd, timeout=seconds + 60)
    t = common.Trial(row.name, run, result, error)
    if error:
        return t
    key = stream_of(row)
    stored = ctx.admin.xlen(key)
    last = ctx.admin.xrevrange(key, count=1)
    result["stored"] = stored
    result["entry_bytes"] = sum(len(k) + len(v) for k, v in last[0][1].items()) if last else 0
    result["rate"] = result["sent"] / result["seconds"]
    if stored != result["sent"]:
        t.error = f"{result['sent']:,} published but the stream holds {stored:,}"
    return t


def describe(t: common.Trial) -> str:
    r = t.result
    return (
        f"{common.fmt_int(r['rate']):>9} events/s  {r['sent']:,} in {r['seconds']:.2f}s"
        f"  client CPU {r['run_cpu_seconds']:.2f}s"
    )


def report(results: common.Results) -> None:
    def rate(res: common.Results, name: str) -> str:
        return common.fmt_int(res.median(name, "rate"))

    def cpu(res: common.Results, name: str) -> str:
        return f"{res.median(name, lambda r: r['run_cpu_seconds'] / r['sent'] * 1e6):.1f} us"

    columns = [
        common.Column("events/s", 10, rate),
        common.Column(
            "(min-max)", 13, lambda res, n: res.spread(n, "rate", common.fmt_k), left=True
        ),
        common.Column("entry B", 7, lambda res, n: f"{res.median(n, 'entry_bytes'):.0f}"),
        common.Column("CPU/event", 9, cpu),
    ]
    print_events = results.ok(results.rows[0].name)
    events = print_events[0]["sent"] if print_events else 0
    common.print_table(
        f"W1: {events:,} events of ~100 B to one durable topic (stream)",
        results,
        columns,
        "events/s: median of the runs (first call to last reply); entry B: field names + "
        "values of one stream entry; CPU/event: the publishing process's CPU time "
        "in the measured part, per event; * time-bounded: stopped by --max-seconds before "
        "--events, the rate of what it published by then",
    )
    med = {r.name: results.median(r.name, "rate") for r in results.rows if results.has(r.name)}
    checks: list[common.Check] = []
    eb = med.get("eventbus-64")
    if eb is not None:
        if (raw := med.get("raw-pipeline")) is not None:
            share = f"{eb / raw:.0%} ({common.fmt_int(eb)} vs {common.fmt_int(raw)})"
            checks.append((eb >= 0.8 * raw, f"eventbus-64 >= 80% of raw-pipeline: {share}"))
        if (fsb := med.get("faststream-pipeline")) is not None:
            text = f"eventbus-64 > faststream-pipeline (its batch publish): {common.ratio(eb, fsb)}"
            checks.append((eb > fsb, text))
        if (fs := med.get("faststream-64")) is not None:
            text = f"eventbus-64 >= 5x faststream-64: {common.ratio(eb, fs)}"
            checks.append((eb >= 5 * fs, text))
    pairs = [
        ("eventbus-64", "raw-64"),
        ("eventbus-many", "raw-pipeline"),
        ("eventbus-many", "faststream-pipeline"),
        ("eventbus-serial", "raw-serial"),
        ("eventbus-serial", "faststream-serial"),
        ("raw-64", "raw-pipeline"),
    ]
    checks += [
        (None, f"{a} vs {b}: {common.ratio(med[a], med[b])}")
        for a, b in pairs
        if a in med and b in med
    ]
    common.print_checks("targets and ratios (medians)", checks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000, help="events per run")
    parser.add_argument("--size", type=int, default=100, help="event size in bytes (JSON)")
    common.add_common_args(
        parser,
        rows(),
        max_seconds=8.0,
        max_help="time bound of one run: a run that has not published --events by then "
        "stops and reports its rate so far (marked *)",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    if argv[:1] == ["worker"]:
        parser = common.worker_parser(__doc__)
        parser.add_argument("--tasks", type=int, default=1)
        parser.add_argument("--batch", type=int, default=0)
        common.worker_main(publish_worker, parser.parse_args(argv[1:]))
        return
    opts = parse_args(argv)
    common.run_bench(
        name="publish (W1)",
        header=f"{opts.events:,} events of ~{opts.size} B to one durable topic",
        opts=opts,
        rows=rows(),
        trial=trial,
        describe=describe,
        report=report,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
