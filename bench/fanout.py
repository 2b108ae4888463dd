"""Fan-out benchmark: one Redis channel, many local subscribers in one process.

A separate publisher process sends ``--messages`` ~100-byte JSON messages on one
channel as fast as it can (pipelined raw ``PUBLISH``, identical for every
contender); the subscriber process holds ``--subscribers`` local subscribers,
written with the library under test:

* ``eventbus``: ``@bus.on("fan", buffer=1024, overflow="block")`` handlers;
* ``eventbus-drop``: the same with ``overflow="drop_oldest"`` (drops only when a
  handler falls a whole buffer behind the reader);
* ``eventbus-defaultping``: ``eventbus`` with the default ``LivePolicy``
  (``ping_timeout=2s``, a PING behind a backlog of several seconds); the other
  eventbus rows raise it (``--ping-timeout``), so a keepalive false alarm cannot
  skew their throughput;
* ``eventbus-env``: ``eventbus``, but the publisher sends eventbus envelopes
  (id, publisher, seq: the gap tracking path) instead of bare JSON;
* ``eventbus-resp2`` (only with ``--only``): ``EventBus(protocol=2)``;
* ``raw``: one redis-py ``PubSub`` feeding one unbounded ``asyncio.Queue`` per
  subscriber (the unbounded Python ceiling);
* ``broadcaster``: broadcaster 0.3.1, ``broadcast.subscribe()`` per subscriber;
* ``faststream``: one ``@broker.subscriber`` per subscriber, time-bounded
  (``--faststream-seconds``).

Each contender runs in its own interpreter (broadcaster and FastStream in their
own venvs, created on demand), on a private redis-server with unlimited
``client-output-buffer-limit pubsub``. Run ``python bench/fanout.py --help``;
see ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

from eventbus.testing import RedisServer

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WORKER = BENCH_DIR / "_fanout_worker.py"
PREFIX = "bench"
TOPIC = "fan"
CHANNEL = f"{PREFIX}:{{{TOPIC}}}"  # eventbus's channel of live topic "fan"


# -- interpreters ------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """An interpreter for a contender: the current one, or a venv of its own."""

    name: str
    requirements: tuple[str, ...] = ()
    probe: str = ""
    """A module the venv must be able to import."""

    def python(self, venvs: Path) -> Path:
        if not self.requirements:
            return Path(sys.executable)
        return venvs / self.name / "bin" / "python"


MAIN = Runtime("main")
RUNTIMES = {
    "broadcaster": Runtime(
        "broadcaster",
        # 0.3.1 delivers nothing with redis-py 8.x: its reader task starts before
        # the subscription is recorded and returns at once. redis-py 7.1 works.
        ("broadcaster[redis]==0.3.1", "redis==7.1.*", "psutil", "anyio"),
        "broadcaster",
    ),
    "faststream": Runtime(
        "faststream", ("faststream[redis]", "psutil", "anyio"), "faststream.redis"
    ),
}


def venv_ok(python: Path, probe: str) -> bool:
    if not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", f"import {probe}"], capture_output=True, timeout=60, check=False
    )
    return check.returncode == 0


def ensure_runtime(rt: Runtime, venvs: Path, *, skip_missing: bool) -> Path | None:
    """The interpreter of ``rt``; creates its venv if needed (None: skipped)."""
    python = rt.python(venvs)
    if not rt.requirements or venv_ok(python, rt.probe):
        return python
    where = venvs / rt.name
    if skip_missing:
        print(f"!! skipping {rt.name}: no working venv at {where} (see bench/README.md)")
        return None
    print(f".. creating {where}: pip install {' '.join(rt.requirements)}", flush=True)
    base = getattr(sys, "_base_executable", sys.executable)
    try:
        subprocess.run([base, "-m", "venv", str(where)], check=True, timeout=120)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", *rt.requirements],
            check=True,
            timeout=900,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        print(f"!! skipping {rt.name}: creating its venv failed: {exc}")
        return None
    if not venv_ok(python, rt.probe):
        print(f"!! skipping {rt.name}: {rt.probe} does not import in {where}")
        return None
    return python


# -- contenders --------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    name: str
    contender: str
    """Subscriber implementation in _fanout_worker.py."""
    runtime: Runtime
    args: tuple[str, ...] = ()
    time_bounded: bool = False
    single_run: bool = False
    """Run once per subscriber count whatever ``--repeats`` says."""
    note: str = ""
    publish_args: tuple[str, ...] = ()
    default: bool = True
    """Part of a run without ``--only``."""


def variants(opts: argparse.Namespace) -> list[Variant]:
    ping = ("--ping-timeout", str(opts.ping_timeout))
    buffer = ("--buffer", str(opts.buffer))
    return [
        Variant(
            "eventbus",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block", *ping),
            note=f"buffer={opts.buffer}, overflow=block, ping_timeout={opts.ping_timeout:g}s",
        ),
        Variant(
            "eventbus-drop",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "drop_oldest", *ping),
            note=f"buffer={opts.buffer}, overflow=drop_oldest, ping_timeout={opts.ping_timeout:g}s",
        ),
        Variant(
            "eventbus-defaultping",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block"),
            single_run=True,
            note=f"buffer={opts.buffer}, overflow=block, default LivePolicy (ping_timeout=2s)",
        ),
        Variant(
            "eventbus-env",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block", *ping),
            publish_args=("--envelope",),
            note="as eventbus, but the publisher sends eventbus envelopes (seq, gap tracking)",
        ),
        Variant(
            "eventbus-otel",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block", *ping, "--otel"),
            publish_args=("--envelope",),
            default=False,
            note="as eventbus-env, with eventbus.otel (SDK, batch span processor, exports"
            " discarded): a process span per delivery",
        ),
        Variant(
            "eventbus-otel-nolive",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block", *ping, "--otel", "--otel-kinds", "durable,queue"),
            publish_args=("--envelope",),
            default=False,
            note="as eventbus-otel, with process_kinds=(durable, queue): no span per live delivery",
        ),
        Variant(
            "eventbus-resp2",
            "eventbus",
            MAIN,
            (*buffer, "--overflow", "block", *ping, "--protocol", "2"),
            default=False,
            note="as eventbus, but EventBus(protocol=2): RESP2 pub/sub frames, no push handler",
        ),
        Variant("raw", "raw", MAIN, note="redis-py PubSub -> unbounded asyncio.Queue each"),
        Variant(
            "broadcaster",
            "broadcaster",
            RUNTIMES["broadcaster"],
            note="broadcaster 0.3.1 + redis-py 7.1, unbounded queues",
        ),
        Variant(
            "faststream",
            "faststream",
            RUNTIMES["faststream"],
            ("--time-limit", str(opts.faststream_seconds)),
            time_bounded=True,
            single_run=True,
            note=f"@broker.subscriber each, logger=None, bounded to {opts.faststream_seconds:g}s",
        ),
    ]


# -- one trial ---------------------------------------------------------------------------


@dataclass
class Trial:
    variant: str
    subscribers: int
    messages: int
    ended: str = "failed"
    deliveries: int = 0
    expected: int = 0
    seconds: float = 0.0
    min_per_subscriber: int = 0
    conns: int = 0
    pubsub_conns: int = 0
    rss_ready_kib: int = 0
    peak_rss_kib: int = 0
    published: int = 0
    publish_seconds: float = 0.0
    reconnects: int | None = None
    versions: dict[str, str] = field(default_factory=dict)
    error: str = ""

    @property
    def rate(self) -> float:
        return self.deliveries / self.seconds if self.seconds > 0 else 0.0

    @property
    def losses(self) -> int:
        return self.expected - self.deliveries


class Lines:
    """The JSON lines a worker prints, read by a thread so waits can time out."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        assert proc.stdout is not None
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            line = line.strip()
            if line.startswith("{"):
                try:
                    self._q.put(json.loads(line))
                except ValueError:
                    continue
        self._q.put(None)  # EOF

    def next(self, timeout: float) -> dict[str, Any] | None:
        """The next line as a dict; None at EOF or after ``timeout`` seconds."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None


def redis_conns(pid: int, port: int) -> list[int]:
    """Local ports of ``pid``'s TCP connections to the benchmark's redis-server."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return []
    return [c.laddr.port for c in conns if c.raddr and c.raddr.port == port]


