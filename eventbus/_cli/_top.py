"""``eventbus top``: a terminal view of a prefix, redrawn in place every interval.

Each refresh takes one :func:`~._snapshot.snapshot`; rates are the difference with
the previous one (:func:`~._snapshot.rates`, and the queues' totals), and the last
minutes of each rate are drawn as a sparkline. The process panel shows the reports
that serving buses write (``eventbus._procs``): their subscribers' drops and gaps.

Keys are read only when stdin is a terminal, in cbreak mode (no echo, no line
buffering; Ctrl-C still sends SIGINT), by a thread that polls with ``select`` so
it stops within 0.1 s; the terminal's settings are restored on the way out. ``q``
or Ctrl-C leaves with status 0.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Final

import anyio
import anyio.abc
import redis.exceptions as rex
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ..errors import EventBusError
from ._session import Session, session
from ._snapshot import rates, snapshot

__all__ = ["History", "frame", "sparkline", "top"]

BLOCKS: Final = "▁▂▃▄▅▆▇█"
SPARK_WIDTH: Final = 20
HISTORY_SECONDS: Final = 180.0
"""How far back a sparkline reaches (the last 3 minutes)."""
_POLL: Final = 0.1


def sparkline(values: Sequence[float], width: int = SPARK_WIDTH) -> str:
    """``values`` as unicode blocks, at most ``width`` of them (averaged into as
    many buckets), scaled to their maximum (all zero: the lowest block)."""
    vals = list(values)
    if not vals:
        return ""
    if len(vals) > width:
        size = len(vals) / width
        vals = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := vals[int(i * size) : max(int((i + 1) * size), int(i * size) + 1)])
        ]
    top = max(vals)
    if top <= 0:
        return BLOCKS[0] * len(vals)
    last = len(BLOCKS) - 1
    return "".join(BLOCKS[min(round(v / top * last), last)] for v in vals)


class History:
    """The recent values of each series (a rate, a backlog), for sparklines."""

    def __init__(self, seconds: float = HISTORY_SECONDS) -> None:
        self.seconds = seconds
        self._series: dict[str, deque[tuple[float, float]]] = {}

    def add(self, key: str, at: float, value: float) -> None:
        points = self._series.setdefault(key, deque())
        points.append((at, value))
        while points and points[0][0] < at - self.seconds:
            points.popleft()

    def spark(self, key: str, width: int = SPARK_WIDTH) -> str:
        return sparkline([v for _, v in self._series.get(key, ())], width)


def _dur(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f}ms"
    if value < 60:
        return f"{value:.1f}s"
    if value < 3600:
        return f"{int(value // 60)}m{int(value % 60):02d}s"
    return f"{int(value // 3600)}h{int(value % 3600 // 60):02d}m"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}/s" if value >= 100 else f"{value:.1f}/s"


def _num(value: int | None, warn: bool = False) -> Text:
    if value is None:
        return Text("-")
    return Text(str(value), style="bold red" if warn and value else "")


def _gaps(counters: Mapping[str, Any]) -> Text:
    """Gaps, with the events lost in them: ``2 (14)``."""
    if not counters["gaps"]:
        return Text("0")
    return Text(f"{counters['gaps']} ({counters['missed']})", style="bold red")


def _table(title: str, columns: Iterable[str]) -> Table:
    table = Table(
        title=title,
        title_justify="left",
        title_style="bold",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right", no_wrap=True)
    return table


def queue_rates(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> dict[str, Any]:
    """Per queue: jobs started, finished and failed per second between two
    snapshots (from the totals); without an earlier one, the workers' own rates."""
    out: dict[str, dict[str, float]] = {}
    old = {q["name"]: q for q in before["queues"]} if before is not None else {}
    span = float(after["at"]) - float(before["at"]) if before is not None else 0.0
    for q in after["queues"]:
        prev = old.get(q["name"])
        if prev is None or span <= 0:
            out[q["name"]] = {k: q[f"{k}_per_s"] for k in ("started", "finished", "failed")}
        else:
            out[q["name"]] = {
                k: max(q[k] - prev[k], 0) / span for k in ("started", "finished", "failed")
            }
    return out


def record(
    history: History, snap: Mapping[str, Any], r: Mapping[str, Any], qr: Mapping[str, Any]
) -> None:
    """Add one refresh's rates and backlogs to ``history``."""
    at = float(snap["at"])
    for name, value in r["topics"].items():
        history.add(f"topic:{name}", at, value)
    for name, value in r["groups"].items():
        history.add(f"group:{name}", at, value)
    for name, value in qr.items():
        history.add(f"queue:{name}", at, value["finished"])
    for q in snap["queues"]:
        history.add(f"queue-length:{q['name']}", at, q["length"])
    history.add("delayed", at, snap["delayed"]["pending"])


