"""The ``eventbus`` command: publish, tail and inspect a bus from a shell.

Built on click (commands, options, ``--help``, exit status 2 for usage errors);
tables and progress bars come from rich. This module declares the commands and
imports nothing else: ``eventbus --help`` loads no Redis client and no rich. A
command imports its work (``_commands``) and its connection (``_session``) when it
runs.

Every command takes ``--url`` (else ``$EVENTBUS_URL``, else an embedded
redis-server that lives as long as the command) and ``--prefix`` (else
``$EVENTBUS_PREFIX``, else ``eb``); every read command takes ``--json``. Exit
status: 0 done, 1 failed (one line on stderr: Redis unreachable, refused, nothing
to act on), 2 usage error, 130 / 143 interrupted (SIGINT / SIGTERM).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, Final, TypeVar

import click

__all__ = ["cli", "main"]

F = TypeVar("F", bound=Callable[..., Any])

_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DURATION_RE: Final = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)?")
_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def _check_prefix(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and _PREFIX_RE.fullmatch(value) is None:
        raise click.BadParameter("use 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
    return value


def connection(f: F) -> F:
    """``--url`` and ``--prefix``: on the group (``eventbus --url URL stats``) and on
    every command (``eventbus stats --url URL``); see :func:`_resolve`."""
    f = click.option(
        "--prefix",
        callback=_check_prefix,
        help="Key prefix of the bus (EventBus(prefix=...)). Default: $EVENTBUS_PREFIX, else eb.",
    )(f)
    return click.option(
        "--url",
        metavar="URL",
        help="Redis URL (redis://, rediss://, unix://). Default: $EVENTBUS_URL, else an"
        " embedded redis-server that stops when the command exits.",
    )(f)


def _resolve(url: str | None, prefix: str | None) -> tuple[str | None, str]:
    """The command's --url and --prefix, else the group's, else $EVENTBUS_URL and
    $EVENTBUS_PREFIX, else (no URL: the embedded server) and ``eb``."""
    group = click.get_current_context().find_root().obj or {}
    url = url or group.get("url") or os.environ.get("EVENTBUS_URL") or None
    prefix = prefix or group.get("prefix") or os.environ.get("EVENTBUS_PREFIX") or "eb"
    if _PREFIX_RE.fullmatch(prefix) is None:
        raise click.BadParameter(
            f"{prefix!r}: use 1-64 of [A-Za-z0-9._-], starting with a letter or digit",
            param_hint="EVENTBUS_PREFIX",
        )
    return url, prefix


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")(f)


def queue_option(f: F) -> F:
    return click.option(
        "--queue", "is_queue", is_flag=True, help="NAME is a work queue, not a durable topic."
    )(f)


def kind_option(f: F) -> F:
    return click.option(
        "--durable/--live",
        "durable",
        default=None,
        help="The topic's kind. Default: durable if the topic's stream exists, else live.",
    )(f)


def _run(name: str, url: str | None, prefix: str | None, *args: Any) -> None:
    from . import _commands, _session

    _session.run(getattr(_commands, name), *_resolve(url, prefix), *args)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="eventbus", prog_name="eventbus")
@connection
@click.pass_context
def cli(ctx: click.Context, url: str | None, prefix: str | None) -> None:
    """Publish, tail, inspect and run an eventbus from the shell.

    Every command connects with --url (else $EVENTBUS_URL, else an embedded
    redis-server that lives as long as the command) and reads keys under
    --prefix. Read commands take --json. Exit status: 0 done, 1 failed, 2 usage
    error.
    """
    ctx.obj = {"url": url, "prefix": prefix}


# -- publish and tail -----------------------------------------------------------------


def _parse_json(ctx: click.Context, param: click.Parameter, value: str) -> object:
    if value == "-":
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"not JSON ({exc}); quote it for the shell: '{{\"a\": 1}}'"
        ) from None


def _parse_headers(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> dict[str, str]:
    headers = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        headers[key] = val
    return headers


def _parse_delay(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    match = _DURATION_RE.fullmatch(value.strip())
    if match is None:
        raise click.BadParameter(f"{value!r} is not a duration such as 30, 1.5s, 500ms, 5m, 2h")
    return float(match[1]) * _UNITS[match[2] or "s"]


def _parse_at(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise click.BadParameter(f"{value!r} names no time zone: add Z or +HH:MM")
    return moment.astimezone(timezone.utc)


@cli.command()
@click.argument("topic")
@click.argument("event", metavar="JSON", callback=_parse_json)
@kind_option
@click.option(
    "-H", "--header", "headers", multiple=True, callback=_parse_headers, metavar="KEY=VALUE",
    help="A header of the event (repeat for more).",
)  # fmt: skip
@click.option(
    "--delay", callback=_parse_delay, metavar="DURATION",
    help="Hold the event in Redis this long (30, 1.5s, 500ms, 5m, 2h), then release it.",
)  # fmt: skip
@click.option(
    "--at", callback=_parse_at, metavar="TIME",
    help="Release the event at this ISO 8601 time (with a zone: 2030-01-01T09:00:00Z).",
)  # fmt: skip
@json_option
@connection
def publish(
    topic: str,
    event: object,
    durable: bool | None,
    headers: dict[str, str],
    delay: float | None,
    at: datetime | None,
    as_json: bool,
    url: str | None,
    prefix: str | None,
) -> None:
    """Publish a JSON event to TOPIC, or one event per line of stdin with JSON '-'.

    Prints each event id (and its stream id, and due time if delayed), one per
    line. The topic is untyped: subscribers receive the JSON value as published.

    \b
      eventbus publish orders '{"order_id": "o-1", "amount": 90}' --durable
      cat events.jsonl | eventbus publish orders -
    """
    if delay is not None and at is not None:
        raise click.UsageError("give --delay or --at, not both")
    _run("publish", url, prefix, topic, event, event == "-", durable, headers, delay, at, as_json)


@cli.command()
@click.argument("topic")
@kind_option
@click.option(
    "--from", "from_", metavar="POSITION",
    help="Durable topics: where to start: latest (default), earliest, an ISO 8601 time,"
    " a stream id or an event id.",
)  # fmt: skip
@click.option(
    "--until-caught-up", is_flag=True,
    help="Durable topics: stop at the newest event stored when the tail started"
    " (--from then defaults to earliest).",
)  # fmt: skip
@click.option("-n", "--count", type=click.IntRange(min=0), help="Stop after this many events.")
@json_option
@connection
def tail(
    topic: str,
    durable: bool | None,
    from_: str | None,
    until_caught_up: bool,
    count: int | None,
    as_json: bool,
    url: str | None,
    prefix: str | None,
) -> None:
    """Print the events of TOPIC as they come, one per line, until Ctrl-C.

    A line is the publish time, the event id and the event as JSON; --json prints
    one JSON object per event instead. A live topic shows what is published while
    the tail runs (at most once); a durable one reads the stream, from --from on.
    """
    _run("tail", url, prefix, topic, durable, from_, until_caught_up, count, as_json)


# -- inspection -----------------------------------------------------------------------


@cli.command()
@click.argument("topics", nargs=-1, metavar="[TOPIC]...")
@json_option
@connection
def stats(topics: tuple[str, ...], as_json: bool, url: str | None, prefix: str | None) -> None:
    """Tables of durable topics, consumer groups, work queues, delayed and recurring
    events.

    Without TOPIC, every durable topic under the prefix (found by scanning keys).
    """
    _run("stats", url, prefix, topics, as_json)


@cli.command()
@click.argument("topic")
@json_option
@connection
def groups(topic: str, as_json: bool, url: str | None, prefix: str | None) -> None:
    """Consumer groups of the durable TOPIC and their members: pending, lag, idle."""
    _run("groups", url, prefix, topic, as_json)


# -- dead letters ---------------------------------------------------------------------


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge the dead letters of a durable topic (or, with
    --queue, of a work queue)."""


