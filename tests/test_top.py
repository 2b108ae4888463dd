"""``eventbus top`` looked at as a person would: the console script runs under a
pseudo-terminal (its window size set), against the session's private
redis-server, while this test publishes to a durable topic that a group consumes
and enqueues jobs that a worker takes; the screen is read back (ANSI stripped)
until it shows them moving, then ``q`` (or Ctrl-C) must end it with status 0 and
the terminal's settings restored.

And the per-process reports (``{prefix}:procs``) that top's process panel shows.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Queue, Topic
from eventbus._cli._top import History, sparkline
from eventbus._keys import process_reports
from eventbus._procs import process_field, read_reports
from tests.helpers import control_client, wait_until
from tests.test_cli import COMMAND, _env

orders: Topic[dict[str, int]] = Topic("orders", dict[str, int], durable=True)
thumbs: Queue[dict[str, int]] = Queue("thumbs", dict[str, int], priorities=2)
ticks: Topic[dict[str, int]] = Topic("ticks", dict[str, int])

_ANSI = re.compile(
    rb"\x1b(\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78])"
)


class Screen:
    """``eventbus top`` in a pseudo-terminal of ``rows`` x ``cols``."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 60, cols: int = 180):
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self.settings = termios.tcgetattr(slave)
        self.slave = slave

        def controlling_terminal() -> None:  # in the child, after setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
            preexec_fn=controlling_terminal,  # exec follows at once
        )
        self.raw = b""

    def pump(self, timeout: float = 0.1) -> None:
        """Read what the program wrote (waiting up to ``timeout`` for it)."""
        while True:
            ready, _, _ = select.select([self.master], [], [], timeout)
            if not ready:
                return
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program exited and the slave side closed
                return
            if not chunk:
                return
            self.raw += chunk
            timeout = 0

    def frame(self) -> str:
        """The last full screen drawn (rich's live display starts each at home)."""
        last = self.raw.rsplit(b"\x1b[H", 1)[-1]
        return _ANSI.sub(b"", last).decode("utf-8", "replace")

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)
        os.close(self.slave)


@contextmanager
def top_screen(redis_url: str, prefix: str, *args: str) -> Iterator[Screen]:
    env = _env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=prefix, TERM="xterm-256color")
    env.pop("COLUMNS", None)  # the terminal's size decides
    screen = Screen([*COMMAND, "top", *args], env)
    try:
        yield screen
    finally:
        screen.close()


@asynccontextmanager
async def traffic(bus: EventBus) -> AsyncIterator[None]:
    """Publish to ``orders`` (consumed by group ``billing``), enqueue ``thumbs``
    jobs (taken by a slow worker) and publish to live ``ticks`` (whose handler
    blocks, so its buffer of 2 drops) every 20 ms, at most 3000 of each, while inside."""

    @bus.on(orders, group="billing")
    async def bill(event: dict[str, int]) -> None:
        pass

    @bus.worker(thumbs, concurrency=1)
    async def thumb(job: dict[str, int]) -> None:
        await anyio.sleep(0.05)

    stuck = anyio.Event()

    @bus.on(ticks, buffer=2, overflow="drop_oldest")
    async def slow(event: dict[str, int]) -> None:
        await stuck.wait()

    async def feed() -> None:
        for n in range(3000):
            await bus.publish(orders, {"n": n})
            await bus.enqueue(thumbs, {"n": n}, priority=n % 2)
            await bus.publish(ticks, {"n": n})
            await anyio.sleep(0.02)

    async with bus, anyio.create_task_group() as tg:
        tg.start_soon(feed)
        try:
            yield
        finally:
            stuck.set()
            tg.cancel_scope.cancel()


def _moving(text: str) -> bool:
    """The screen shows the topic with a non-zero publish rate, the group and the queue."""
    row = next((line for line in text.splitlines() if line.strip().startswith("orders")), "")
    rate = re.search(r"(\d+(?:\.\d+)?)/s", row)
    return (
        rate is not None
        and float(rate[1]) > 0
        and "billing" in text
        and "thumbs" in text
        and "Processes" in text
    )


