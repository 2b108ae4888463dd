"""One CLI invocation's connection: which Redis (``--url``, ``$EVENTBUS_URL``, else an
embedded server that lives as long as the command), an open bus on it, a plain
command client for what the bus does not read back, and the translation of
failures into one line on stderr and exit status 1.

Imported by a command when it runs, never by ``eventbus --help``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any, TypeVar

import anyio
import attrs
import click
import redis.exceptions as rex

from .._bus import EventBus
from .._codec import Codec
from .._config import DEFAULT_LIMITS
from .._connection import ClientFactory, map_exceptions, mask_url
from .._keys import topic_keys
from .._topic import Topic
from ..errors import EventBusError

if sys.version_info < (3, 11):  # the backport anyio depends on there
    from exceptiongroup import BaseExceptionGroup

__all__ = ["Session", "dumps", "echo_json", "note", "run", "session", "topic_kind"]

T = TypeVar("T")

EMBEDDED_NOTE = (
    "eventbus: no --url and no EVENTBUS_URL: using an embedded redis-server that"
    " stops when this command exits (nothing it holds is kept)"
)


def note(message: str) -> None:
    """A line for the user on stderr (stdout stays the command's output)."""
    click.echo(message, err=True)


@attrs.frozen
class Session:
    """What a command works with: the open bus, a command client and a codec."""

    bus: EventBus
    client: Any
    """A redis-py asyncio client on the same URL (bytes replies)."""
    prefix: str
    url: str
    codec: Codec

    async def redis(self, call: Awaitable[T], *, command: str, topic: str | None = None) -> T:
        """Await a plain redis-py call with its errors translated (``eventbus.errors``)."""
        with map_exceptions(command=command, topic=topic):
            return await call


@asynccontextmanager
async def session(url: str | None, prefix: str) -> AsyncIterator[Session]:
    """Open a bus (and a command client) on ``url``; without one, on an embedded
    server started here and stopped on exit (with a note on stderr)."""
    server = None
    if not url:
        from .._server import RedisServer

        note(EMBEDDED_NOTE)
        server = RedisServer()
        await anyio.to_thread.run_sync(server.start)
        url = server.url
    try:
        # scheduler=False: a command that lives for a moment releases nothing; the
        # application's buses release what it schedules.
        bus = EventBus(url, prefix=prefix, scheduler=False, shutdown_grace=2.0)
        async with bus:
            client = ClientFactory(url).command_client()
            try:
                yield Session(
                    bus=bus,
                    client=client,
                    prefix=prefix,
                    url=mask_url(url),
                    codec=Codec(None, DEFAULT_LIMITS),
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await client.aclose()
    finally:
        if server is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(server.close)


async def topic_kind(s: Session, name: str, durable: bool | None) -> Topic[Any]:
    """The untyped topic ``name``: durable or live as asked, else durable if its
    stream exists (the kind is not stored anywhere else), live otherwise."""
    if durable is None:
        kind = await s.redis(
            s.client.type(topic_keys(s.prefix, name).stream), command="TYPE", topic=name
        )
        durable = kind in (b"stream", "stream")
        if not durable:
            note(f"eventbus: topic {name!r} has no stream: using it as a live topic (--durable)")
    return Topic(name, durable=durable)


def _default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            import base64

            return "base64:" + base64.b64encode(value).decode("ascii")
    if attrs.has(type(value)):
        return attrs.asdict(value, recurse=False)  # type: ignore[arg-type]
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def dumps(value: object) -> str:
    """One line of JSON (datetimes ISO 8601, durations in seconds, bytes as text)."""
    return json.dumps(value, default=_default, ensure_ascii=False, separators=(",", ":"))


def echo_json(value: object) -> None:
    click.echo(dumps(value))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if "\n" in text else text


def _single(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (else the group itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _until_terminated(command: Callable[..., Awaitable[None]], *args: Any) -> bool:
    """Run ``command``; SIGTERM cancels it (so the bus closes, and an embedded server
    stops, as on Ctrl-C). Whether it was terminated."""
    terminated = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal terminated
            with anyio.open_signal_receiver(signal.SIGTERM) as received:
                async for _ in received:
                    terminated = True
                    tg.cancel_scope.cancel()
                    return

        tg.start_soon(watch)
        await command(*args)
        tg.cancel_scope.cancel()
    return terminated


def run(command: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run one command's coroutine; a failure the user can act on (Redis unreachable,
    refused, a bad topic) becomes one line on stderr and exit status 1; Ctrl-C
    exits 130 and SIGTERM 143, without a traceback."""
    try:
        if anyio.run(_until_terminated, command, *args):
            raise SystemExit(128 + signal.SIGTERM)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        raise SystemExit(130) from None
    except BaseException as exc:
        inner = _single(exc)
        if isinstance(inner, KeyboardInterrupt):
            raise SystemExit(130) from None
        if isinstance(inner, BrokenPipeError):  # `eventbus tail ... | head`: quietly,
            # as a tool killed by SIGPIPE (Python's advice: point stdout at devnull,
            # so that flushing it at exit does not fail again)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(128 + signal.SIGPIPE) from None
        if isinstance(inner, click.ClickException | SystemExit):
            raise inner from None
        if isinstance(inner, EventBusError | rex.RedisError | OSError | TimeoutError):
            raise click.ClickException(_one_line(inner)) from None
        raise