@dlq.command("list")
@click.argument("topic")
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=100, show_default=True,
    help="List at most this many, oldest first.",
)  # fmt: skip
@click.option("--after", metavar="ID", help="Start after this dead-letter id.")
@queue_option
@json_option
@connection
def dlq_list(
    topic: str,
    count: int,
    after: str | None,
    is_queue: bool,
    as_json: bool,
    url: str | None,
    prefix: str | None,
) -> None:
    """The dead letters of TOPIC: id, event id, group, reason, attempts, error."""
    _run("dlq_list", url, prefix, topic, count, after, as_json, is_queue)


@dlq.command("show")
@click.argument("topic")
@click.argument("dlq_id", metavar="ID")
@queue_option
@json_option
@connection
def dlq_show(
    topic: str, dlq_id: str, is_queue: bool, as_json: bool, url: str | None, prefix: str | None
) -> None:
    """One dead letter of TOPIC in full: the event, the error and its traceback."""
    _run("dlq_show", url, prefix, topic, dlq_id, as_json, is_queue)


@dlq.command("replay")
@click.argument("topic")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@queue_option
@json_option
@connection
def dlq_replay(
    topic: str,
    ids: tuple[str, ...],
    is_queue: bool,
    as_json: bool,
    url: str | None,
    prefix: str | None,
) -> None:
    """Publish dead letters back into TOPIC (the given IDs, else all of them).

    Each keeps its event id and leaves the dead-letter stream atomically with its
    publish; undecodable ones are skipped (and stay). A queue's jobs go back to the
    end of their priority level, their attempts reset.
    """
    _run("dlq_replay", url, prefix, topic, ids, as_json, is_queue)