async def _screen_until(screen: Screen, predicate: Any, timeout: float) -> None:
    def check() -> bool:
        screen.pump()
        return bool(predicate(screen.frame()))

    try:
        await wait_until(lambda: anyio.to_thread.run_sync(check), timeout=timeout)
    except TimeoutError:
        pytest.fail(f"the screen never showed it; last frame:\n{screen.frame()}")


async def _exits(screen: Screen, within: float) -> float:
    """Seconds until the program exited (fails after ``within``)."""
    start = time.monotonic()
    await wait_until(
        lambda: anyio.to_thread.run_sync(
            lambda: (screen.pump(), screen.proc.poll())[1] is not None
        ),
        timeout=within,
    )
    return time.monotonic() - start


async def test_top_shows_a_topic_moving_and_quits_on_q(bus_factory: Any, redis_url: str) -> None:
    bus = bus_factory(report_every=0.5, shutdown_grace=2)
    async with traffic(bus):
        with top_screen(redis_url, bus.prefix, "--interval", "0.5") as screen:
            await _screen_until(screen, _moving, timeout=20)

            def drops_shown(text: str) -> bool:
                # This process's report, and its slow subscriber's row with drops.
                me = next((ln for ln in text.splitlines() if process_field() in ln), "")
                sub = next((ln for ln in text.splitlines() if "ticks (" in ln), "")
                cells = sub.rpartition(")")[2].split()  # delivered, dropped, gaps, buffered
                return bool(me) and len(cells) >= 4 and int(cells[1]) > 0 and cells[3] == "2/2"

            await _screen_until(screen, drops_shown, timeout=10)

            def member_shown(text: str) -> bool:
                # The process's group member: its topic, group, name and handled count.
                row = next((ln for ln in text.splitlines() if "orders/billing (" in ln), "")
                cells = row.rpartition(")")[2].split()  # handled, failed
                return len(cells) >= 2 and int(cells[0]) > 0

            await _screen_until(screen, member_shown, timeout=10)
            text = screen.frame()
            assert "Queues" in text
            assert re.search(r"thumbs\s+\d+ \(\d+/\d+\)", text)  # waiting (per priority)
            assert "▁" in text or "█" in text or any(b in text for b in "▂▃▄▅▆▇")
            screen.type(b"q")
            took = await _exits(screen, within=5)
            assert screen.proc.returncode == 0, screen.frame()
            assert took < 3
            # The terminal is as it was: echo and line mode back, the main screen.
            assert termios.tcgetattr(screen.slave)[3] == screen.settings[3]
            tail = screen.raw[screen.raw.rfind(b"\x1b[H") :]
            assert b"\x1b[?1049l" in tail  # left the alternate screen
            assert b"\x1b[?25h" in tail  # the cursor shown again


async def test_top_exits_zero_on_ctrl_c(bus_factory: Any, redis_url: str) -> None:
    bus = bus_factory(shutdown_grace=2)
    async with traffic(bus):
        with top_screen(redis_url, bus.prefix, "--interval", "0.5") as screen:
            await _screen_until(screen, lambda text: "orders" in text, timeout=20)
            screen.type(b"\x03")  # the terminal turns it into SIGINT for top
            await _exits(screen, within=5)
            assert screen.proc.returncode == 0, screen.frame()
            assert "Traceback" not in screen.raw.decode("utf-8", "replace")
            assert termios.tcgetattr(screen.slave)[3] == screen.settings[3]


async def test_top_once_prints_one_frame_with_rates(bus_factory: Any, redis_url: str) -> None:
    bus = bus_factory(shutdown_grace=2)
    async with traffic(bus):
        await wait_until(lambda: bus.stats(orders), timeout=5)
        result = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [*COMMAND, "top", "--once", "--interval", "0.5"],
                capture_output=True,
                text=True,
                timeout=30,
                env=_env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=bus.prefix),
            )
        )
    assert result.returncode == 0, result.stderr
    assert _moving(result.stdout), result.stdout
    assert "\x1b[?1049h" not in result.stdout  # no alternate screen for a pipe


