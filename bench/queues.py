"""Work queue benchmark (issue 12): enqueue and drain rates of 100,000 small jobs.

(Named ``queues.py``: a ``queue.py`` in bench/ would shadow the standard library's
``queue`` module, which redis-py imports, for every script run from bench/.)

``--jobs`` (100,000) jobs of ~``--size`` (100) bytes of JSON, ``{"n": n, "pad": ..}``,
each with a unique number. Per contender, in this order on a flushed server:

* **enqueue, one by one**: ``--tasks`` (64) asyncio tasks in one producer process,
  each enqueueing one job per call (awaited), until all are in; jobs/s = jobs /
  (first call to last reply);
* **drain, 1 worker**: that queue (the jobs already in) drained by one worker
  process; then, on a flushed server:
* **enqueue, batched**: the contender's batch API, ``--batch`` (1,000) jobs per
  call, one call after the other (arq and saq have none: their queue is filled
  one by one again, untimed);
* **drain, 4 workers**: that queue drained by four worker processes at once.

Drain: every worker process imports and connects, then says it is ready; the
clock starts when the orchestrator tells them all to go (each then starts its
library's worker) and ends at the later of the last handler call and the moment
the contender's own Redis structures show every job completed (polled every
5 ms; see ``remaining()``: for eventbus the handler's time alone until its key
layout is wired in). The handler is a no-op that records the job's number;
after the run each worker reports how many times it handled each number: lost
= never handled, duplicates = handled more than once (over all workers).

Settings, the same for every contender where the library has them:
``--concurrency`` (32) jobs in flight per worker process; the library's defaults
otherwise (arq ``poll_delay`` 0.5 s and results kept 1 h; saq's status updates
and its completed jobs kept 10 min; bullmq's completed jobs kept; bullmq's
Worker with ``socket_timeout=None``, see ``bench/delayed.py``):

* ``raw``: redis-py asyncio. Enqueue ``LPUSH q:jobs <json>`` (one: a call per
  job; batched: ``pipeline(transaction=False)`` of 1,000 ``LPUSH``); drain
  ``--concurrency`` tasks per process, each a loop of ``BLMOVE q:jobs
  q:processing:<worker> RIGHT LEFT 1``, the handler, ``LREM q:processing:<worker>
  1 <job>`` (the reliable-queue pattern: at least once);
* ``arq``: ``ArqRedis.enqueue_job("qjob", n, pad)``; ``arq.worker.Worker(max_jobs=32)``;
* ``saq``: ``Queue.enqueue("qjob", n=.., pad=..)``; ``saq.Worker(concurrency=32)``;
* ``bullmq``: the Python ``bullmq`` package, ``Queue.add`` / ``Queue.addBulk``;
  ``Worker(concurrency=32)``;
* ``eventbus``: ``bus.enqueue(Queue("q", dict), job)`` / ``bus.enqueue_many``;
  ``@bus.worker(queue, concurrency=32)``. Skipped, with the reason, while
  ``eventbus`` has no ``Queue``.

Targets: eventbus's enqueue (each mode) and drain (each worker count) at least
80% of raw's, and ahead of every peer (against a peer without a batch API, its
one-by-one rate is what its users have for batches); no job lost or duplicated.

Each process runs in the contender's interpreter (arq, saq and bullmq in their
own venvs under ``--venvs``, created on demand) against a private redis-server on
a loopback port; every process is bounded in time, the orchestrator ends one
that outlives its limit. See ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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
WORKER = BENCH_DIR / "_queue_worker.py"
RUNTIMES = {
    "main": MAIN,
    "arq": Runtime("arq", ("arq",), "arq"),
    # saq 0.26 imports typing_extensions without requiring it.
    "saq": Runtime("saq", ("saq[redis]", "typing_extensions"), "saq"),
    "bullmq": Runtime("bullmq", ("bullmq",), "bullmq"),
}
TARGET_OF_RAW = 0.8
PEERS = ("arq", "saq", "bullmq")


@dataclass(frozen=True)
class Contender:
    name: str
    runtime: str
    batch: bool
    """Has a batch enqueue API."""
    note: str


CONTENDERS = [
    Contender("raw", "main", True, "redis-py: LPUSH / pipelined LPUSH; BLMOVE + LREM loop"),
    Contender("arq", "arq", False, "enqueue_job; Worker(max_jobs=C), defaults otherwise"),
    Contender("saq", "saq", False, "Queue.enqueue; Worker(concurrency=C)"),
    Contender("bullmq", "bullmq", True, "Queue.add / addBulk; Worker(concurrency=C)"),
    Contender("eventbus", "main", True, "bus.enqueue / enqueue_many; @bus.worker(concurrency=C)"),
]


def eventbus_missing() -> str:
    """Why the eventbus rows cannot run ("" when they can)."""
    import eventbus
    from eventbus import EventBus

    if not hasattr(eventbus, "Queue"):
        return "eventbus has no Queue yet (from eventbus import Queue fails)"
    absent = [m for m in ("enqueue", "enqueue_many", "worker") if not hasattr(EventBus, m)]
    if absent:
        return f"eventbus has no Queue yet (EventBus has no {', '.join(absent)})"
    return ""


# -- measures ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    key: str
    title: str
    kind: str
    """enqueue or drain."""
    mode: str = ""
    """enqueue: one or batch."""
    workers: int = 0
    """drain: worker processes."""


def measures(opts: argparse.Namespace) -> list[Measure]:
    counts = opts.workers
    out = [Measure("enqueue-one", f"enqueue one by one, {opts.tasks} tasks", "enqueue", "one")]
    out.append(
        Measure(f"drain-{counts[0]}", f"drain, {counts[0]} worker(s)", "drain", workers=counts[0])
    )
    out.append(
        Measure("enqueue-batch", f"enqueue batched, {opts.batch} per call", "enqueue", "batch")
    )
    out += [Measure(f"drain-{w}", f"drain, {w} worker(s)", "drain", workers=w) for w in counts[1:]]
    return out


# -- the contenders' Redis structures ------------------------------------------------------


def remaining(contender: str, admin: redis.Redis, workers: int) -> int | None:
    """Jobs enqueued and not yet completed, read from the contender's keys (None: unknown).

    raw: the queue list and every processing list; arq: its queue sorted set (a job
    leaves it when it finished); saq: its ``incomplete`` sorted set (queued and
    active); bullmq: waiting, active and prioritized jobs; eventbus: not wired yet.
    """
    if contender == "raw":
        pipe = admin.pipeline(transaction=False)
        pipe.llen("q:jobs")
        for i in range(workers):
            pipe.llen(f"q:processing:{i}")
        return sum(int(x) for x in pipe.execute())
    if contender == "arq":
        return int(admin.zcard("arq:queue"))
    if contender == "saq":
        return int(admin.zcard("saq:q:incomplete"))
    if contender == "bullmq":
        pipe = admin.pipeline(transaction=False)
        pipe.llen("bull:q:wait").llen("bull:q:active").zcard("bull:q:prioritized")
        return sum(int(x) for x in pipe.execute())
    if contender == "eventbus":
        # prefix "bench", queue "q": the level-0 list and every worker's processing list
        # (unsettled jobs: acks are written in batches after the handler returned)
        pipe = admin.pipeline(transaction=False)
        pipe.llen("bench:{q}:q")
        active = list(admin.scan_iter("bench:{q}:q-active:*", count=1000))
        for key in active:
            pipe.llen(key)
        return sum(int(x) for x in pipe.execute())
    return None


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
        self.handled = 0
        """The last progress line's count (drain)."""

    def wait_for(self, event: str, timeout: float) -> dict[str, Any]:
        """Its next ``event`` line; raises with its stderr if it does not come."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self._lines.next(left)
            if line is None:
                break
            if line.get("event") == "progress":
                self.handled = line["handled"]
            if line.get("event") == event:
                return line
            if line.get("event") == "error":
                raise RuntimeError(f"{line['error']} | {self.stderr_tail()}")
        raise RuntimeError(f"no {event} within {timeout:.0f}s | {self.stderr_tail()}")

    def poll_progress(self) -> None:
        """Read the lines already there (progress); raise on an error line."""
        while (line := self._lines.next(0)) is not None:
            if line.get("event") == "progress":
                self.handled = line["handled"]
            elif line.get("event") == "error":
                raise RuntimeError(f"{line['error']} | {self.stderr_tail()}")

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


# -- trials ------------------------------------------------------------------------------


def common_args(c: Contender, url: str, opts: argparse.Namespace, limit: float) -> list[str]:
    return [
        "--contender", c.name, "--url", url, "--jobs", str(opts.jobs), "--size", str(opts.size),
        "--time-limit", str(limit),
    ]  # fmt: skip


def enqueue(
    c: Contender, python: Path, url: str, admin: redis.Redis, opts: argparse.Namespace, mode: str
) -> dict[str, Any]:
    """Fill the flushed server with the jobs: one producer process; its result."""
    admin.flushall()
    proc = Proc(
        python,
        ["enqueue", *common_args(c, url, opts, opts.max_seconds), "--mode", mode,
         "--tasks", str(opts.tasks), "--batch", str(opts.batch)],
    )  # fmt: skip
    try:
        res = proc.wait_for("result", opts.max_seconds + 60)
    finally:
        proc.close()
    out = {k: v for k, v in res.items() if k != "event"}
    out["rate"] = out["enqueued"] / out["seconds"] if out["seconds"] > 0 else 0.0
    out["stored"] = remaining(c.name, admin, 0)
    return out


def drain(
    c: Contender, python: Path, url: str, admin: redis.Redis, opts: argparse.Namespace, workers: int
) -> dict[str, Any]:
    """Drain the queue the server holds with ``workers`` processes; the run's numbers."""
    limit = opts.max_seconds
    procs: list[Proc] = []
    try:
        args = [*common_args(c, url, opts, limit + 60), "--concurrency", str(opts.concurrency)]
        if c.name == "arq" and opts.arq_poll_delay is not None:
            args += ["--poll-delay", str(opts.arq_poll_delay)]
        procs += [Proc(python, ["drain", *args, "--index", str(i)]) for i in range(workers)]
        for p in procs:
            p.wait_for("ready", 60)
        before = remaining(c.name, admin, workers)
        t_go = time.time()
        for p in procs:
            p.send({"go": 1})
        t_zero: float | None = None
        ended = "time limit"
        last_total, last_change = -1, time.monotonic()
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.005)
            for p in procs:
                p.poll_progress()
            total = sum(p.handled for p in procs)
            now = time.monotonic()
            if total != last_total:
                last_total, last_change = total, now
            left = remaining(c.name, admin, workers)
            if left == 0 and t_zero is None:
                t_zero = time.time()
            if total >= opts.jobs and (left is None or left == 0):
                ended = "complete"
                break
            if total and now - last_change > opts.idle_limit:
                ended = f"idle {opts.idle_limit:g}s"
                break
            if not total and now - last_change > 30:
                ended = "nothing handled in 30s"
                break
        time.sleep(opts.settle)  # duplicates arriving late
        for p in procs:
            p.close_stdin()
        results = [p.wait_for("result", 60) for p in procs]
    finally:
        for p in procs:
            p.close()
    counts = [0] * opts.jobs
    for r in results:
        for n, k in enumerate(base64.b64decode(r["counts"])):
            counts[n] += k
    t_last = max(r["t_last"] for r in results)
    end = max(t_last, t_zero or 0.0)
    handled = sum(r["handled"] for r in results)
    return {
        "ended": ended,
        "seconds": end - t_go,
        "rate": handled / (end - t_go) if end > t_go else 0.0,
        "handled": handled,
        "per_worker": [r["handled"] for r in results],
        # Stopped by the time limit: the jobs not handled yet are unfinished, not lost.
        "lost": None if ended == "time limit" else sum(1 for k in counts if k == 0),
        "unhandled": sum(1 for k in counts if k == 0),
        "duplicates": sum(k - 1 for k in counts if k > 1),
        "unknown": sum(r["unknown"] for r in results),
        "queued_before": before,
        "left_after": remaining(c.name, admin, workers),
        "end_by": "handler" if t_zero is None or t_last >= t_zero else "redis",
        "acked_after_handler_ms": None if t_zero is None else (t_zero - t_last) * 1000,
        "startup_ms": (min(r["t_first"] for r in results if r["t_first"]) - t_go) * 1000
        if any(r["t_first"] for r in results)
        else None,
        "stop_errors": [r["stop_error"] for r in results if r.get("stop_error")],
        "versions": results[0]["versions"],
    }