def frame(
    snap: Mapping[str, Any],
    r: Mapping[str, Any] | None,
    qr: Mapping[str, Any],
    history: History,
    *,
    url: str,
    interval: float,
    error: str | None = None,
    width: int = 160,
) -> RenderableType:
    """One screen, for a terminal ``width`` columns wide: a header, then topics and
    groups, queues, delayed and recurring events, and the processes' reports."""
    r = r or {"topics": {}, "groups": {}}
    n = SPARK_WIDTH if width >= 120 else 10 if width >= 100 else 8

    def spark(key: str) -> str:
        return history.spark(key, n)

    head = Text()
    head.append("eventbus top", style="bold")
    head.append(f" · {url} · prefix {snap['prefix']} · {interval:g}s · ")
    head.append(time.strftime("%H:%M:%S", time.localtime(float(snap["at"]))))
    head.append(" · q quits", style="dim")
    parts: list[RenderableType] = [head]
    if error:
        parts.append(Text(f"refresh failed: {error}", style="bold red"))

    topics = _table(
        "Topics and groups",
        ["topic / group", "length", "rate", "trend", "cons", "pending", "lag",
         "oldest", "dead"],
    )  # fmt: skip
    for t in snap["topics"]:
        topics.add_row(
            Text(t["name"], style="bold"), str(t["length"]), _rate(r["topics"].get(t["name"])),
            spark(f"topic:{t['name']}"), "", "", "", "", _num(t["dead_letters"], True),
        )  # fmt: skip
        for g in t["groups"]:
            key = f"{t['name']}/{g['name']}"
            topics.add_row(
                f"  └ {g['name']}", "", _rate(r["groups"].get(key)), spark(f"group:{key}"),
                str(g["consumers"]), _num(g["pending"]), _num(g["lag"]),
                _dur(g["oldest_pending_age"]), _num(g["dead_letters"], True),
            )  # fmt: skip
    if not snap["topics"]:
        topics.add_row(Text("no durable topics", style="dim"))
    parts.append(topics)

    if snap["queues"]:
        queues = _table(
            "Queues",
            ["queue", "waiting", "sched", "running", "workers",
             "done", "trend", "failed", "oldest", "dead"],
        )  # fmt: skip
        for q in snap["queues"]:
            rate = qr.get(q["name"], {})
            queues.add_row(
                Text(q["name"], style="bold"),
                (
                    f"{q['length']} ({'/'.join(str(n) for n in q['waiting'])})"
                    if len(q["waiting"]) > 1
                    else str(q["length"])
                ),
                str(q["scheduled"]), str(q["processing"]), str(q["workers"]),
                _rate(rate.get("finished")), spark(f"queue:{q['name']}"),
                _rate(rate.get("failed")), _dur(q["oldest_waiting_age"]),
                _num(q["dead_letters"], True),
            )  # fmt: skip
        parts.append(queues)

    delayed = snap["delayed"]
    if delayed["pending"] or snap["schedules"]:
        late = delayed["overdue_by"]
        line = Text("Delayed events: ", style="bold italic")
        line.append(f"{delayed['pending']} pending {spark('delayed')}  ")
        line.append(f"next due in {_dur(delayed['next_due_in'])}  ")
        line.append(f"overdue by {_dur(late)}", style="bold red" if late > 1 else "")
        parts.append(line)
        if snap["schedules"]:
            sched = _table("Recurring", ["schedule", "topic", "next due in", "last released"])
            for sch in snap["schedules"]:
                sched.add_row(
                    sch["name"], sch["topic"], _dur(sch["next_due_in"]),
                    "-" if sch["last_released_ago"] is None
                    else f"{_dur(sch['last_released_ago'])} ago",
                )  # fmt: skip
            parts.append(sched)

    procs = _table(
        "Processes: local subscribers, group members, queue workers",
        ["process", "age", "deliv", "drop", "gaps", "buf", "err", "handled", "failed", "jobs"],
    )  # fmt: skip
    for p in snap.get("processes", ()):
        tot = p["totals"]
        procs.add_row(
            Text(p["id"], style="bold"), _dur(p["age"]),
            str(tot["delivered"]), _num(tot["dropped"], True), _gaps(tot),
            str(tot["buffered"]), _num(tot["errors"], True),
            str(sum(c["handled"] for c in p["consumers"])),
            _num(sum(c["failed"] for c in p["consumers"]), True),
            str(sum(w["finished"] for w in p["workers"])),
        )  # fmt: skip
        for sub in p["subscriptions"]:
            if not (sub["dropped"] or sub["gaps"] or sub["buffered"]):
                continue
            procs.add_row(
                f"  └ {sub['topic']} ({sub['name']})", "", str(sub["delivered"]),
                _num(sub["dropped"], True), _gaps(sub),
                f"{sub['buffered']}/{sub['buffer_size']}", _num(sub["errors"], True),
            )  # fmt: skip
        for member in p["consumers"]:  # which groups the process serves, and how well
            procs.add_row(
                f"  └ {member.get('topic') or '?'}/{member['group']} ({member['consumer']})",
                "", "", "", "", "", "",
                str(member["handled"]), _num(member["failed"], True),
            )  # fmt: skip
    if not snap.get("processes"):
        procs.add_row(Text("no reports (served buses write them)", style="dim"))
    parts.append(procs)
    return Group(*parts)