@dlq.command("purge")
@click.argument("topic")
@click.argument("ids", nargs=-1, metavar="[ID]...")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@queue_option
@json_option
@connection
def dlq_purge(
    topic: str,
    ids: tuple[str, ...],
    yes: bool,
    is_queue: bool,
    as_json: bool,
    url: str | None,
    prefix: str | None,
) -> None:
    """Delete dead letters of TOPIC (the given IDs, else all of them), for good.

    Asks first unless --yes; declining exits with status 1.
    """
    _run("dlq_purge", url, prefix, topic, ids, yes, as_json, is_queue)


@cli.command()
@click.option(
    "-n", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
    metavar="SECONDS", help="Seconds between refreshes.",
)  # fmt: skip
@click.option(
    "--once", is_flag=True,
    help="Look twice, --interval apart, print one frame (with rates) and exit.",
)  # fmt: skip
@connection
def top(interval: float, once: bool, url: str | None, prefix: str | None) -> None:
    """A live view of the bus, redrawn in place: topics and their publish rates,
    groups (consume rate, pending, lag, consumers, oldest pending), queues, dead
    letters, delayed events and how late they are, and the local counters (drops,
    gaps) that served processes report. q or Ctrl-C quits (exit status 0).
    """
    _run("top", url, prefix, interval, once)


# -- work queues ----------------------------------------------------------------------


@cli.command()
@click.argument("names", nargs=-1, metavar="[QUEUE]...")
@json_option
@connection
def queues(names: tuple[str, ...], as_json: bool, url: str | None, prefix: str | None) -> None:
    """Work queues: jobs waiting per priority, scheduled, in processing, workers
    alive, dead letters, the oldest waiting job's age, and the workers' rates.

    Without QUEUE, every queue under the prefix.
    """
    _run("queues", url, prefix, names, as_json)


# -- delayed and recurring events ------------------------------------------------------


@cli.group()
def scheduled() -> None:
    """Delayed events waiting in Redis (publish --delay / --at)."""


@scheduled.command("list")
@click.option("--topic", help="Only this topic's delayed events.")
@click.option(
    "-n", "--count", type=click.IntRange(min=1), default=100, show_default=True,
    help="List at most this many, earliest due first.",
)  # fmt: skip
@json_option
@connection
def scheduled_list(
    topic: str | None, count: int, as_json: bool, url: str | None, prefix: str | None
) -> None:
    """Delayed events not yet released: id, topic, due time, event."""
    _run("scheduled_list", url, prefix, topic, count, as_json)


@scheduled.command("cancel")
@click.argument("event_id", metavar="ID")
@click.option("--topic", help="The event's topic (else every topic with delayed events).")
@json_option
@connection
def scheduled_cancel(
    event_id: str, topic: str | None, as_json: bool, url: str | None, prefix: str | None
) -> None:
    """Cancel the delayed event ID; exit status 1 if it was no longer pending."""
    _run("scheduled_cancel", url, prefix, event_id, topic, as_json)


@cli.group()
def schedules() -> None:
    """Recurring events (bus.schedule(..., every= / cron=))."""


