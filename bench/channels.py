"""Notification fan-out benchmark (W7): one process holding tens of thousands of channels.

One subscriber process holds ``--channels`` channels (10,000 and 50,000), one
subscriber each, written with the library under test; a publisher process sends
to random channels. Per contender and channel count it prints: the time to
confirm a burst of concurrent subscribes, the p50/p99 of single subscribes timed
while the burst runs, the memory per idle subscription, deliveries/s across the
channels, churn (joins and leaves at a steady rate while publishing: misrouted,
lost while subscribed, leaked server subscriptions) and the resubscribe time
after ``CLIENT KILL TYPE pubsub``. FastStream opens a connection per subscriber:
it is run at growing channel counts under a time bound, to report where it
stops being usable.

Contenders: ``eventbus`` (``bus.subscribe`` async iterators, one ``EventBus``),
``raw`` (one redis-py ``PubSub``, ``SUBSCRIBE`` in batches: the ceiling),
``broadcaster`` (0.3.1, its own venv) and ``faststream`` (its own venv). Each
runs in its own interpreter (``bench/_channels_worker.py``) on a private
redis-server on a loopback port. Run ``python bench/channels.py --help``; see
``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from eventbus.testing import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout import (  # bench/ is not a package: imported from its directory
    MAIN,
    RUNTIMES,
    Lines,
    Runtime,
    ensure_runtime,
    revision,
    source_digest,
    stop_process,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKER = BENCH_DIR / "_channels_worker.py"
CONTENDERS: dict[str, Runtime] = {
    "eventbus": MAIN,
    "raw": MAIN,
    "broadcaster": RUNTIMES["broadcaster"],
    "faststream": RUNTIMES["faststream"],
}


def run_worker(
    contender: str, python: Path, channels: int, server: RedisServer, opts: argparse.Namespace
) -> dict[str, Any]:
    """One subscriber process; returns its events by name (and ``error``)."""
    cmd = [
        str(python), str(WORKER), "subscribe",
        "--contender", contender,
        "--url", server.url,
        "--pub-python", sys.executable,
        "--channels", str(channels),
        "--messages", str(opts.messages),
        "--phase-timeout", str(opts.phase_timeout),
        "--resubscribe-timeout", str(opts.resubscribe_timeout),
        "--churn-seconds", str(opts.churn_seconds),
        "--churn-join-rate", str(opts.churn_join_rate),
        "--churn-live", str(opts.churn_live),
        "--churn-rate", str(opts.churn_rate),
        "--churn-window", str(opts.churn_window),
        "--raw-batch", str(opts.raw_batch),
        "--faststream-counts", opts.faststream_counts,
        "--faststream-seconds", str(opts.faststream_seconds),
    ]  # fmt: skip
    events: dict[str, Any] = {}
    limit = opts.phase_timeout * 6 + opts.churn_seconds + 120
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        try:
            lines = Lines(proc)
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                line = lines.next(timeout=max(0.1, deadline - time.monotonic()))
                if line is None:
                    break
                key = name = line.pop("event")
                n = 1
                while key in events:  # FastStream prints one line per count
                    n += 1
                    key = f"{name}#{n}"
                events[key] = line
        finally:
            stop_process(proc, grace=10.0)
            if proc.returncode != 0 or ("end" not in events and contender != "faststream"):
                stderr.seek(0)
                events["error"] = f"exit {proc.returncode}: " + stderr.read()[-600:]
    return events


def clear_server(admin: redis.Redis) -> None:
    """The next run starts with nobody subscribed (kills what a failed worker left)."""
    admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")


def med(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v: float | None, spec: str, unit: str = "") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def get(runs: list[dict[str, Any]], event: str, key: str) -> list[Any]:
    return [r[event].get(key) for r in runs if event in r]


def print_table(
    channels: int,
    rows: dict[str, list[dict[str, Any]]],
    opts: argparse.Namespace,
    task_bytes: float | None,
) -> None:
    print()
    print(
        f"== {channels:,} channels, one subscriber each; {opts.messages:,} messages to random "
        f"channels; churn {opts.churn_join_rate:,.0f} joins + leaves/s for "
        f"{opts.churn_seconds:g}s over {opts.churn_live:,} live, {opts.churn_rate:,.0f} msg/s =="
    )
    header = (
        f"{'contender':<12}{'runs':>4}  {'burst s':>8}  {'(api s)':>8}  {'single p50/p99 ms':>18}  "
        f"{'B/idle sub':>10}  {'deliveries/s':>12}  {'lost':>5}  {'resub s':>8}  "
        f"{'churn misr/lost/leak (checked)':>31}"
    )
    print(header)
    print("-" * len(header))
    for name, runs in rows.items():
        ok = [r for r in runs if "burst" in r]
        errors = [r["error"] for r in runs if "error" in r]
        if not ok:
            print(f"{name:<12}{len(runs):>4}  FAILED: {(errors or ['?'])[0][:400]}")
            continue
        burst = med(get(ok, "burst", "seconds"))
        api = med(get(ok, "burst", "seconds_api"))
        p50 = med(get(ok, "burst", "probe_p50"))
        p99 = med(get(ok, "burst", "probe_p99"))
        bps = med(get(ok, "idle", "bytes_per_subscription"))
        rate = med(get(ok, "deliveries", "rate"))
        lost = [
            p - d
            for p, d in zip(
                get(ok, "deliveries", "published"), get(ok, "deliveries", "deliveries"), strict=True
            )
        ]
        resub = get(ok, "resubscribe", "seconds")
        resub_s = med(resub) if all(x is not None for x in resub) and resub else None
        churn = [r["churn"] for r in ok if "churn" in r]
        if churn:
            c = ",".join(
                f"{x['misrouted']}/{x['lost']}/{x['leaked_server'] + x['leaked_channels']} "
                f"({x['must_deliver']:,})"
                for x in churn
            )
        else:
            c = "-"
        resub_txt = fmt(resub_s, ".2f") if resub else "-"
        if resub and resub_s is None:
            resub_txt = f">{opts.resubscribe_timeout:g} (never)"
        print(
            f"{name:<12}{len(ok):>4}  {fmt(burst, '.2f'):>8}  {fmt(api, '.2f'):>8}  "
            f"{fmt(p50 and p50 * 1000, '.1f') + '/' + fmt(p99 and p99 * 1000, '.1f'):>18}  "
            f"{fmt(bps, ',.0f'):>10}  {fmt(rate, ',.0f'):>12}  {','.join(map(str, lost)):>5}  "
            f"{resub_txt:>8}  {c:>31}"
        )
        for x in churn:
            print(
                f"    {name}: churn {x['joins']:,} joins, {x['leaves']:,} leaves, "
                f"{x['published']:,} published, {x['deliveries']:,} delivered; lag Redis->"
                f"subscriber p50/p99/max {fmt(x['lag_p50'], '.3f')}/{fmt(x['lag_p99'], '.3f')}/"
                f"{fmt(x['lag_max'], '.3f')}s; {x['unread_at_leave']:,} not checked (not yet "
                f"read by the process when it left); RSS {x['rss_before_kib'] / 1024:.0f} -> "
                f"{x['rss_after_kib'] / 1024:.0f} MiB, gc objects {x['objects_before']:,} -> "
                f"{x['objects_after']:,}; tick lag max {x['tick_lag_max']:.3f}s"
            )
        objs = med(get(ok, "idle", "gc_objects_per_subscription"))
        print(f"    {name}: gc-tracked objects per idle subscription: {fmt(objs, '.1f')}")
        probes = get(ok, "burst", "probes")
        print(f"    {name}: single subscribes timed during the burst: {probes}")
        for e in errors:
            print(f"    !! {name}: {e[:400]}")
    print(
        f"  control: an idle asyncio task per channel (no library; eventbus and broadcaster "
        f"hold one per subscription here) costs {fmt(task_bytes, ',.0f')} B"
    )
    print_targets(channels, rows, task_bytes)


def print_targets(
    channels: int, rows: dict[str, list[dict[str, Any]]], task_bytes: float | None
) -> None:
    def m(name: str, event: str, key: str) -> float | None:
        return med(get([r for r in rows.get(name, []) if "burst" in r], event, key))

    if "eventbus" not in rows:
        return
    print(f"\n-- eventbus vs the others, {channels:,} channels --")
    for other in rows:
        if other == "eventbus":
            continue
        parts = []
        for label, event, key in [
            ("burst", "burst", "seconds"),
            ("single p99", "burst", "probe_p99"),
            ("B/idle sub", "idle", "bytes_per_subscription"),
            ("deliveries/s", "deliveries", "rate"),
            ("resubscribe", "resubscribe", "seconds"),
        ]:
            a, b = m("eventbus", event, key), m(other, event, key)
            parts.append(f"{label} x{a / b:.2f}" if a is not None and b else f"{label} -")
        print(f"  vs {other:<12} " + ", ".join(parts))
    checks: list[tuple[bool | None, str]] = []
    eb_burst, raw_burst = m("eventbus", "burst", "seconds"), m("raw", "burst", "seconds")
    if eb_burst is not None and raw_burst:
        checks.append(
            (
                eb_burst <= 2 * raw_burst,
                f"burst of {channels:,} within 2x raw: {eb_burst:.2f}s vs {raw_burst:.2f}s "
                f"(x{eb_burst / raw_burst:.1f})",
            )
        )
    else:
        checks.append((False, "burst within 2x raw: not measured"))
    bps = m("eventbus", "idle", "bytes_per_subscription")
    own = None if bps is None or task_bytes is None else bps - task_bytes
    checks.append(
        (
            own is not None and own <= 1024,
            f"<= 1 KB per idle subscription: {fmt(bps, ',.0f')} B, of which the user's task "
            f"(the control) {fmt(task_bytes, ',.0f')} B: the library's share {fmt(own, ',.0f')} B",
        )
    )
    eb_rate, raw_rate = m("eventbus", "deliveries", "rate"), m("raw", "deliveries", "rate")
    if eb_rate is not None and raw_rate:
        checks.append(
            (
                eb_rate >= raw_rate,
                f"deliveries/s across channels >= raw: {eb_rate:,.0f} vs {raw_rate:,.0f} "
                f"(x{eb_rate / raw_rate:.2f})",
            )
        )
    churn = [r["churn"] for r in rows["eventbus"] if "churn" in r]
    if churn:
        bad = [(x["misrouted"], x["lost"], x["leaked_server"], x["leaked_channels"]) for x in churn]
        checks.append(
            (
                all(b == (0, 0, 0, 0) for b in bad),
                "churn: misrouted, lost-while-subscribed, leaked (subscriptions, channels): "
                + "; ".join("/".join(map(str, b)) for b in bad)
                + f" ({sum(x['must_deliver'] for x in churn):,} messages checked for loss, "
                + f"{sum(x['unread_at_leave'] for x in churn):,} not checked: the process had not "
                + "read that far when it left; joins/s achieved "
                + ", ".join(f"{x['joins'] / x['seconds']:,.0f}" for x in churn)
                + "; RSS before/after churn: "
                + ", ".join(
                    f"{x['rss_before_kib'] / 1024:.0f}/{x['rss_after_kib'] / 1024:.0f} MiB"
                    for x in churn
                )
                + ")",
            )
        )
    else:
        checks.append((False, "churn: not measured"))
    for ok, text in checks:
        mark = "info" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  [{mark}] {text}")


def print_faststream(runs: list[dict[str, Any]], opts: argparse.Namespace) -> None:
    print(
        "\n== FastStream: one connection per subscriber, bounded to "
        f"{opts.faststream_seconds:g}s per count =="
    )
    for r in runs:
        for key, fs in r.items():
            if not key.startswith("faststream"):
                continue
            if fs.get("seconds") is not None:
                print(
                    f"  {fs['channels']:>6,} channels: subscribed in {fs['seconds']:.2f}s, "
                    f"{fs['pubsub_clients']:,} pub/sub connections, "
                    f"{fs['bytes_per_subscription']:,.0f} B per idle subscription"
                )
            else:
                print(
                    f"  {fs['channels']:>6,} channels: NOT USABLE: {fs.get('error', '')} "
                    f"({fs.get('subscriptions_reached', '?')} subscriptions at the server)"
                )
        if "error" in r:
            print(f"  !! {r['error'][:400]}")
        usable = [
            fs["channels"]
            for k, fs in r.items()
            if k.startswith("faststream") and fs.get("seconds") is not None
        ]
        failed = [
            fs["channels"]
            for k, fs in r.items()
            if k.startswith("faststream") and fs.get("seconds") is None
        ]
        print(
            f"  FastStream usable up to {max(usable, default=0):,} channels"
            + (f", not at {min(failed):,}" if failed else " (the largest count tried)")
            + f" (bound: subscribed within {opts.faststream_seconds:g}s)"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="W7 channels benchmark: eventbus vs raw redis-py, broadcaster, FastStream."
    )
    parser.add_argument("--channels", default="10000,50000", help="comma separated counts")
    parser.add_argument("--messages", type=int, default=50_000, help="deliveries phase")
    parser.add_argument("--repeats", type=int, default=1, help="runs per row (median)")
    parser.add_argument("--only", default="", help="eventbus,raw,broadcaster,faststream")
    parser.add_argument("--skip-missing", action="store_true")
    parser.add_argument("--venvs", type=Path, default=REPO_DIR / ".bench-venvs")
    parser.add_argument("--raw-batch", type=int, default=1000, help="channels per raw SUBSCRIBE")
    parser.add_argument("--churn-seconds", type=float, default=10.0)
    parser.add_argument("--churn-join-rate", type=float, default=1000.0, help="joins/s = leaves/s")
    parser.add_argument("--churn-live", type=int, default=5000, help="churn channels held at once")
    parser.add_argument("--churn-rate", type=float, default=5000.0, help="messages/s during churn")
    parser.add_argument("--churn-window", type=float, default=0.5, help="a message answered by "
                        "Redis this long before the leave must have been received")  # fmt: skip
    parser.add_argument("--resubscribe-timeout", type=float, default=30.0)
    parser.add_argument("--phase-timeout", type=float, default=120.0)
    parser.add_argument("--faststream-counts", default="100,1000,5000")
    parser.add_argument("--faststream-seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="10,000 channels, 20,000 messages, "
                        "5 s of churn, 10 s bounds (about 2 minutes)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every run's events")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.channels = "10000"
        opts.messages = 20_000
        opts.churn_seconds = 5.0
        opts.resubscribe_timeout = 10.0
        opts.faststream_counts = "100,1000"
        opts.faststream_seconds = 15.0
    opts.channel_counts = [int(x) for x in opts.channels.split(",") if x.strip()]
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    wanted = [x.strip() for x in opts.only.split(",") if x.strip()] or list(CONTENDERS)
    unknown = set(wanted) - set(CONTENDERS)
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; choose from {list(CONTENDERS)}")
    pythons: dict[str, Path] = {}
    for name in wanted:
        python = ensure_runtime(CONTENDERS[name], opts.venvs, skip_missing=opts.skip_missing)
        if python is not None:
            pythons[name] = python
    began = time.monotonic()
    digest = source_digest()
    print(
        f"channels (W7): channels {opts.channel_counts}, {opts.repeats} repeats (median), "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, eventbus at {revision()} (source {digest})"
    )
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    everything: dict[str, Any] = {}
    versions: dict[str, Any] = {}
    try:
        admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        print(
            f"redis-server {admin.info('server')['redis_version']} on {server.url}, "
            "client-output-buffer-limit pubsub 0 0 0"
        )
        for channels in opts.channel_counts:
            rows: dict[str, list[dict[str, Any]]] = {n: [] for n in pythons if n != "faststream"}
            for rep in range(opts.repeats):
                for name in rows:  # round-robin: drift hits every contender alike
                    t = time.monotonic()
                    events = run_worker(name, pythons[name], channels, server, opts)
                    clear_server(admin)
                    versions[name] = events.get("versions", {}).get("versions", {})
                    rows[name].append(events)
                    status = events.get("error", "ok")[:200]
                    print(
                        f"  .. {channels:>6,} channels {name:<12} run {rep + 1}: "
                        f"{time.monotonic() - t:5.1f}s {status}",
                        flush=True,
                    )
            if not rows:  # --only faststream
                continue
            control = run_worker("taskcost", Path(sys.executable), channels, server, opts)
            task_bytes = control.get("taskcost", {}).get("bytes_per_task")
            print_table(channels, rows, opts, task_bytes)
            everything[str(channels)] = rows
        if "faststream" in pythons:
            fs = run_worker("faststream", pythons["faststream"], 0, server, opts)
            clear_server(admin)
            versions["faststream"] = fs.get("versions", {}).get("versions", {})
            # the worker prints one "faststream" line per count: keep them all
            print_faststream([fs], opts)
            everything["faststream"] = fs
        print("\nversions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
        print(
            "burst s: N subscribes entered at once until the library confirmed all AND CLIENT LIST "
            "shows them at the server ((api s): the library alone); single p50/p99: one subscribe "
            "at a time on other channels while the burst runs; B/idle sub: VmRSS after "
            "gc.collect() with everything subscribed and idle, minus VmRSS before the first "
            "subscribe, divided by the subscriptions; lost: published - delivered in the "
            "deliveries phase; resub s: CLIENT KILL TYPE pubsub until CLIENT LIST shows every "
            "subscription again; churn: "
            "misrouted/lost-while-subscribed/leaked server subscriptions+channels, (messages "
            "checked for loss)"
        )
        if source_digest() != digest:
            print("!! eventbus/ changed during the run: the numbers mix two versions")
        print(f"total {time.monotonic() - began:.0f}s, load average {os.getloadavg()[0]:.2f}")
    finally:
        admin.close()
        server.close()
    if opts.json is not None:
        opts.json.write_text(json.dumps(everything, indent=2, default=str))


if __name__ == "__main__":
    main()
