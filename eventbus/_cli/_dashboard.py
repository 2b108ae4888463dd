"""``eventbus dashboard``: a read-only web page of one prefix, updated live.

One task looks at Redis every ``interval`` seconds (:func:`._snapshot.snapshot`) and
keeps the figures of the last ``history`` seconds in memory (a bounded ring of
compact points: rates, lengths, lag, backlog); requests read that memory and
never Redis, so a page left open, or many, costs Redis one look per interval.

Routes (all ``GET``; the page and its script, style and icon are the files in
``static/``, no CDN, so it works offline)::

    /                     the page (polls the two endpoints below every second)
    /api/snapshot         the latest snapshot (module ``_snapshot``'s shape) with
                          "publish_rate" per topic and "consume_rate" per group
                          (per second, since the previous look), and the sampler's state
    /api/history?after=T  the points after epoch second T (all kept ones without it)

The page is unauthenticated: it binds 127.0.0.1 unless asked otherwise, and then
rejects requests whose ``Host`` is not a loopback name (DNS rebinding). Imported
by the command when it runs (it needs the ``dashboard`` extra: starlette, uvicorn).
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any, Final

import anyio
import click
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ._session import dumps, note, session
from ._snapshot import rates, snapshot

__all__ = ["Recorder", "app", "serve"]

STATIC: Final = Path(__file__).with_name("static")
MAX_POINTS: Final = 100_000
"""Bound of the ring whatever ``--history`` and ``--interval`` say (memory)."""
_LOOPBACK_NAMES: Final = frozenset({"localhost", "127.0.0.1", "::1"})
_HEADERS: Final = [
    # Scripts, styles and images from this server only: a topic name is text, never markup.
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self'; object-src 'none'; base-uri 'none';"
        b" frame-ancestors 'none'; form-action 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the page on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _point(snap: dict[str, Any], rate: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of one look that the charts draw over time."""
    topic_rates = rate["topics"] if rate is not None else {}
    group_rates = rate["groups"] if rate is not None else {}
    groups = {}
    for t in snap["topics"]:
        for g in t["groups"]:
            key = f"{t['name']}/{g['name']}"
            groups[key] = {
                "rate": group_rates.get(key),
                "lag": g.get("lag"),
                "pending": g.get("pending"),
            }
    return {
        "at": snap["at"],
        "topics": {
            t["name"]: {
                "rate": topic_rates.get(t["name"]),
                "length": t.get("length"),
                "dead_letters": t.get("dead_letters"),
            }
            for t in snap["topics"]
        },
        "groups": groups,
        "queues": {
            q["name"]: {
                "length": q.get("length"),
                "processing": q.get("processing"),
                "dead_letters": q.get("dead_letters"),
                "finished_per_s": q.get("finished_per_s"),
            }
            for q in snap["queues"]
        },
        "delayed": {
            "pending": snap["delayed"].get("pending"),
            "overdue_by": snap["delayed"].get("overdue_by"),
        },
    }


class Recorder:
    """The last ``keep`` seconds of looks at one prefix, one every ``interval``."""

    def __init__(self, *, interval: float, keep: float) -> None:
        self.interval = interval
        self.keep = keep
        self.points: deque[dict[str, Any]] = deque(
            maxlen=min(MAX_POINTS, math.ceil(keep / interval) + 1)
        )
        self.latest: dict[str, Any] | None = None
        self.error: str | None = None
        """The last look's failure (``None`` once a look succeeds again)."""
        self.error_at: float | None = None

    def add(self, snap: dict[str, Any]) -> None:
        """Record one look (the rates are the change since the previous one)."""
        before = self.latest
        rate = rates(before, snap) if before is not None else None
        latest = dict(snap)
        latest["topics"] = [
            {
                **t,
                "publish_rate": None if rate is None else rate["topics"].get(t["name"]),
                "groups": [
                    {
                        **g,
                        "consume_rate": (
                            None if rate is None else rate["groups"].get(f"{t['name']}/{g['name']}")
                        ),
                    }
                    for g in t["groups"]
                ],
            }
            for t in snap["topics"]
        ]
        self.latest = latest
        self.points.append(_point(snap, rate))
        self.error = None
        self.error_at = None

    def failed(self, error: str, at: float) -> None:
        if self.error is None:
            self.error_at = at
        self.error = error

    def snapshot_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.latest or {})
        out["sampler"] = {
            "interval": self.interval,
            "keep": self.keep,
            "error": self.error,
            "error_since": self.error_at,
        }
        return out

    def history_json(self, after: float | None) -> dict[str, Any]:
        points = list(self.points)
        if after is not None:
            points = [p for p in points if p["at"] > after]
        return {"interval": self.interval, "keep": self.keep, "points": points}