@schedules.command("list")
@json_option
@connection
def schedules_list(as_json: bool, url: str | None, prefix: str | None) -> None:
    """Every recurring event: topic, period or cron, next and last occurrence."""
    _run("schedules_list", url, prefix, as_json)


@schedules.command("remove")
@click.argument("name")
@json_option
@connection
def schedules_remove(name: str, as_json: bool, url: str | None, prefix: str | None) -> None:
    """Remove the recurring event NAME (bus.unschedule); status 1 if there was none."""
    _run("schedules_remove", url, prefix, name, as_json)


# -- the web dashboard ----------------------------------------------------------------


@cli.command()
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
    help="TCP port to listen on (0: any free one; the URL is printed).",
)  # fmt: skip
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to listen on. The page has no authentication: an address other than"
    " loopback (0.0.0.0, a LAN address) shows it to the network, with a warning.",
)  # fmt: skip
@click.option(
    "--interval", type=click.FloatRange(min=0.2, max=60), default=1.0, show_default=True,
    help="Seconds between two looks at Redis.",
)  # fmt: skip
@click.option(
    "--history", "keep", callback=_parse_delay, default="10m", show_default=True,
    metavar="DURATION", help="How much of the past the charts and /api/history keep (memory).",
)  # fmt: skip
@connection
def dashboard(
    port: int, host: str, interval: float, keep: float, url: str | None, prefix: str | None
) -> None:
    """Serve a live, read-only web page of the prefix on http://127.0.0.1:8765/.

    Per topic: publish rate, length, dead letters; per group: consume rate, pending,
    lag, consumers, oldest pending age; work queues, delayed events and their
    lateness; charts of rates, lag and backlog over the last minutes. The same
    figures as JSON: /api/snapshot and /api/history. Needs the extra:
    pip install 'eventbus[dashboard]'.
    """
    if keep < interval:
        raise click.BadParameter("keep at least one --interval", param_hint="--history")
    try:
        from . import _dashboard
    except ImportError as exc:
        if exc.name not in ("starlette", "uvicorn") and not str(exc.name).startswith(
            ("starlette.", "uvicorn.")
        ):
            raise
        raise click.ClickException(
            f"eventbus dashboard needs {exc.name}: pip install 'eventbus[dashboard]'"
        ) from None
    from . import _session

    _session.run(_dashboard.serve, *_resolve(url, prefix), host, port, interval, keep)


# -- running a service ----------------------------------------------------------------


@cli.command()
@click.argument("target", metavar="MODULE:BUS")
@click.option(
    "--grace", type=click.FloatRange(min=0), default=None,
    help="Seconds running handlers get to finish after SIGTERM or SIGINT."
    " Default: the bus's shutdown_grace (10).",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True,
    help="Processes to run, each with its own bus; one that dies is restarted.",
)  # fmt: skip
@click.option("--reload", is_flag=True, help="Restart when the code changes (development).")
@click.option(
    "--url", metavar="URL",
    help="Redis URL for a bus built without one. Default: $EVENTBUS_URL.",
)  # fmt: skip
@click.option(
    "--name", metavar="NAME", envvar="EVENTBUS_NAME",
    help="Stable consumer names are NAME:<slot> (default: <host>:<slot>). Two runners"
    " serving the same groups from one host need different names. [env: EVENTBUS_NAME]",
)  # fmt: skip
def run(
    target: str, grace: float | None, workers: int, reload: bool, url: str | None, name: str | None
) -> None:
    """Serve the bus MODULE:BUS (an EventBus, or a function returning one) until
    SIGTERM or SIGINT, then drain and exit 0; a second signal stops at once."""
    from .. import _runner
    from ..errors import ConfigurationError

    group = click.get_current_context().find_root().obj or {}
    try:
        status = _runner.run(
            target,
            grace=grace,
            workers=workers,
            reload=reload,
            url=url or group.get("url"),
            name=name,
        )
    except ConfigurationError as exc:
        click.echo(f"eventbus run: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:  # before serving began (while importing the target)
        sys.exit(130)
    sys.exit(status)


def main(argv: Sequence[str] | None = None) -> None:
    """The console script ``eventbus``."""
    cli.main(args=None if argv is None else list(argv), prog_name="eventbus")