def trial(
    c: Contender, python: Path, url: str, admin: redis.Redis, opts: argparse.Namespace
) -> dict[str, dict[str, Any]]:
    """One round of a contender: every measure, in order; {measure key: result}.

    Each drain runs on the queue the enqueue before it left (the first on the
    one-by-one enqueue's, the second on the batched one's); a later drain, or one
    after a failed enqueue, fills the queue again (batched, or one by one for a
    contender without a batch API; untimed). A batched enqueue of a contender
    without a batch API is ``{"skipped": ...}``, and its queue is filled one by one.
    """
    out: dict[str, dict[str, Any]] = {}
    filled = False
    for m in measures(opts):
        try:
            if m.kind == "enqueue":
                filled = False
                if m.mode == "batch" and not c.batch:
                    out[m.key] = {"skipped": "no batch API"}
                    enqueue(c, python, url, admin, opts, "one")
                else:
                    out[m.key] = enqueue(c, python, url, admin, opts, m.mode)
                filled = True
            else:
                if not filled:
                    enqueue(c, python, url, admin, opts, "batch" if c.batch else "one")
                filled = False
                out[m.key] = drain(c, python, url, admin, opts, m.workers)
        except RuntimeError as exc:
            out[m.key] = {"error": str(exc)}
            filled = False
    return out


