"""Delayed events benchmark (W5, issue 11): how late do scheduled events arrive?

``--events`` (20,000) events are scheduled due uniformly over ``--span`` (2 s),
the first ``--lead`` (1 s) after scheduling starts, so the scheduling itself is
not measured as lateness (the table says how many scheduling calls returned
after their event was due). The contender releases them and a consumer in
another process receives them; lateness = the consumer's ``time.time()`` at
receipt minus the due time carried in the payload (epoch ms, same machine).
Each event carries a unique number: lost (not received within ``--grace`` s
after the last due time) and duplicates are counted. Medians over ``--repeats``.

Rows:

* ``raw``: sorted set (ZADD member=payload score=due ms) + one mover process
  running a Lua script every 10 ms (due members by the script's ``TIME``, at most
  500 per call, XADD then ZREM) + a consumer process (XREADGROUP BLOCK, XACK);
* ``arq`` (defaults) and ``arq-poll50`` (``poll_delay=0.05``): ``enqueue_job`` with
  ``_defer_until``, an arq ``Worker`` process whose job records the receipt;
* ``bullmq``: the Python ``bullmq`` package, ``Queue.add(..., {"delay": ms})``, a
  ``Worker`` process (default ``concurrency`` 1; its connection with ``socket_timeout=None``,
  as redis-py 7 had: redis-py 8's 5 s read timeout wedges the Worker's BZPOPMIN);
* ``eventbus-1``, ``eventbus-3``: ``bus.publish(topic, ..., at=...)`` on a durable
  topic from a bus without scheduler, 1 or 3 scheduler processes
  (``EventBus(scheduler=True)``), a consumer process (``@bus.on(topic, group=...)``).
  Skipped while ``EventBus.publish`` takes no ``delay``/``at``.

``--w5b``: one million events scheduled (raw, eventbus): Redis memory per
scheduled event and the release rate of the backlog once all are due.

Each process runs in the contender's interpreter (arq and bullmq in their own
venvs under ``--venvs``, created on demand) against a private redis-server on a
loopback port. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from eventbus.testing import RedisServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout import (  # bench/ is not a package: imported from its directory
    MAIN,
    Lines,
    Runtime,
    ensure_runtime,
    revision,
    source_digest,
    stop_process,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKER = BENCH_DIR / "_delayed_worker.py"
RUNTIMES = {
    "main": MAIN,
    "arq": Runtime("arq", ("arq",), "arq"),
    "bullmq": Runtime("bullmq", ("bullmq",), "bullmq"),
}
TARGET_P99 = 0.010  # seconds


@dataclass(frozen=True)
class Row:
    name: str
    family: str
    """raw, arq, bullmq or eventbus: the code path in _delayed_worker.py."""
    runtime: str
    releasers: int = 0
    """Separate release processes (raw mover, eventbus schedulers)."""
    consumer_args: tuple[str, ...] = ()
    lead: float | None = None
    """Seconds from the start of scheduling to the first due time (None: --lead)."""
    note: str = ""


def rows(opts: argparse.Namespace) -> list[Row]:
    if opts.lead is None:
        opts.lead = max(2.0, 1.0 + opts.events / 4000)
    slow = opts.slow_lead
    if slow is None:  # they schedule about 2,000-2,500/s here: leave them room for it
        slow = max(opts.lead, 1.0 + opts.events / 1800)
    return [
        Row("raw", "raw", "main", 1, note="ZSET + Lua mover every 10 ms, XREADGROUP consumer"),
        Row("arq", "arq", "arq", lead=slow, note="arq defaults (poll_delay 0.5 s, max_jobs 10)"),
        Row(
            "arq-poll50",
            "arq",
            "arq",
            consumer_args=("--poll-delay", "0.05"),
            lead=slow,
            note="arq, poll_delay=0.05",
        ),
        Row(
            "bullmq",
            "bullmq",
            "bullmq",
            lead=slow,
            note="bullmq Worker, concurrency 1 (default), socket_timeout None",
        ),
        Row("eventbus-1", "eventbus", "main", 1, note="1 scheduler process"),
        Row("eventbus-3", "eventbus", "main", 3, note="3 scheduler processes"),
    ]


def eventbus_missing() -> str:
    """Why the eventbus rows cannot run ("" when they can)."""
    from eventbus import EventBus

    params = inspect.signature(EventBus.publish).parameters
    if "delay" not in params and "at" not in params:
        return "eventbus has no delay= yet (EventBus.publish takes no delay/at)"
    if "scheduler" not in inspect.signature(EventBus).parameters:
        return "eventbus has no scheduler= yet (EventBus(scheduler=True))"
    return ""


# -- processes ---------------------------------------------------------------------------


class Proc:
    """A worker steered through its stdin; its JSON lines are read by a thread."""

    def __init__(self, python: Path, args: list[str]) -> None:
        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._lines = Lines(self.proc)

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """Its next ``event`` line; raises with its stderr if it does not come."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self._lines.next(left)
            if line is None:
                break
            if line.get("event") == event:
                return line
            if line.get("event") == "error":
                raise RuntimeError(f"{line['error']} | {self.stderr_tail()}")
        raise RuntimeError(f"no {event} within {timeout:.0f}s | {self.stderr_tail()}")

    def send(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [x for x in self._stderr.read().splitlines() if x.strip()]
        return " / ".join(lines[-4:])[-500:]

    def close(self, grace: float = 10.0) -> None:
        self.close_stdin()
        stop_process(self.proc, grace)
        self._stderr.close()


# -- one W5 trial ------------------------------------------------------------------------


def trial(
    row: Row, python: Path, url: str, admin: redis.Redis, opts: argparse.Namespace
) -> dict[str, Any]:
    """One run of a row: its result dict (``error`` when it failed)."""
    admin.flushall()
    lead = opts.lead if row.lead is None else row.lead
    limit = lead + opts.span + opts.grace + 120
    common = ["--contender", row.family, "--url", url, "--time-limit", str(limit)]
    procs: list[Proc] = []
    out: dict[str, Any] = {}
    try:
        consumer = Proc(
            python,
            ["consume", *common, "--events", str(opts.events), "--grace", str(opts.grace),
             *row.consumer_args],
        )  # fmt: skip
        procs.append(consumer)
        releasers = [Proc(python, ["release", *common]) for _ in range(row.releasers)]
        procs += releasers
        for p in [consumer, *releasers]:
            p.wait_for("ready", 60)
        first_due_ms = round((time.time() + lead) * 1000)
        span_ms = round(opts.span * 1000)
        consumer.send({"first_due_ms": first_due_ms, "span_ms": span_ms})
        publisher = Proc(
            python,
            ["publish", *common, "--events", str(opts.events), "--first-due-ms",
             str(first_due_ms), "--span-ms", str(span_ms)],
        )  # fmt: skip
        procs.append(publisher)
        pub = publisher.wait_for("result", limit)
        out["scheduling_s"] = pub["seconds"]
        out["scheduled_late"] = pub["scheduled_late"]
        out["all_before_first_due"] = pub["last_done"] * 1000 <= first_due_ms
        out["last_done_vs_first_due"] = pub["last_done"] - first_due_ms / 1000
        left = first_due_ms / 1000 + opts.span + opts.grace - time.time()
        res = consumer.wait_for("result", max(0.0, left) + 60)
        out.update({k: v for k, v in res.items() if k != "event"})
        for p in releasers:
            p.close_stdin()
        out["releasers"] = [p.wait_for("result", 30) for p in releasers]
        if row.family == "eventbus":
            out.update(release_lateness(admin))
    except RuntimeError as exc:
        out["error"] = str(exc)
    finally:
        for p in procs:
            p.close()
    return out


def release_lateness(admin: redis.Redis) -> dict[str, float]:
    """eventbus: the releases alone, without the consumer's part: each stream entry's
    time (stamped by Redis when the release script wrote it) minus its due time
    (its ``t`` field), in seconds; ``release_p50``/``release_p99``/``release_max``."""
    late: list[float] = []
    start = "-"
    for _ in range(1_000):  # 100 pages of 1,000: bounded
        page = admin.xrange("bench:{w5.events}:stream", min=start, count=1_000)
        for entry_id, fields in page:
            due = fields.get(b"t")
            if due is not None:
                late.append((int(entry_id.split(b"-")[0]) - int(due)) / 1000)
        if len(page) < 1_000:
            break
        start = "(" + page[-1][0].decode()
    if not late:
        return {}
    late.sort()
    return {
        "release_p50": statistics.median(late),
        "release_p99": late[min(len(late) - 1, int(len(late) * 0.99))],
        "release_max": late[-1],
    }


# -- W5b ---------------------------------------------------------------------------------


def released(admin: redis.Redis) -> int:
    """Entries ever added to the streams of this server (trimming does not lower it)."""
    total = 0
    for key in admin.scan_iter(_type="stream", count=1000):
        total += int(admin.xinfo_stream(key)["entries-added"])
    return total


def backlog(
    family: str, python: Path, url: str, admin: redis.Redis, opts: argparse.Namespace
) -> dict[str, Any]:
    admin.flushall()
    events = opts.w5b_events
    releasers = 1 if family == "raw" else opts.w5b_schedulers
    common = ["--contender", family, "--url", url, "--time-limit", str(opts.w5b_limit)]
    out: dict[str, Any] = {"events": events, "releasers": releasers}
    procs: list[Proc] = []
    try:
        before = int(admin.info("memory")["used_memory"])
        pub = Proc(python, ["backlog", *common, "--events", str(events)])
        procs.append(pub)
        res = pub.wait_for("result", opts.w5b_limit + 30)
        out["scheduling_s"] = res["seconds"]
        after = int(admin.info("memory")["used_memory"])
        out["bytes_per_event"] = (after - before) / events
        out["released_before_start"] = released(admin)
        t_spawn = time.monotonic()
        procs += [Proc(python, ["release", *common]) for _ in range(releasers)]
        for p in procs[1:]:
            p.wait_for("ready", 60)
        t_ready = time.monotonic()
        at_ready = released(admin)
        deadline = t_ready + opts.w5b_limit
        count = at_ready
        while count < events and time.monotonic() < deadline:
            time.sleep(0.02)
            count = released(admin)
        t_done = time.monotonic()
        out.update(
            released=count,
            released_at_ready=at_ready,
            startup_s=t_ready - t_spawn,
            release_s=t_done - t_ready,
            rate=(count - at_ready) / (t_done - t_ready) if t_done > t_ready else None,
            complete=count >= events,
        )
    except RuntimeError as exc:
        out["error"] = str(exc)
    finally:
        for p in procs:
            p.close()
    return out


def print_backlog(results: dict[str, dict[str, Any]]) -> None:
    print("\n== W5b: a backlog of scheduled events ==")
    for name, r in results.items():
        if "skipped" in r:
            print(f"  {name:<10} skipped: {r['skipped']}")
            continue
        if "error" in r:
            print(f"  {name:<10} FAILED: {r['error'][:400]}")
            continue
        rate = r.get("rate")
        print(
            f"  {name:<10} {r['events']:,} scheduled in {r['scheduling_s']:.1f}s: "
            f"{r['bytes_per_event']:.0f} B of Redis memory per scheduled event; "
            f"{r['releasers']} release process(es): {r['released']:,} released in "
            f"{r['release_s']:.2f}s after ready = "
            f"{'-' if rate is None else f'{rate:,.0f}'}/s"
            + ("" if r["complete"] else f" (INCOMPLETE within {r['release_s']:.0f}s)")
            + (
                f"; {r['released_at_ready']:,} already released while starting "
                f"({r['startup_s']:.2f}s)"
                if r["released_at_ready"]
                else ""
            )
            + (
                f"; !! {r['released_before_start']:,} in a stream before any releaser ran"
                if r["released_before_start"]
                else ""
            )
        )


# -- report ------------------------------------------------------------------------------


def med(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def ms(v: float | None, lost_any: bool = False) -> str:
    if v is None:
        return ">grace" if lost_any else "-"
    return f"{v * 1000:,.1f}"


def print_table(
    results: dict[str, list[dict[str, Any]]], skipped: dict[str, str], opts: argparse.Namespace
) -> None:
    print(
        f"\n== W5: {opts.events:,} delayed events due over {opts.span:g}s, lateness in ms "
        f"(medians of runs; lost = not received {opts.grace:g}s after the last due time) =="
    )
    header = (
        f"{'row':<12}{'runs':>4}  {'p50':>9}  {'p99':>9}  {'max':>9}  {'lost':>12}  "
        f"{'dups':>7}  {'sched s':>7}  {'sched late':>10}  note"
    )
    print(header)
    print("-" * len(header))
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            err = runs[0]["error"] if runs else "?"
            print(f"{name:<12}{len(runs):>4}  FAILED: {err[:400]}")
            continue
        lost = [r["lost"] for r in ok]
        any_lost = any(lost)
        p50 = med([r["p50"] for r in ok]) if all(r["p50"] is not None for r in ok) else None
        p99 = med([r["p99"] for r in ok]) if all(r["p99"] is not None for r in ok) else None
        mx = med([r["max"] for r in ok]) if all(r["max"] is not None for r in ok) else None
        notes = []
        if any_lost:
            rp99 = med([r["received_p99"] for r in ok])
            notes.append(f"p99 of the received only: {ms(rp99)}")
        if not all(r["all_before_first_due"] for r in ok):
            worst = max(r["last_done_vs_first_due"] for r in ok)
            notes.append(f"scheduling ended {worst:.2f}s after the first due time")
        early = sum(r["early"] for r in ok)
        if early:
            notes.append(f"{early} received before due")
        print(
            f"{name:<12}{len(ok):>4}  {ms(p50, any_lost):>9}  {ms(p99, any_lost):>9}  "
            f"{ms(mx, any_lost):>9}  {','.join(map(str, lost)):>12}  "
            f"{','.join(str(r['duplicates']) for r in ok):>7}  "
            f"{med([r['scheduling_s'] for r in ok]):>7.2f}  "
            f"{','.join(str(r['scheduled_late']) for r in ok):>10}  {'; '.join(notes)}"
        )
        for r in runs:
            if "error" in r:
                print(f"    !! {name}: {r['error'][:400]}")
    for name, why in skipped.items():
        print(f"{name:<12}   0  skipped: {why}")
    print(
        "lateness: consumer's time.time() at receipt - the due time in the payload, over all "
        "events (a lost event counts as infinitely late: '>grace'); lost/dups: per run; "
        "sched s: time to schedule all (before the first due time unless the note says "
        "otherwise); sched late: scheduling calls that returned after their event was due"
    )
    print_targets(results, skipped)


def print_targets(results: dict[str, list[dict[str, Any]]], skipped: dict[str, str]) -> None:
    print("\n-- targets --")
    for name in ("eventbus-1", "eventbus-3"):
        if name in skipped:
            print(f"  [SKIP] {name}: {skipped[name]}")
            continue
        if name not in results:
            continue
        ok = [r for r in results[name] if "error" not in r]
        if not ok:
            print(f"  [FAIL] {name}: no successful run")
            continue
        p99s = [r["p99"] for r in ok]
        p99 = med(p99s) if all(v is not None for v in p99s) else None
        lost = sum(r["lost"] for r in ok)
        dups = sum(r["duplicates"] for r in ok)
        early = sum(r["early"] for r in ok)
        for good, text in (
            (early == 0, f"none received before its due time: {early}"),
            (p99 is not None and p99 < TARGET_P99, f"p99 lateness < 10 ms: {ms(p99, True)} ms"),
            (lost == 0, f"zero lost: {lost}"),
            (dups == 0, f"zero duplicates: {dups}"),
        ):
            print(f"  [{'PASS' if good else 'FAIL'}] {name}: {text}")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="W5 delayed events: lateness, lost and duplicates; raw, arq, bullmq, eventbus."
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--span", type=float, default=2.0, help="seconds the due times span")
    parser.add_argument("--lead", type=float, help="scheduling start to first due (default: "
                        "2 s, or 1 s + 1 s per 4,000 events when more: the scheduling of a "
                        "loaded machine must not count as lateness)")  # fmt: skip
    parser.add_argument("--slow-lead", type=float, help="the lead of arq and bullmq, who "
                        "schedule slower (default: 1 s + 1 s per 1,800 events)")  # fmt: skip
    parser.add_argument("--grace", type=float, default=30.0,
                        help="a row's time limit after the last due time")  # fmt: skip
    parser.add_argument("--repeats", type=int, help="runs per row, median (3; --quick: 1)")
    parser.add_argument("--only", default="", help="comma separated rows")
    parser.add_argument("--skip-missing", action="store_true")
    parser.add_argument("--venvs", type=Path, default=REPO_DIR / ".bench-venvs")
    parser.add_argument("--quick", action="store_true", help="5,000 events, 1 run, grace 15 s")
    parser.add_argument("--w5b", action="store_true", help="also the 1M backlog (W5b)")
    parser.add_argument("--w5b-events", type=int, default=1_000_000)
    parser.add_argument("--w5b-schedulers", type=int, default=1)
    parser.add_argument("--w5b-limit", type=float, default=180.0,
                        help="bound of scheduling, and of releasing, the backlog")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every run's numbers")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.events = 5_000 if opts.events == 20_000 else opts.events
        opts.grace = 15.0 if opts.grace == 30.0 else opts.grace
    if opts.repeats is None:
        opts.repeats = 1 if opts.quick else 3
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    all_rows = {r.name: r for r in rows(opts)}
    wanted = [x.strip() for x in opts.only.split(",") if x.strip()] or list(all_rows)
    unknown = set(wanted) - set(all_rows)
    if unknown:
        raise SystemExit(f"unknown row(s) {sorted(unknown)}; choose from {list(all_rows)}")
    chosen = [all_rows[n] for n in wanted]
    skipped: dict[str, str] = {}
    why = eventbus_missing()
    pythons: dict[str, Path] = {}
    for row in chosen:
        if row.family == "eventbus" and why:
            skipped[row.name] = why
            continue
        if row.runtime not in pythons:
            python = ensure_runtime(
                RUNTIMES[row.runtime], opts.venvs, skip_missing=opts.skip_missing
            )
            if python is None:
                skipped[row.name] = f"no venv at {opts.venvs / row.runtime}"
                continue
            pythons[row.runtime] = python
    runnable = [r for r in chosen if r.name not in skipped]
    began = time.monotonic()
    digest = source_digest()
    print(
        f"delayed (W5): {opts.events:,} events over {opts.span:g}s, {opts.repeats} repeats "
        f"(median), python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, eventbus at {revision()} (source {digest})"
    )
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    results: dict[str, list[dict[str, Any]]] = {r.name: [] for r in runnable}
    w5b: dict[str, dict[str, Any]] = {}
    try:
        print(f"redis-server {admin.info('server')['redis_version']} on {server.url}")
        for row in chosen:
            lead = opts.lead if row.lead is None else row.lead
            state = f"skipped: {skipped[row.name]}" if row.name in skipped else f"lead {lead:.1f}s"
            print(f"  {row.name:<12} {row.note} ({state})")
        for rep in range(opts.repeats):
            for row in runnable:  # round-robin: drift hits every row alike
                t = time.monotonic()
                r = trial(row, pythons[row.runtime], server.url, admin, opts)
                results[row.name].append(r)
                status = r.get("error", "")[:300] or (
                    f"p99 {ms(r['p99'], bool(r['lost']))} ms, lost {r['lost']}, "
                    f"dups {r['duplicates']}"
                    + (
                        f" (releases alone: p50 {ms(r['release_p50'])} ms, p99"
                        f" {ms(r['release_p99'])} ms)"
                        if "release_p99" in r
                        else ""
                    )
                )
                print(
                    f"  .. {row.name:<12} run {rep + 1}: {time.monotonic() - t:5.1f}s {status}",
                    flush=True,
                )
        print_table(results, skipped, opts)
        if opts.w5b:
            for family in ("raw", "eventbus"):
                if family == "eventbus" and why:
                    w5b[family] = {"skipped": why}
                    continue
                print(f"  .. W5b {family}: {opts.w5b_events:,} events", flush=True)
                w5b[family] = backlog(family, Path(sys.executable), server.url, admin, opts)
            print_backlog(w5b)
        vers: dict[str, Any] = {}
        for name, runs in results.items():
            for r in runs:
                if "versions" in r:
                    vers[all_rows[name].family] = r["versions"]
        print("\nversions: " + "; ".join(f"{k}: {v}" for k, v in vers.items()))
        if source_digest() != digest:
            print("!! eventbus/ changed during the run: the eventbus rows mix revisions")
        print(f"total {time.monotonic() - began:.0f}s, load average {os.getloadavg()[0]:.2f}")
    finally:
        admin.close()
        server.close()
    if opts.json is not None:
        opts.json.write_text(json.dumps({"w5": results, "w5b": w5b}, indent=2))


if __name__ == "__main__":
    main()