def pubsub_clients(admin: redis.Redis, local_ports: Sequence[int]) -> int:
    """How many of those connections are in pub/sub mode (CLIENT LIST sub/psub > 0)."""
    wanted = set(local_ports)
    count = 0
    for client in admin.client_list():
        port = int(str(client["addr"]).rsplit(":", 1)[1])
        if port in wanted and (int(client["sub"]) > 0 or int(client["psub"]) > 0):
            count += 1
    return count


def numsub(admin: redis.Redis) -> int:
    return int(admin.pubsub_numsub(CHANNEL)[0][1])


def wait_numsub(admin: redis.Redis, want: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if numsub(admin) == want:
            return True
        time.sleep(0.02)
    return False


class Sampler(threading.Thread):
    """Samples the subscriber's Redis connections while it runs (keeps the maximum)."""

    def __init__(self, pid: int, port: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.port = pid, port
        self.max_conns = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.25):
            self.max_conns = max(self.max_conns, len(redis_conns(self.pid, self.port)))

    def stop(self) -> None:
        self._done.set()
        self.join(5)


def stop_process(proc: subprocess.Popen[str], grace: float) -> None:
    """Let the worker exit by itself for ``grace`` seconds, then end it (by its pid)."""
    try:
        proc.wait(grace)
        return
    except subprocess.TimeoutExpired:
        pass
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def run_trial(
    v: Variant,
    python: Path,
    subscribers: int,
    server: RedisServer,
    admin: redis.Redis,
    opts: argparse.Namespace,
) -> Trial:
    trial = Trial(v.name, subscribers, opts.messages, expected=opts.messages * subscribers)
    time_limit = opts.faststream_seconds if v.time_bounded else opts.max_seconds
    cmd = [
        str(python),
        str(WORKER),
        "subscribe",
        "--contender", v.contender,
        "--url", server.url,
        "--channel", CHANNEL,
        "--prefix", PREFIX,
        "--topic", TOPIC,
        "--messages", str(opts.messages),
        "--subscribers", str(subscribers),
        "--idle-limit", str(opts.idle_limit),
        "--time-limit", str(time_limit),
        *v.args,
    ]  # fmt: skip
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True)
        sampler: Sampler | None = None
        try:
            lines = Lines(proc)
            ready = lines.next(timeout=60)
            if ready is None or ready.get("event") != "ready":
                trial.error = f"no ready line: {ready}"
                return trial
            trial.rss_ready_kib = ready["rss_ready_kib"]
            trial.versions = ready["versions"]
            if not wait_numsub(admin, ready["channel_subscriptions"], timeout=30):
                trial.error = f"channel has {numsub(admin)} subscriptions, wanted {ready}"
                return trial
            ports = redis_conns(proc.pid, server.port)
            trial.conns = len(ports)
            trial.pubsub_conns = pubsub_clients(admin, ports)
            sampler = Sampler(proc.pid, server.port)
            sampler.start()

            pub = subprocess.run(
                [sys.executable, str(WORKER), "publish", "--url", server.url,
                 "--channel", CHANNEL, "--messages", str(opts.messages),
                 "--size", str(opts.size), "--time-limit", str(opts.max_seconds),
                 *v.publish_args],
                capture_output=True, text=True, timeout=opts.max_seconds + 30, check=False,
            )  # fmt: skip
            published = next(
                (json.loads(x) for x in pub.stdout.splitlines() if x.startswith("{")), None
            )
            if published is None:
                trial.error = f"publisher failed: {pub.stderr[-500:]}"
                return trial
            trial.published = published["published"]
            trial.publish_seconds = published["seconds"]

            result = lines.next(timeout=time_limit + opts.idle_limit + 60)
            if result is None or result.get("event") != "result":
                trial.error = f"no result line: {result}"
                return trial
            trial.ended = result["ended"]
            trial.deliveries = result["deliveries"]
            trial.seconds = result["seconds"]
            trial.min_per_subscriber = result["min_per_subscriber"]
            trial.peak_rss_kib = result["peak_rss_kib"]
            trial.reconnects = result.get("reconnects")
            sampler.stop()
            trial.conns = max(trial.conns, sampler.max_conns)
            return trial
        finally:
            if sampler is not None:
                sampler.stop()
            stop_process(proc, grace=0.0 if v.time_bounded else 10.0)
            if trial.error:
                stderr.seek(0)
                trial.error += " | stderr: " + stderr.read()[-800:]
            # The next trial starts from a channel nobody listens to.
            wait_numsub(admin, 0, timeout=15)