# -- report ------------------------------------------------------------------------------


def ok_runs(results: dict[str, list[dict[str, Any]]], name: str, key: str) -> list[dict[str, Any]]:
    return [r[key] for r in results.get(name, []) if key in r and "rate" in r[key]]


def med_rate(results: dict[str, list[dict[str, Any]]], name: str, key: str) -> float | None:
    runs = ok_runs(results, name, key)
    return statistics.median(r["rate"] for r in runs) if runs else None


def fmt_rate(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f}"


def print_tables(
    results: dict[str, list[dict[str, Any]]],
    chosen: Sequence[Contender],
    skipped: dict[str, str],
    opts: argparse.Namespace,
) -> None:
    for m in measures(opts):
        print(f"\n== {m.title}: {opts.jobs:,} jobs of ~{opts.size} B (jobs/s, median of runs) ==")
        if m.kind == "enqueue":
            header = (
                f"{'contender':<10}{'runs':>4}  {'jobs/s':>9}  {'(min-max)':<17}  {'s':>6}  "
                f"{'stored':>9}  note"
            )
        else:
            header = (
                f"{'contender':<10}{'runs':>4}  {'jobs/s':>9}  {'(min-max)':<17}  {'s':>6}  "
                f"{'lost':>8}  {'dups':>8}  {'left':>6}  {'end':>7}  {'start ms':>8}  note"
            )
        print(header)
        print("-" * len(header))
        for c in chosen:
            if c.name in skipped:
                print(f"{c.name:<10}{0:>4}  skipped: {skipped[c.name]}")
                continue
            all_runs = [r.get(m.key, {}) for r in results.get(c.name, [])]
            if any("skipped" in r for r in all_runs):
                print(f"{c.name:<10}{0:>4}  n/a: {all_runs[0]['skipped']}")
                continue
            runs = ok_runs(results, c.name, m.key)
            errors = [r["error"] for r in all_runs if "error" in r]
            if not runs:
                print(f"{c.name:<10}{len(all_runs):>4}  FAILED: {(errors or ['not run'])[0][:400]}")
                continue
            rates = [r["rate"] for r in runs]
            spread = f"{min(rates):,.0f}-{max(rates):,.0f}" if len(rates) > 1 else ""
            secs = statistics.median(r["seconds"] for r in runs)
            notes: list[str] = []
            if m.kind == "enqueue":
                stored = [r["stored"] for r in runs]
                cell = "?" if None in stored else ",".join(f"{s:,}" for s in stored)
                if not all(r["complete"] for r in runs):
                    notes.append(f"* time-bounded: {min(r['enqueued'] for r in runs):,} enqueued")
                line = (
                    f"{c.name:<10}{len(runs):>4}  {fmt_rate(statistics.median(rates)):>9}  "
                    f"{spread:<17}  {secs:>6.2f}  {cell:>9}"
                )
            else:
                ends = sorted({r["ended"] for r in runs} - {"complete"})
                if ends:
                    notes.append("ended: " + ", ".join(ends))
                bounded = [r for r in runs if r["lost"] is None]
                if bounded:
                    notes.append(
                        f"* time-bounded ({opts.max_seconds:g}s): "
                        + ", ".join(f"{r['handled']:,} handled" for r in bounded)
                    )
                left = [r["left_after"] for r in runs]
                by = sorted({r["end_by"] for r in runs})
                start = [r["startup_ms"] for r in runs if r["startup_ms"] is not None]
                stop_errors = [e for r in runs for e in r["stop_errors"]]
                if stop_errors:
                    notes.append(f"worker stop failed: {stop_errors[0][:150]}")
                if m.workers > 1:
                    notes.append("per worker " + "/".join(f"{x:,}" for x in runs[0]["per_worker"]))
                line = (
                    f"{c.name:<10}{len(runs):>4}  {fmt_rate(statistics.median(rates)):>9}  "
                    f"{spread:<17}  {secs:>6.2f}  "
                    f"{','.join('*' if r['lost'] is None else str(r['lost']) for r in runs):>8}  "
                    f"{','.join(str(r['duplicates']) for r in runs):>8}  "
                    f"{'?' if None in left else ','.join(map(str, left)):>6}  "
                    f"{'/'.join(by):>7}  "
                    f"{statistics.median(start) if start else 0:>8.0f}"
                )
            if errors:
                notes.append(f"{len(errors)} failed run(s): {errors[0][:200]}")
            print(f"{line}  {'; '.join(notes)}")
    print(
        "\nenqueue: jobs / (first call to last reply) of one producer process; stored: jobs the "
        "contender's keys hold after it ('?': not known).\ndrain: jobs / (go to the later of the "
        "last handler call and the contender's keys showing none left (end: which came last; "
        "'handler' alone where the keys are not known)); lost/dups: per run, over all workers; "
        "left: jobs not completed after the run; start ms: go to the first handler call."
    )


