"""Shared parts of the durable-topic benchmarks: ``publish.py``, ``consume.py``, ``latency.py``.

Two halves in one module:

* the **worker side** (payloads, the eventbus entry format, counters that a thread
  watches, JSON result lines): imported by workers running in a contender's own
  interpreter (FastStream's venv has neither eventbus nor orjson), so the module
  level imports only the standard library;
* the **orchestrator side** (rows, the round-robin runner, the private
  redis-server, tables and targets): runs in the dev venv and imports
  ``fanout.py`` (its venv machinery), ``redis`` and ``eventbus.testing`` lazily.

Every worker prints ONE ``{"event": "result", ...}`` JSON line on stdout (or an
``{"event": "error", ...}`` line), is bounded in count and in time, and stops by
itself; the orchestrator ends one that outlives its time limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
PREFIX = "bench"
"""eventbus ``prefix`` of every benchmark bus."""
GROUP = "bench"
CONSUMER = "c1"
FAMILIES = ("eventbus", "raw", "faststream", "walrus")


# == worker side (standard library only) ==================================================


def stream_key(topic: str) -> str:
    """The Redis Stream of eventbus durable topic ``topic`` (``_keys.topic_keys``)."""
    return f"{PREFIX}:{{{topic}}}:stream"


def live_channel(topic: str) -> str:
    """The pub/sub channel of eventbus live topic ``topic``."""
    return f"{PREFIX}:{{{topic}}}"


def faststream_name(name: str) -> str:
    """The same key or channel for FastStream, which reads ``{x}`` as a path parameter."""
    return name.replace("{", "").replace("}", "")


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def payloads(count: int, size: int) -> list[dict[str, Any]]:
    """``count`` JSON objects of ~``size`` bytes each once encoded: ``{"i": n, "pad": "xx.."}``."""
    out = []
    for i in range(count):
        pad = "x" * max(0, size - len(encode({"i": i, "pad": ""})))
        out.append({"i": i, "pad": pad})
    return out


def envelope_fields(payload: dict[str, Any], *, seq: int, publisher: str) -> dict[str, bytes]:
    """A stream entry exactly as eventbus's ``publish`` writes it: ``id`` and ``env``.

    ``env`` is the live envelope (wire format v1, ``_codec.Codec.encode``): no ``h``
    without headers.
    """
    event_id = uuid.uuid4().hex
    env = {
        "eventbus": 1,
        "id": event_id,
        "pub": publisher,
        "seq": seq,
        "ts": time.time_ns() // 1_000_000,
        "ct": "application/json",
        "data": payload,
    }
    return {"id": event_id.encode(), "env": encode(env)}


def require_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"refusing to use Redis at {host}: the benchmarks use 127.0.0.1 only")


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100) of an already sorted sequence."""
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def library_versions(family: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    names = {
        "eventbus": ["eventbus", "redis", "hiredis", "anyio", "orjson", "msgspec"],
        "raw": ["redis", "hiredis"],
        "faststream": ["faststream", "redis", "hiredis"],
        "walrus": ["walrus", "redis", "hiredis"],
    }[family]
    found = {"python": platform.python_version()}
    for name in names:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


class Progress:
    """A handler's counter, watched by a thread for the count, time and idle limits.

    The handler calls :meth:`hit` (a few attribute operations); the exact end time is
    taken by the call that reached the target. A thread decides when the run ended:
    a contender that holds its event loop for seconds at a time (FastStream's reader
    does) must not stretch the time limit.
    """

    def __init__(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.t_first = 0.0
        self.t_done = 0.0

    def hit(self) -> None:
        n = self.count + 1
        self.count = n
        if n == 1:
            self.t_first = time.perf_counter()
        if n == self.target:
            self.t_done = time.perf_counter()

    def watch(
        self, *, time_limit: float, idle_limit: float, start_timeout: float = 30.0
    ) -> tuple[str, float, int]:
        """Block until the run ends; return (how, end time, count at the end).

        ``complete``: the target was reached. ``time-bounded``: ``time_limit`` seconds
        passed since the first hit. ``idle``: no hit for ``idle_limit`` seconds.
        ``no-events``: nothing within ``start_timeout`` seconds.
        """
        started = time.perf_counter()
        last_count, last_change = -1, started
        while True:
            time.sleep(0.005)
            now = time.perf_counter()
            count = self.count
            if self.t_done:
                return "complete", self.t_done, self.target
            if not self.t_first:
                if now - started > start_timeout:
                    return "no-events", now, count
                continue
            if now - self.t_first >= time_limit:
                return "time-bounded", now, count
            if count != last_count:
                last_count, last_change = count, now
            elif now - last_change >= idle_limit:
                return "idle", last_change, count

    async def wait(
        self, *, time_limit: float, idle_limit: float, start_timeout: float = 30.0
    ) -> tuple[str, float, int]:
        """:meth:`watch` in a thread, so that the event loop keeps serving the handler."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[tuple[str, float, int]] = loop.create_future()

        def run() -> None:
            outcome = self.watch(
                time_limit=time_limit, idle_limit=idle_limit, start_timeout=start_timeout
            )
            loop.call_soon_threadsafe(done.set_result, outcome)

        threading.Thread(target=run, name="progress-watch", daemon=True).start()
        return await done


async def pending_count(client: Any, key: str, group: str) -> int:
    """``XPENDING key group`` (summary form): entries delivered but not acknowledged."""
    reply = await client.execute_command("XPENDING", key, group)
    return int(reply[0] if isinstance(reply, list | tuple) else reply["pending"])


async def wait_acked(client: Any, key: str, group: str, *, timeout: float) -> tuple[float, int]:
    """Poll ``XPENDING`` every 5 ms until it is 0; return (when, pending at the end)."""
    deadline = time.perf_counter() + timeout
    while True:
        pending = await pending_count(client, key, group)
        now = time.perf_counter()
        if pending == 0 or now > deadline:
            return now, pending
        await asyncio.sleep(0.005)


def worker_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments every worker takes."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--row", required=True)
    parser.add_argument("--family", choices=FAMILIES, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    return parser


def emit_result(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print a worker's result line (with its libraries' versions)."""
    emit(event="result", row=args.row, versions=library_versions(args.family), **result)


def worker_main(run: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> None:
    """Run the coroutine ``run(args)``; print the dict it returns as the result line.

    A worker whose result is known before its library has shut down may print it
    itself (:func:`emit_result`) and return None: the orchestrator then need not
    wait for the shutdown.
    """
    require_loopback(args.url)
    try:
        result = asyncio.run(run(args))
    except Exception as exc:
        emit(event="error", error=f"{type(exc).__name__}: {exc}")
        raise
    if result is not None:
        emit_result(args, result)


# == orchestrator side ====================================================================


@dataclass(frozen=True)
class Row:
    """One contender of a benchmark table."""

    name: str
    family: str
    """eventbus, raw, faststream or walrus: which interpreter runs it (walrus and raw:
    the dev venv, like eventbus; faststream: its own venv)."""
    note: str
    args: tuple[str, ...] = ()
    """Extra arguments of its worker."""
    slow: bool = False
    """Runs ``--slow-repeats`` times."""
    default: bool = True


@dataclass
class Trial:
    row: str
    run: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass
class Results:
    """Every trial of a benchmark, by row."""

    rows: list[Row]
    trials: dict[str, list[Trial]] = field(default_factory=dict)

    def ok(self, name: str) -> list[dict[str, Any]]:
        return [t.result for t in self.trials.get(name, []) if not t.error]

    def has(self, name: str) -> bool:
        return bool(self.ok(name))

    def values(self, name: str, key: str | Callable[[dict[str, Any]], float]) -> list[float]:
        get = key if callable(key) else (lambda r: float(r[key]))
        return [get(r) for r in self.ok(name)]

    def median(self, name: str, key: str | Callable[[dict[str, Any]], float]) -> float:
        vals = self.values(name, key)
        return statistics.median(vals) if vals else 0.0

    def spread(
        self, name: str, key: str | Callable[[dict[str, Any]], float], fmt: Callable[[float], str]
    ) -> str:
        vals = self.values(name, key)
        return f"{fmt(min(vals))}-{fmt(max(vals))}" if len(vals) > 1 else ""


@dataclass(frozen=True)
class Column:
    title: str
    width: int
    cell: Callable[[Results, str], str]
    left: bool = False


@dataclass
class Context:
    """What a trial needs: options, the private server, the contenders' interpreters."""

    opts: argparse.Namespace
    url: str
    admin: Any
    """A sync ``redis.Redis`` on the benchmark's server."""
    pythons: dict[str, Path]

    def python(self, row: Row) -> str:
        return str(self.pythons[row.family])


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def fmt_k(n: float) -> str:
    return f"{n / 1000:,.1f}k" if n >= 10_000 else f"{n:,.0f}"


def ratio(a: float, b: float) -> str:
    return f"x{a / b:.2f}" if b else "n/a"


def add_common_args(
    parser: argparse.ArgumentParser,
    rows: Sequence[Row],
    *,
    max_seconds: float = 60.0,
    max_help: str = "hard time limit of one run",
) -> None:
    default = ",".join(r.name for r in rows if r.default)
    extra = ",".join(r.name for r in rows if not r.default)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row (median, min-max)")
    parser.add_argument(
        "--slow-repeats", type=int, default=1, help="runs per slow row (marked 1x in the list)"
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma separated rows (default: {default})" + (f"; also: {extra}" if extra else ""),
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="skip a contender whose venv is missing instead of creating it",
    )
    parser.add_argument(
        "--venvs", type=Path, default=REPO_DIR / ".bench-venvs", help="the contenders' venvs"
    )
    parser.add_argument("--max-seconds", type=float, default=max_seconds, help=max_help)
    parser.add_argument("--json", type=Path, help="also write every run's raw numbers here")


def choose_rows(opts: argparse.Namespace, rows: Sequence[Row]) -> list[Row]:
    names = [r.name for r in rows]
    wanted = [x.strip() for x in opts.only.split(",") if x.strip()]
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"unknown row(s) {sorted(unknown)}; choose from {names}")
    if not wanted:
        return [r for r in rows if r.default]
    return [r for r in rows if r.name in wanted]


def eventbus_durable_error() -> str:
    """Why eventbus durable topics cannot run here ("" when they can)."""
    probe = "import eventbus; eventbus.Topic('x', durable=True)"
    try:
        check = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
    except (subprocess.SubprocessError, OSError) as exc:
        return str(exc)
    if check.returncode == 0:
        return ""
    return (check.stderr.strip().splitlines() or ["?"])[-1]


def interpreters(rows: Sequence[Row], opts: argparse.Namespace) -> dict[str, Path]:
    """The interpreter of each family the rows need (eventbus only if durable topics import)."""
    from fanout import RUNTIMES, ensure_runtime

    pythons: dict[str, Path] = {}
    for family in sorted({r.family for r in rows}):
        if family == "faststream":
            python = ensure_runtime(
                RUNTIMES["faststream"], opts.venvs, skip_missing=opts.skip_missing
            )
            if python is not None:
                pythons[family] = python
        elif family == "eventbus" and (why := eventbus_durable_error()):
            print(f"!! skipping the eventbus rows: durable topics do not import yet: {why}")
        elif family == "walrus" and importlib.util.find_spec("walrus") is None:
            print("!! skipping walrus: not installed in this venv (pip install -e '.[bench]')")
        else:
            pythons[family] = Path(sys.executable)
    return pythons


class Worker:
    """A worker process whose JSON lines are read by a thread (waits can time out)."""

    def __init__(self, cmd: list[str]) -> None:
        from fanout import Lines

        self._stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by close())
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._lines = Lines(self.proc)

    def next(self, timeout: float) -> dict[str, Any] | None:
        """Its next JSON line; None at its end or after ``timeout`` seconds."""
        return self._lines.next(timeout)

    def result(self, timeout: float) -> tuple[dict[str, Any], str]:
        """Wait for its result line: (the result, "") or ({}, what went wrong)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            line = self.next(left)
            if line is None:
                break
            if line.get("event") == "result":
                return line, ""
            if line.get("event") == "error":
                return {}, f"{line['error']} | stderr: {self.stderr_tail()}"
        return {}, f"no result within {timeout:.0f}s | stderr: {self.stderr_tail()}"

    def stderr_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read()[-600:]

    def close(self, grace: float = 10.0) -> None:
        """Let it exit by itself for ``grace`` seconds, then end it (by its pid)."""
        from fanout import stop_process

        stop_process(self.proc, grace)
        self._stderr.close()


def run_worker(cmd: list[str], timeout: float) -> tuple[dict[str, Any], str]:
    """Start a worker, wait for its result line, then for its exit (bounded)."""
    worker = Worker(cmd)
    try:
        return worker.result(timeout)
    finally:
        worker.close()


def print_table(title: str, results: Results, columns: Sequence[Column], footer: str) -> None:
    print(f"\n== {title} ==")
    header = f"{'contender':<22}{'runs':>4}" + "".join(
        f"  {c.title:<{c.width}}" if c.left else f"  {c.title:>{c.width}}" for c in columns
    )
    print(header)
    print("-" * len(header))
    for row in results.rows:
        trials = results.trials.get(row.name, [])
        bounded = any(r.get("time_bounded") for r in results.ok(row.name))
        name = row.name + ("*" if bounded else "")
        if not results.has(row.name):
            err = trials[0].error if trials else "not run"
            print(f"{name:<22}{len(trials):>4}  FAILED: {err[:400]}")
            continue
        cells = "".join(
            f"  {c.cell(results, row.name):<{c.width}}"
            if c.left
            else f"  {c.cell(results, row.name):>{c.width}}"
            for c in columns
        )
        print(f"{name:<22}{len(results.ok(row.name)):>4}{cells}")
    print(footer)


Check = tuple[bool | None, str]


def print_checks(title: str, checks: Sequence[Check]) -> None:
    print(f"\n-- {title} --")
    for ok, text in checks:
        mark = "info" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  [{mark}] {text}")


def run_bench(
    *,
    name: str,
    header: str,
    opts: argparse.Namespace,
    rows: Sequence[Row],
    trial: Callable[[Context, Row, int], Trial],
    describe: Callable[[Trial], str],
    report: Callable[[Results], None],
    setup: Callable[[Any], None] = lambda admin: None,
) -> None:
    """Resolve the interpreters, start a private redis-server, run the rows round-robin.

    Each row runs ``--repeats`` times (``--slow-repeats`` for a slow one); the rows
    take turns, so drift on a noisy machine hits them alike. ``trial`` runs one,
    ``describe`` is its progress line, ``report`` prints the tables and targets.
    """
    import redis
    from fanout import revision, source_digest

    from eventbus.testing import RedisServer

    chosen = choose_rows(opts, rows)
    pythons = interpreters(chosen, opts)
    chosen = [r for r in chosen if r.family in pythons]
    if not chosen:
        raise SystemExit("nothing to run")
    digest = source_digest()
    began = time.monotonic()
    print(
        f"{name}: {header}; {opts.repeats} repeats (slow rows: {opts.slow_repeats}), "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}, eventbus at {revision()} (source {digest})"
    )
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    results = Results(list(chosen))
    try:
        setup(admin)
        version = admin.info("server")["redis_version"]
        print(f"redis-server {version} on {server.url}")
        for row in chosen:
            runs = f"{opts.slow_repeats if row.slow else opts.repeats}x"
            print(f"  {row.name:<22}{runs:>3}  {row.note}")
        ctx = Context(opts, server.url, admin, pythons)
        for rep in range(max(opts.repeats, opts.slow_repeats)):
            for row in chosen:
                if rep >= (opts.slow_repeats if row.slow else opts.repeats):
                    continue
                admin.flushall()
                t = trial(ctx, row, rep + 1)
                results.trials.setdefault(row.name, []).append(t)
                status = f"FAILED: {t.error[:300]}" if t.error else describe(t)
                print(f"  .. {row.name:<22} run {rep + 1}: {status}", flush=True)
        report(results)
        versions = {
            row.family: results.ok(row.name)[0].get("versions", {})
            for row in chosen
            if results.has(row.name)
        }
        print("\nversions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
        if source_digest() != digest:
            print("!! eventbus/ changed during the run: the eventbus rows mix revisions")
        print(f"total {time.monotonic() - began:.0f}s, load average {os.getloadavg()[0]:.2f}")
    finally:
        admin.close()
        server.close()
    if opts.json is not None:
        doc = {r: [asdict(t) for t in ts] for r, ts in results.trials.items()}
        opts.json.write_text(json.dumps(doc, indent=2))