def _json(value: object, status: int = 200) -> Response:
    return Response(dumps(value), status_code=status, media_type="application/json")


def app(recorder: Recorder, *, check_host: bool) -> ASGIApp:
    """The ASGI application serving ``recorder`` (``check_host``: answer 400 to a
    ``Host`` that is not a loopback name)."""

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def api_snapshot(request: Request) -> Response:
        return _json(recorder.snapshot_json())

    async def api_history(request: Request) -> Response:
        raw = request.query_params.get("after")
        try:
            after = None if raw in (None, "") else float(raw)
        except ValueError:
            return _json({"error": f"after={raw!r} is not a number (epoch seconds)"}, 400)
        if after is not None and not math.isfinite(after):
            return _json({"error": "after must be finite"}, 400)
        return _json(recorder.history_json(after))

    inner = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/api/snapshot", api_snapshot, methods=["GET"]),
            Route("/api/history", api_history, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ]
    )

    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        if check_host and _host_name(scope) not in _LOOPBACK_NAMES:
            await Response("Invalid Host header", status_code=400)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *_HEADERS]
            await send(message)

        await inner(scope, receive, send_with_headers)

    return outer


def _host_name(scope: Scope) -> str:
    """The name in the request's ``Host`` header, without port or IPv6 brackets."""
    for key, value in scope.get("headers", ()):
        if key == b"host":
            host: str = bytes(value).decode("latin-1").strip().lower()
            if host.startswith("["):
                return host[1 : host.find("]")] if "]" in host else host
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return ""


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the command's (``_session.run``)
    turn Ctrl-C and SIGTERM into a cancellation, and the server shuts down then."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror}") from None


async def serve(
    url: str | None, prefix: str, host: str, port: int, interval: float, keep: float
) -> None:
    """Run the dashboard until cancelled (Ctrl-C, SIGTERM): look at Redis every
    ``interval`` seconds, serve the page and the JSON endpoints on ``host:port``."""
    recorder = Recorder(interval=interval, keep=keep)
    sock = _bind(host, port)
    try:
        async with session(url, prefix) as s:
            recorder.add(await snapshot(s))  # unreachable Redis: status 1, before serving
            loopback = is_loopback(host)
            if not loopback:
                note(
                    f"eventbus dashboard: WARNING: listening on {host}, not on loopback: the"
                    " page has no authentication; anyone who can reach this address sees"
                    " the names and figures of every topic, group and queue under the prefix"
                )
            bound_host, bound_port = sock.getsockname()[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            click.echo(f"eventbus dashboard: http://{shown}:{bound_port}/ (prefix {prefix})")
            config = uvicorn.Config(
                app(recorder, check_host=loopback),
                lifespan="off",
                log_level="warning",
                access_log=False,
                server_header=False,
                timeout_graceful_shutdown=1,
            )
            server = _Server(config)

            async def sample() -> None:
                next_at = anyio.current_time()
                while True:
                    next_at += interval
                    now = anyio.current_time()
                    if next_at < now:  # a slow look: skip the missed beats
                        next_at = now + interval - (now - next_at) % interval
                    await anyio.sleep(next_at - now)
                    try:
                        with anyio.fail_after(max(5.0, 5 * interval)):
                            recorder.add(await snapshot(s))
                    except Exception as exc:  # shown on the page; the next look may work
                        text = str(exc).strip().splitlines()
                        recorder.failed(
                            f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": "),
                            time.time(),
                        )

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                try:
                    await server.serve(sockets=[sock])
                except anyio.get_cancelled_exc_class():
                    if server.started:  # close the open connections, briefly
                        with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                            server.should_exit = True
                            await server.shutdown(sockets=[sock])
                    raise
                finally:
                    tg.cancel_scope.cancel()
    finally:
        sock.close()