def print_ratios(
    results: dict[str, list[dict[str, Any]]],
    chosen: Sequence[Contender],
    skipped: dict[str, str],
    opts: argparse.Namespace,
) -> None:
    names = [c.name for c in chosen if c.name not in skipped]
    ms = measures(opts)
    print("\n-- ratios (median jobs/s of the row / of the column's contender) --")
    base = [n for n in names if n != "eventbus"]
    rows = ["eventbus"] if "eventbus" in names else []
    rows += [n for n in PEERS if n in names]  # the peers against raw, for information
    header = f"{'':<26}" + "".join(f"{'vs ' + b:>12}" for b in base)
    print(header)
    for row in rows:
        for m in ms:
            a = effective_rate(results, row, m)
            cells = []
            for b in base:
                rb = effective_rate(results, b, m)
                cells.append("" if b == row else ("-" if a is None or not rb else f"x{a / rb:.2f}"))
            print(f"{row + ' ' + m.key:<26}" + "".join(f"{x:>12}" for x in cells))
    print(
        "(a peer without a batch API is compared on batches with its one-by-one rate, "
        "what its users have)"
    )


def effective_rate(results: dict[str, list[dict[str, Any]]], name: str, m: Measure) -> float | None:
    """The row's median rate of ``m``; batch without a batch API: its one-by-one rate."""
    rate = med_rate(results, name, m.key)
    if rate is None and m.mode == "batch":
        return med_rate(results, name, "enqueue-one")
    return rate