# -- per-process reports --------------------------------------------------------------------


async def test_a_reporting_bus_writes_its_drops_and_deletes_them_on_close(
    bus_factory: Any, redis_url: str
) -> None:
    bus = bus_factory(report_every=0.2)
    client = control_client(redis_url)
    key = process_reports(bus.prefix)
    release = anyio.Event()

    @bus.on(ticks, buffer=2, overflow="drop_oldest")
    async def slow(event: dict[str, int]) -> None:
        await release.wait()

    async def report() -> dict[str, Any] | None:
        raw = await client.hget(key, process_field())
        return None if raw is None else json.loads(raw)

    try:
        async with bus:
            for n in range(20):
                await bus.publish(ticks, {"n": n})

            async def dropped() -> bool:
                found = await report()
                return found is not None and found["totals"]["dropped"] > 0

            await wait_until(dropped, timeout=10)
            found = await report()
            assert found is not None
            (sub,) = [s for s in found["subscriptions"] if s["topic"] == "ticks"]
            assert sub["kind"] == "handler"
            assert sub["name"].endswith("slow")
            assert sub["dropped"] > 0
            assert sub["buffered"] == 2
            assert found["pid"] == os.getpid()
            assert found["interval"] == 0.2
            release.set()
        assert await client.hget(key, process_field()) is None
    finally:
        await client.aclose()


async def test_serve_reports_while_serving(bus_factory: Any, redis_url: str) -> None:
    bus = bus_factory()  # report_every None: off, except while serve() serves
    client = control_client(redis_url)
    key = process_reports(bus.prefix)
    try:
        async with bus:
            assert await client.hget(key, process_field()) is None
            with anyio.fail_after(15):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(bus.serve)
                    await wait_until(
                        lambda: client.hexists(key, process_field()), timeout=10, interval=0.05
                    )
                    os.kill(os.getpid(), signal.SIGTERM)
            assert await client.hget(key, process_field()) is None
    finally:
        await client.aclose()


async def test_readers_drop_and_delete_stale_reports(redis_url: str) -> None:
    client = control_client(redis_url)
    key = f"t{os.getpid()}x:procs"
    try:
        seconds, _ = await client.time()
        now = float(seconds)
        fresh = {"id": "a:1", "at": now - 1, "interval": 2.0, "totals": {}}
        await client.hset(
            key,
            mapping={
                "a:1": json.dumps(fresh),
                "b:2": json.dumps({**fresh, "id": "b:2", "at": now - 7}),  # > 3 intervals
                "c:3": "not json",
            },
        )
        (report,) = await read_reports(client, key, now)
        assert report["id"] == "a:1"
        assert 0.9 <= report["age"] <= 1.1
        assert sorted(await client.hkeys(key)) == ["a:1"]
    finally:
        await client.delete(key)
        await client.aclose()


def test_reports_are_off_by_default_and_checked() -> None:
    from eventbus.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="report_every"):
        EventBus("redis://127.0.0.1:1", report_every=-1)


# -- drawing ----------------------------------------------------------------------------------


def test_sparklines_scale_to_their_maximum_and_fit_their_width() -> None:
    assert sparkline([]) == ""
    assert sparkline([0, 0, 0]) == "▁▁▁"
    assert sparkline([0, 1, 2, 4, 8]) == "▁▂▃▅█"
    assert sparkline([0, 7]) == "▁█"
    assert len(sparkline(list(range(100)), width=20)) == 20
    assert sparkline(list(range(100)), width=20)[-1] == "█"
    history = History(seconds=10)
    for t in range(30):
        history.add("x", float(t), float(t))
    assert len(history.spark("x")) == 11  # the last 10 s: t = 19..29
