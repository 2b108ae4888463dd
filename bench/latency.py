"""W4, publish-to-handler latency at a steady rate: eventbus vs raw redis-py and FastStream.

One process publishes ``--rate`` (2,000) events/s for ``--seconds`` (5), each due
at an absolute time (no drift), awaiting each publish; another process handles
them. Each event carries ``time.time_ns()`` taken just before the publish call;
the handler's ``time.time_ns()`` minus that is its latency. Per contender, on a
durable topic (Redis Stream, one consumer group, one consumer) and on a live
topic (pub/sub):

* ``eventbus-durable`` / ``eventbus-live``: ``bus.publish`` and ``@bus.on(topic,
  group=...)`` / ``@bus.on(topic)``, library defaults;
* ``raw-durable``: ``XADD`` and an ``XREADGROUP BLOCK`` loop with ``XACK``;
  ``raw-live``: ``PUBLISH`` and ``PubSub.listen()``;
* ``faststream-durable``: ``broker.publish(stream=)`` and ``@broker.subscriber(
  stream=StreamSub(group, consumer))``; ``faststream-live``: ``channel=``.

Run ``python bench/latency.py --help``; see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import _streams_common as common

WORKER = Path(__file__).resolve().parent / "_latency_worker.py"


def rows() -> list[common.Row]:
    def row(family: str, mode: str, note: str) -> common.Row:
        return common.Row(f"{family}-{mode}", family, note, ("--mode", mode))

    return [
        row("eventbus", "durable", "bus.publish(durable) -> @bus.on(topic, group=...)"),
        row("raw", "durable", "XADD -> XREADGROUP COUNT 100 BLOCK 1000 loop + XACK"),
        row("faststream", "durable", "broker.publish(stream=) -> subscriber(StreamSub(group))"),
        row("eventbus", "live", "bus.publish(live) -> @bus.on(topic)"),
        row("raw", "live", "PUBLISH -> PubSub.listen()"),
        row("faststream", "live", "broker.publish(channel=) -> subscriber(channel)"),
    ]


def trial(ctx: common.Context, row: common.Row, run: int) -> common.Trial:
    opts = ctx.opts
    events = str(round(opts.rate * opts.seconds) + opts.warmup)
    role_args = [
        "--row", row.name, "--family", row.family, "--url", ctx.url, "--size", str(opts.size),
        "--events", events, "--max-seconds", str(opts.max_seconds), *row.args,
    ]  # fmt: skip
    t = common.Trial(row.name, run)
    consumer = common.Worker(
        [ctx.python(row), str(WORKER), "consume", *role_args,
         "--warmup", str(opts.warmup), "--idle-limit", "3"]
    )  # fmt: skip
    try:
        ready = consumer.next(timeout=60)
        if ready is None or ready.get("event") != "ready":
            t.error = f"consumer not ready: {ready} | stderr: {consumer.stderr_tail()}"
            return t
        publisher, error = common.run_worker(
            [ctx.python(row), str(WORKER), "publish", *role_args, "--rate", str(opts.rate)],
            timeout=opts.max_seconds + 60,
        )
        if error:
            t.error = f"publisher: {error}"
            return t
        result, error = consumer.result(timeout=30)  # its idle limit is 3 s
        if error:
            t.error = f"consumer: {error}"
            return t
    finally:
        consumer.close()
    t.result = {**result, "publisher": publisher}
    if result["received"] != publisher["sent"]:
        t.error = f"{publisher['sent']:,} published, {result['received']:,} handled"
    return t


def describe(t: common.Trial) -> str:
    r, p = t.result, t.result["publisher"]
    return (
        f"p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.1f} ms  "
        f"({r['measured']:,} events, publisher {p['sent'] / p['seconds']:,.0f}/s, "
        f"late p99 {p['late_p99_ms']:.2f} ms)"
    )


def report(results: common.Results) -> None:
    def ms(key: str) -> common.Column:
        title = key.replace("_ms", " ms")
        return common.Column(title, 7, lambda res, n: f"{res.median(n, key):.2f}")

    def ms_spread(key: str) -> common.Column:
        return common.Column(
            "(min-max)", 11, lambda res, n: res.spread(n, key, lambda v: f"{v:.2f}"), left=True
        )

    def cpu(res: common.Results, name: str, side: str) -> str:
        if side == "consumer":
            value = res.median(name, lambda r: r["run_cpu_seconds"] / r["measured"] * 1e6)
        else:
            pub = "publisher"
            value = res.median(name, lambda r: r[pub]["run_cpu_seconds"] / r[pub]["sent"] * 1e6)
        return f"{value:.0f} us"

    def late_p99(r: dict[str, Any]) -> float:
        return float(r["publisher"]["late_p99_ms"])

    columns = [
        ms("p50_ms"),
        ms_spread("p50_ms"),
        ms("p99_ms"),
        ms_spread("p99_ms"),
        ms("max_ms"),
        common.Column("late p99", 8, lambda res, n: f"{res.median(n, late_p99):.2f}"),
        common.Column("CPU/ev pub", 10, lambda res, n: cpu(res, n, "publisher")),
        common.Column("CPU/ev sub", 10, lambda res, n: cpu(res, n, "consumer")),
    ]
    any_ok = next((results.ok(r.name)[0] for r in results.rows if results.has(r.name)), None)
    measured = any_ok["measured"] if any_ok else 0
    common.print_table(
        f"W4: publish-to-handler latency, {measured:,} events at a steady rate, "
        "publisher and consumer in two processes",
        results,
        columns,
        "ms: median of the runs' percentiles (nearest rank over each run's events); late p99: "
        "how late the publisher's calls started against their schedule (ms); CPU/ev: each "
        "process's CPU time per event (us, while publishing / consuming)",
    )
    p99 = {r.name: results.median(r.name, "p99_ms") for r in results.rows if results.has(r.name)}
    p50 = {r.name: results.median(r.name, "p50_ms") for r in results.rows if results.has(r.name)}
    checks: list[common.Check] = []
    for mode in ("durable", "live"):
        eb = p99.get(f"eventbus-{mode}")
        if eb is None:
            continue
        if (fs := p99.get(f"faststream-{mode}")) is not None:
            text = f"{mode}: eventbus p99 <= FastStream p99: {eb:.2f} vs {fs:.2f} ms"
            checks.append((eb <= fs, text))
        if (raw := p99.get(f"raw-{mode}")) is not None:
            text = f"{eb:.2f} vs {raw:.2f} ms ({common.ratio(eb, raw)})"
            checks.append((eb <= 2 * raw, f"{mode}: eventbus p99 <= 2x raw redis-py p99: {text}"))
        others = [f"{n} {v:.2f}" for n, v in p50.items() if n.endswith(mode)]
        checks.append((None, f"{mode}: p50 ms: " + ", ".join(others)))
    common.print_checks("targets (medians of the runs' p99)", checks)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured duration")
    parser.add_argument("--warmup", type=int, default=200,
                        help="events sent first and not measured")  # fmt: skip
    parser.add_argument("--size", type=int, default=100, help="event size in bytes (JSON)")
    common.add_common_args(parser, rows())
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    opts = parse_args(argv)
    common.run_bench(
        name="latency (W4)",
        header=f"{opts.rate:,.0f} events/s for {opts.seconds:g} s (+{opts.warmup} warm-up), "
        f"~{opts.size} B",
        opts=opts,
        rows=rows(),
        trial=trial,
        describe=describe,
        report=report,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