def print_targets(
    results: dict[str, list[dict[str, Any]]],
    chosen: Sequence[Contender],
    skipped: dict[str, str],
    opts: argparse.Namespace,
) -> None:
    print("\n-- targets --")
    if "eventbus" not in {c.name for c in chosen}:
        print("  (eventbus not run)")
        return
    if "eventbus" in skipped:
        print(f"  [SKIP] eventbus: {skipped['eventbus']}")
        return
    names = {c.name for c in chosen if c.name not in skipped}
    for m in measures(opts):
        eb = effective_rate(results, "eventbus", m)
        if eb is None:
            print(f"  [FAIL] {m.key}: no successful eventbus run")
            continue
        if "raw" in names and (raw := effective_rate(results, "raw", m)):
            good = eb >= TARGET_OF_RAW * raw
            print(
                f"  [{'PASS' if good else 'FAIL'}] {m.key}: eventbus >= 80% of raw: "
                f"{eb:,.0f} vs {raw:,.0f} jobs/s ({eb / raw:.0%})"
            )
        for peer in PEERS:
            if peer not in names:
                continue
            if (rp := effective_rate(results, peer, m)) is None:
                print(f"  [info] {m.key}: eventbus vs {peer}: no successful {peer} run")
                continue
            print(
                f"  [{'PASS' if eb > rp else 'FAIL'}] {m.key}: eventbus ahead of {peer}: "
                f"{eb:,.0f} vs {rp:,.0f} jobs/s (x{eb / rp:.2f})"
            )
        if m.kind == "drain":
            runs = ok_runs(results, "eventbus", m.key)
            lost = sum(r["unhandled"] for r in runs)
            dups = sum(r["duplicates"] for r in runs)
            print(f"  [{'PASS' if lost == 0 else 'FAIL'}] {m.key}: no job lost: {lost}")
            print(f"  [{'PASS' if dups == 0 else 'FAIL'}] {m.key}: no job duplicated: {dups}")


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Work queues: enqueue and drain rates; raw redis-py, arq, saq, bullmq, eventbus"
    )
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=100, help="bytes of JSON per job")
    parser.add_argument("--tasks", type=int, default=64, help="enqueue one by one: tasks")
    parser.add_argument("--batch", type=int, default=1000, help="enqueue batched: jobs per call")
    parser.add_argument("--workers", default="1,4", help="drain: worker process counts")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="drain: jobs in flight per worker process")  # fmt: skip
    parser.add_argument("--arq-poll-delay", type=float,
                        help="arq Worker poll_delay (default: arq's, 0.5 s)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="rounds, median reported")
    parser.add_argument("--only", default="", help="comma separated: " + ",".join(
        c.name for c in CONTENDERS))  # fmt: skip
    parser.add_argument("--skip-missing", action="store_true",
                        help="do not create missing venvs: skip")  # fmt: skip
    parser.add_argument("--venvs", type=Path, default=REPO_DIR / ".bench-venvs")
    parser.add_argument("--max-seconds", type=float, default=180.0,
                        help="hard limit of one enqueue or one drain")  # fmt: skip
    parser.add_argument("--idle-limit", type=float, default=10.0,
                        help="a drain with no job handled for this long has ended")  # fmt: skip
    parser.add_argument("--settle", type=float, default=0.5,
                        help="after a drain, seconds left for duplicates to show")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every run's numbers")
    opts = parser.parse_args(argv)
    opts.workers = [int(x) for x in opts.workers.split(",") if x.strip()]
    if len(opts.workers) < 2 or min(opts.workers) < 1:
        parser.error("--workers takes two or more counts, e.g. 1,4")
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    by_name = {c.name: c for c in CONTENDERS}
    wanted = [x.strip() for x in opts.only.split(",") if x.strip()] or list(by_name)
    unknown = set(wanted) - set(by_name)
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; choose from {list(by_name)}")
    chosen = [c for c in CONTENDERS if c.name in wanted]
    skipped: dict[str, str] = {}
    pythons: dict[str, Path] = {}
    for c in chosen:
        if c.name == "eventbus" and (why := eventbus_missing()):
            skipped[c.name] = why
            continue
        if c.runtime not in pythons:
            python = ensure_runtime(RUNTIMES[c.runtime], opts.venvs, skip_missing=opts.skip_missing)
            if python is None:
                skipped[c.name] = f"no venv at {opts.venvs / c.runtime}"
                continue
            pythons[c.runtime] = python
    runnable = [c for c in chosen if c.name not in skipped]
    began = time.monotonic()
    digest = source_digest()
    print(
        f"queue: {opts.jobs:,} jobs of ~{opts.size} B, enqueue from {opts.tasks} tasks and in "
        f"batches of {opts.batch}, drain with {' and '.join(map(str, opts.workers))} worker "
        f"process(es) x {opts.concurrency} in flight; {opts.repeats} repeats (median), python "
        f"{platform.python_version()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.2f}, eventbus at {revision()} (source {digest})"
    )
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in runnable}
    try:
        print(f"redis-server {admin.info('server')['redis_version']} on {server.url}")
        for c in chosen:
            state = f"skipped: {skipped[c.name]}" if c.name in skipped else c.note
            print(f"  {c.name:<10} {state}".replace("=C", f"={opts.concurrency}"))
        for rep in range(opts.repeats):
            for c in runnable:  # round-robin: drift hits every contender alike
                t = time.monotonic()
                r = trial(c, pythons[c.runtime], server.url, admin, opts)
                results[c.name].append(r)
                print(
                    f"  .. {c.name:<10} run {rep + 1}: {time.monotonic() - t:5.1f}s "
                    + "; ".join(describe(k, v) for k, v in r.items() if not k.startswith("fill")),
                    flush=True,
                )
        print_tables(results, chosen, skipped, opts)
        print_ratios(results, chosen, skipped, opts)
        print_targets(results, chosen, skipped, opts)
        vers: dict[str, Any] = {}
        for name, runs in results.items():
            for r in runs:
                for v in r.values():
                    if "versions" in v:
                        vers[name] = v["versions"]
        print("\nversions: " + "; ".join(f"{k}: {v}" for k, v in vers.items()))
        if source_digest() != digest:
            print("!! eventbus/ changed during the run: the eventbus rows mix revisions")
        print(f"total {time.monotonic() - began:.0f}s, load average {os.getloadavg()[0]:.2f}")
    finally:
        admin.close()
        server.close()
    if opts.json is not None:
        opts.json.write_text(json.dumps(results, indent=2))


def describe(key: str, r: dict[str, Any]) -> str:
    if "error" in r:
        return f"{key} FAILED: {r['error'][:300]}"
    if "skipped" in r:
        return f"{key} n/a"
    extra = "" if "lost" not in r else f" (lost {r['lost']}, dups {r['duplicates']}, {r['ended']})"
    return f"{key} {r['rate']:,.0f}/s{extra}"


if __name__ == "__main__":
    main()