# -- report ------------------------------------------------------------------------------


@dataclass
class Row:
    variant: Variant
    trials: list[Trial]

    @property
    def ok(self) -> list[Trial]:
        return [t for t in self.trials if not t.error]

    @property
    def rate(self) -> float:
        return statistics.median(t.rate for t in self.ok) if self.ok else 0.0

    @property
    def peak_rss(self) -> float:
        return statistics.median(t.peak_rss_kib for t in self.ok) / 1024 if self.ok else 0.0

    @property
    def ready_rss(self) -> float:
        return statistics.median(t.rss_ready_kib for t in self.ok) / 1024 if self.ok else 0.0

    @property
    def conns(self) -> int:
        return max((t.conns for t in self.ok), default=0)

    @property
    def pubsub_conns(self) -> int:
        return max((t.pubsub_conns for t in self.ok), default=0)


def fmt_int(n: float) -> str:
    return f"{n:,.0f}"


def fmt_k(n: float) -> str:
    return f"{n / 1000:,.0f}k" if n >= 10_000 else f"{n:,.0f}"


def print_table(subscribers: int, opts: argparse.Namespace, rows: list[Row]) -> None:
    expected = opts.messages * subscribers
    print()
    print(
        f"== {subscribers} subscribers x {opts.messages:,} messages "
        f"({expected:,} deliveries expected) =="
    )
    header = (
        f"{'contender':<21}{'runs':>4}  {'deliveries/s':>12}  {'(min-max)':<13}  "
        f"{'losses (each run)':<24}{'conns (pub/sub)':>15}  {'RSS ready':>9}  {'peak RSS':>9}"
        "  ended"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        v = row.variant
        if not row.ok:
            err = row.trials[0].error if row.trials else "not run"
            print(f"{v.name:<21}{len(row.trials):>4}  FAILED: {err[:300]}")
            continue
        rates = [t.rate for t in row.ok]
        spread = f"{fmt_k(min(rates))}-{fmt_k(max(rates))}" if len(rates) > 1 else ""
        if v.time_bounded:
            t = row.ok[0]
            losses = f"n/a: {t.deliveries:,} in {t.seconds:.0f}s"
        else:
            losses = ", ".join(fmt_int(t.losses) for t in row.ok)
        ended = sorted({t.ended for t in row.ok})
        reconnects = [t.reconnects for t in row.ok if t.reconnects]
        if reconnects:
            ended.append(f"reconnects {','.join(map(str, reconnects))}")
        name = v.name + ("*" if v.time_bounded else "")
        print(
            f"{name:<21}{len(row.ok):>4}  {fmt_int(row.rate):>12}  {spread:<13}  {losses:<24}"
            f"{f'{row.conns} ({row.pubsub_conns})':>15}  {row.ready_rss:>5.1f} MiB"
            f"  {row.peak_rss:>5.1f} MiB  {' '.join(ended)}"
        )


def print_ratios(subscribers: int, rows: list[Row]) -> None:
    by_name = {r.variant.name: r for r in rows if r.ok}
    eb = by_name.get("eventbus")
    if eb is None:
        return
    print(f"\n-- eventbus (block) vs the others, {subscribers} subscribers --")
    for row in rows:
        if row is eb or not row.ok or row.rate == 0:
            continue
        print(
            f"  vs {row.variant.name:<21} deliveries/s x{eb.rate / row.rate:<7.2f} "
            f"connections {eb.conns} vs {row.conns:<4} "
            f"peak RSS {eb.peak_rss:.1f} vs {row.peak_rss:.1f} MiB, "
            f"growth in the run {eb.peak_rss - eb.ready_rss:.1f} vs "
            f"{row.peak_rss - row.ready_rss:.1f} MiB"
        )
    checks: list[tuple[bool | None, str]] = []
    if (b := by_name.get("broadcaster")) is not None:
        checks.append(
            (
                eb.rate >= b.rate,
                f"deliveries/s >= broadcaster: {fmt_int(eb.rate)} vs {fmt_int(b.rate)} "
                f"(x{eb.rate / b.rate:.2f})",
            )
        )
    if (f := by_name.get("faststream")) is not None:
        checks.append(
            (eb.rate >= 100 * f.rate, f"deliveries/s >= 100x FastStream: x{eb.rate / f.rate:,.0f}")
        )
    checks.append(
        (
            eb.pubsub_conns == 1,
            f"one Redis pub/sub connection for {subscribers} subscribers: {eb.pubsub_conns}",
        )
    )
    checks.append(
        (
            None,
            f"Redis connections open in all: {eb.conns}"
            + (" (+1: the command client of the startup PING)" if eb.conns == 2 else ""),
        )
    )
    if b is not None:
        checks.append(
            (
                eb.peak_rss <= b.peak_rss,
                f"peak RSS <= broadcaster: {eb.peak_rss:.1f} vs {b.peak_rss:.1f} MiB "
                f"(at ready {eb.ready_rss:.1f} vs {b.ready_rss:.1f}: imports; growth in the run "
                f"{eb.peak_rss - eb.ready_rss:.1f} vs {b.peak_rss - b.ready_rss:.1f})",
            )
        )
    checks.append((None, f"losses: worst run lost {max(t.losses for t in eb.ok):,}"))
    if (r := by_name.get("raw")) is not None:
        checks.append((None, f"raw unbounded ceiling: eventbus reaches {eb.rate / r.rate:.0%}"))
    for ok, text in checks:
        mark = "info" if ok is None else ("PASS" if ok else "FAIL")
        print(f"  [{mark}] {text}")


def revision() -> str:
    """HEAD of the repository, and whether eventbus/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "eventbus"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (subprocess.SubprocessError, OSError):
        return "unknown"
    return head + (" + uncommitted changes in eventbus/" if dirty else "")


def source_digest() -> str:
    """A digest of eventbus's source, to notice it changing in the middle of a run."""
    digest = hashlib.sha256()
    for path in sorted((REPO_DIR / "eventbus").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# -- main --------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fan-out benchmark: eventbus vs raw redis-py, broadcaster, FastStream."
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--subscribers", default="100,10", help="comma separated counts")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per row (median); single-run rows excepted"
    )
    parser.add_argument("--faststream-seconds", type=float, default=20.0)
    parser.add_argument(
        "--only",
        default="",
        help="comma separated contenders: eventbus, eventbus-drop, eventbus-defaultping, "
        "eventbus-env, raw, broadcaster, faststream (the default: all of these), eventbus-resp2, "
        "eventbus-otel, eventbus-otel-nolive",
    )
    parser.add_argument("--skip-missing", action="store_true", help="skip a contender whose "
                        "venv is missing instead of creating it")  # fmt: skip
    parser.add_argument("--venvs", type=Path, default=REPO_DIR / ".bench-venvs")
    parser.add_argument("--size", type=int, default=100, help="message size in bytes")
    parser.add_argument("--buffer", type=int, default=1024, help="eventbus buffer per subscriber")
    parser.add_argument(
        "--ping-timeout",
        type=float,
        default=60.0,
        help="eventbus LivePolicy.ping_timeout for all eventbus rows but eventbus-defaultping",
    )
    parser.add_argument("--idle-limit", type=float, default=2.0, help="a run with no delivery "
                        "for this many seconds has ended (losses)")  # fmt: skip
    parser.add_argument("--max-seconds", type=float, default=90.0, help="hard time limit of "
                        "one untimed run")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every trial to this file")
    opts = parser.parse_args(argv)
    opts.subscriber_counts = [int(x) for x in opts.subscribers.split(",") if x.strip()]
    return opts


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    all_variants = variants(opts)
    names = [v.name for v in all_variants]
    wanted = [x.strip() for x in opts.only.split(",") if x.strip()]
    wanted = wanted or [v.name for v in all_variants if v.default]
    unknown = set(wanted) - set(names)
    if unknown:
        raise SystemExit(f"unknown contender(s) {sorted(unknown)}; choose from {names}")
    chosen = [v for v in all_variants if v.name in wanted]

    pythons: dict[str, Path] = {}
    for v in chosen:
        if v.runtime.name not in pythons:
            python = ensure_runtime(v.runtime, opts.venvs, skip_missing=opts.skip_missing)
            if python is not None:
                pythons[v.runtime.name] = python
    chosen = [v for v in chosen if v.runtime.name in pythons]

    began = time.monotonic()
    digest = source_digest()
    print(
        f"fanout: {opts.messages:,} messages of ~{opts.size} B, subscribers "
        f"{opts.subscriber_counts}, {opts.repeats} repeats (median; faststream and "
        f"eventbus-defaultping: 1 run), python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}, "
        f"eventbus at {revision()} (source {digest})"
    )
    server = RedisServer().start()
    admin = redis.Redis.from_url(server.url)
    trials: list[Trial] = []
    try:
        # A slow subscriber must not be disconnected by Redis: unlimited pub/sub buffers.
        admin.config_set("client-output-buffer-limit", "pubsub 0 0 0")
        version = admin.info("server")["redis_version"]
        print(f"redis-server {version} on {server.url}, client-output-buffer-limit pubsub 0 0 0")
        for v in chosen:
            print(f"  {v.name:<21} {v.note}")
        for subscribers in opts.subscriber_counts:
            rows = [Row(v, []) for v in chosen]
            # Round-robin over the contenders, so drift hits them all alike.
            for rep in range(opts.repeats):
                for row in rows:
                    if rep > 0 and row.variant.single_run:
                        continue
                    python = pythons[row.variant.runtime.name]
                    trial = run_trial(row.variant, python, subscribers, server, admin, opts)
                    row.trials.append(trial)
                    trials.append(trial)
                    status = trial.error[:200] if trial.error else trial.ended
                    print(
                        f"  .. {subscribers:>3} subs {row.variant.name:<21} run {rep + 1}: "
                        f"{fmt_int(trial.rate):>10}/s  {trial.deliveries:>10,} delivered "
                        f"in {trial.seconds:6.2f}s  {status}",
                        flush=True,
                    )
            print_table(subscribers, opts, rows)
            print_ratios(subscribers, rows)
        versions = {t.variant: t.versions for t in trials if t.versions}
        print("\nversions: " + "; ".join(f"{k}: {v}" for k, v in versions.items()))
        print(
            "deliveries/s: median of the runs, from the first delivery to the last one of the "
            "last subscriber; losses: expected - delivered, per run; conns: TCP connections of "
            "the subscriber process to redis-server (max sampled), (pub/sub): those in "
            "subscribe mode (CLIENT LIST); RSS: VmRSS once subscribed, VmHWM at the end; "
            "* time-bounded: its rate is what it delivered in that time"
        )
        print(f"total {time.monotonic() - began:.0f}s, load average {os.getloadavg()[0]:.2f}")
    finally:
        admin.close()
        server.close()
    if opts.json is not None:
        opts.json.write_text(json.dumps([asdict(t) for t in trials], indent=2))


if __name__ == "__main__":
    main()