class _Keys:
    """``q`` from a terminal's stdin, read by a thread in cbreak mode (see the module doc)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.stop = threading.Event()

    @contextmanager
    def cbreak(self) -> Iterator[None]:
        import termios
        import tty

        saved = termios.tcgetattr(self.fd)
        try:
            tty.setcbreak(self.fd)
            yield
        finally:
            self.stop.set()
            termios.tcsetattr(self.fd, termios.TCSADRAIN, saved)

    def wait_quit(self) -> bool:
        """Block until ``q`` (True), or until told to stop or stdin ends (False)."""
        while not self.stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], _POLL)
            if ready:
                key = os.read(self.fd, 1)
                if key in (b"q", b"Q"):
                    return True
                if not key:
                    return False
        return False


async def _look(s: Session) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return await snapshot(s), None
    except (EventBusError, rex.RedisError, OSError, TimeoutError) as exc:
        return None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


async def top(url: str | None, prefix: str, interval: float, once: bool) -> None:
    """Draw the view every ``interval`` seconds until ``q`` or Ctrl-C (then return:
    exit status 0); ``once``: look twice, ``interval`` apart, print one frame."""
    async with session(url, prefix) as s:
        console = Console()
        history = History()
        before = await snapshot(s)  # the first look fails loudly (exit status 1)
        if once:
            await anyio.sleep(interval)
            after = await snapshot(s)
            qr = queue_rates(before, after)
            r = rates(before, after)
            record(history, after, r, qr)
            console.print(
                frame(after, r, qr, history, url=s.url, interval=interval, width=console.width)
            )
            return
        keys = _Keys(sys.stdin.fileno()) if sys.stdin.isatty() else None
        # Both open before the first frame is drawn: a key or a Ctrl-C from then on
        # is seen (a key waits in the terminal's input until the thread reads it).
        with (
            keys.cbreak() if keys is not None else _nothing(),
            anyio.open_signal_receiver(signal.SIGINT) as interrupts,
        ):
            async with anyio.create_task_group() as tg:

                def leave() -> None:
                    if keys is not None:
                        keys.stop.set()
                    tg.cancel_scope.cancel()

                async def on_signal() -> None:
                    async for _ in interrupts:
                        leave()
                        return

                async def on_key() -> None:
                    assert keys is not None
                    if await anyio.to_thread.run_sync(keys.wait_quit):
                        leave()

                tg.start_soon(on_signal)
                if keys is not None:
                    tg.start_soon(on_key)
                try:
                    await _refresh(s, console, history, before, interval)
                finally:
                    leave()


@contextmanager
def _nothing() -> Iterator[None]:
    yield


async def _refresh(
    s: Session, console: Console, history: History, before: dict[str, Any], interval: float
) -> None:
    """Redraw every ``interval`` on the alternate screen; when stdout is not a
    terminal, print one frame after the other instead (as ``top -b`` does)."""
    qr = queue_rates(None, before)
    shown = frame(before, None, qr, history, url=s.url, interval=interval, width=console.width)
    live = Live(shown, console=console, screen=True, auto_refresh=False)
    with live if console.is_terminal else _nothing():
        if not console.is_terminal:
            console.print(shown)
        while True:
            await anyio.sleep(interval)
            after, error = await _look(s)
            if after is None:
                shown = frame(
                    before, None, {}, history, url=s.url, interval=interval,
                    error=error, width=console.width,
                )  # fmt: skip
            else:
                r = rates(before, after)
                qr = queue_rates(before, after)
                record(history, after, r, qr)
                shown = frame(
                    after, r, qr, history, url=s.url, interval=interval, width=console.width
                )
                before = after
            if console.is_terminal:
                live.update(shown, refresh=True)
            else:
                console.print(shown)
