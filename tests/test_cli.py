"""The ``eventbus`` command, run as a user runs it: the console script in a
subprocess, against the session's private redis-server, each test under its own
key prefix. Checked: exit status, what is printed, ``--json`` parsed, ``--help``.

The state a command reads (consumer groups, dead letters, recurring events) is
made by the library (or raw redis-py for a group's members) before the command runs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest

from eventbus import EventBus, Topic
from eventbus._cli import cli as cli_group
from eventbus.testing import free_port
from tests.helpers import control_client, wait_until

_SCRIPT = shutil.which("eventbus", path=str(Path(sys.executable).parent))
COMMAND = [_SCRIPT] if _SCRIPT else [sys.executable, "-m", "eventbus._cli"]
TIMEOUT = 30


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTBUS_")}
    if "EVENTBUS_REDIS_SERVER" in os.environ:  # the embedded server's binary
        env["EVENTBUS_REDIS_SERVER"] = os.environ["EVENTBUS_REDIS_SERVER"]
    env["COLUMNS"] = "200"  # rich's tables: wide enough not to fold ids
    env.update(extra)
    return env


Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def prefix() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cli(redis_url: str, prefix: str) -> Cli:
    """``cli(*args, input=None)``: the command with this test's server and prefix
    (given as EVENTBUS_URL and EVENTBUS_PREFIX, as a user's shell would)."""

    def run(*args: str, input: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*COMMAND, *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=prefix, **env),
            check=False,
        )

    return run


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def failed(result: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The one line a failure prints (no traceback)."""
    assert result.returncode == status, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return result.stderr


def _wait_for_line(stream: Any, text: str) -> None:
    """Read ``stream`` up to a line containing ``text``; a stream that closes first
    fails here (a process that hangs silent is ended by pytest-timeout)."""
    seen = []
    while True:
        line = stream.readline()
        assert line, f"no line with {text!r} in {seen}"
        if text in line:
            return
        seen.append(line)


def json_lines(text: str) -> list[Any]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# -- help and start-up ----------------------------------------------------------------


def _commands(group: click.Group, path: list[str]) -> Iterator[tuple[list[str], bool]]:
    """Every command and group under ``group``: (its words, whether it is a group)."""
    yield path, True
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, [*path, name])
        else:
            yield [*path, name], False


COMMANDS = list(_commands(cli_group, []))


def test_help_of_every_command_and_subcommand() -> None:
    # All at once: each is a process start, and they are independent.
    assert len(COMMANDS) >= 17  # the reading sees them all
    procs = [
        (
            args,
            is_group,
            subprocess.Popen(
                [*COMMAND, *args, "--help"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            ),
        )
        for args, is_group in COMMANDS
    ]
    for args, is_group, proc in procs:
        out, err = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0, (args, err)
        assert out.startswith(f"Usage: eventbus {' '.join(args)}".rstrip()), (args, out)
        if is_group:
            assert "Commands:" in out, args
        else:  # a command: it connects
            assert "--url URL" in out, args
            assert "EVENTBUS_URL" in out, args


def test_help_loads_neither_redis_nor_rich() -> None:
    # What `eventbus --help` loads: click and the command declarations, not the
    # commands' work, not the bus (eventbus's names load on first use).
    code = (
        "import sys; from eventbus._cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "bad = [m for m in ('redis', 'rich', 'anyio', 'eventbus._bus', 'eventbus._cli._commands',"
        " 'starlette', 'uvicorn', 'eventbus._cli._dashboard') if m in sys.modules]\n"
        "print('LOADED', bad)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LOADED []"), out.stdout


def test_help_is_quick() -> None:
    # A generous bound for a loaded two-core CI machine: 0.06 s here (0.3 s when
    # `import eventbus` loaded the bus; see docs/cli.md, "Start-up time").
    start = time.monotonic()
    out = subprocess.run(
        [*COMMAND, "--help"], capture_output=True, text=True, env=_env(), timeout=TIMEOUT
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0
    assert elapsed < 2.0, elapsed


def test_python_m_and_version() -> None:
    from eventbus import __version__

    result = subprocess.run(
        [sys.executable, "-m", "eventbus._cli", "--version"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
    )
    assert ok(result).strip() == f"eventbus, version {__version__}"


def test_usage_errors_exit_2(cli: Cli) -> None:
    assert "not JSON" in failed(cli("publish", "orders", "{oops"), 2)
    assert "No such command" in failed(cli("nonsense"), 2)
    assert "KEY=VALUE" in failed(cli("publish", "orders", "1", "-H", "novalue"), 2)
    assert "--delay or --at" in failed(
        cli("publish", "o", "1", "--delay", "5", "--at", "2030-01-01T00:00:00Z"), 2
    )
    assert "duration" in failed(cli("publish", "orders", "1", "--delay", "soon"), 2)
    assert "prefix" in failed(cli("stats", "--prefix", "bad:prefix"), 2)


def test_unreachable_redis_is_one_line_and_status_1(cli: Cli) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    err = failed(cli("stats", "--url", url))
    assert err.count("\n") == 1, err
    assert "unavailable" in err.lower() or "connect" in err.lower(), err


def test_url_and_prefix_on_the_group_or_the_command(redis_url: str, prefix: str) -> None:
    ok(
        subprocess.run(
            [*COMMAND, "--url", redis_url, "--prefix", prefix, "publish", "a", "1", "--durable"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            env=_env(),
        )
    )
    # The command's options, then the group's, then the environment (unreachable here).
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = _env(EVENTBUS_URL=dead, EVENTBUS_PREFIX="elsewhere")
    for args in (
        ["--url", redis_url, "--prefix", prefix, "stats", "--json"],
        ["--url", dead, "stats", "--json", "--url", redis_url, "--prefix", prefix],
    ):
        result = subprocess.run(
            [*COMMAND, *args], capture_output=True, text=True, timeout=TIMEOUT, env=env
        )
        assert [t["name"] for t in json.loads(ok(result))["topics"]] == ["a"], args
    bad = subprocess.run(
        [*COMMAND, "stats"], capture_output=True, text=True, timeout=TIMEOUT, env=env
    )
    assert "unavailable" in failed(bad).lower()
    bad_prefix = subprocess.run(
        [*COMMAND, "stats"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(EVENTBUS_PREFIX="no:colons"),
    )
    assert "EVENTBUS_PREFIX" in failed(bad_prefix, 2)


def test_the_embedded_default_says_it_keeps_nothing(prefix: str) -> None:
    result = subprocess.run(
        [*COMMAND, "stats", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(EVENTBUS_PREFIX=prefix),
    )
    assert result.returncode == 0, result.stderr
    assert "embedded redis-server" in result.stderr
    assert json.loads(result.stdout) == {
        "topics": [],
        "queues": [],
        "delayed": [],
        "schedules": [],
    }


# -- publish and tail -----------------------------------------------------------------


def test_publish_from_stdin_then_tail_until_caught_up(cli: Cli) -> None:
    events = [{"n": i, "text": f"event {i}"} for i in range(5)] + ["plain", 7, None]
    lines = "\n".join(json.dumps(e) for e in events) + "\n\n"
    published = json_lines(ok(cli("publish", "orders", "-", "--durable", "--json", input=lines)))
    assert len(published) == len(events)
    assert all(p["topic"] == "orders" and p["stream_id"] for p in published)

    out = ok(cli("tail", "orders", "--until-caught-up", "--json"))
    got = json_lines(out)
    assert [g["data"] for g in got] == events
    assert [g["id"] for g in got] == [p["id"] for p in published]

    # Plain lines: time, id, JSON; and --from an event id reads from that event on.
    out = ok(cli("tail", "orders", "--until-caught-up", "--from", published[5]["id"]))
    assert [line.split(" ", 2)[2] for line in out.splitlines()] == ['"plain"', "7", "null"]
    assert out.splitlines()[0].split(" ")[1] == published[5]["id"]


def test_a_tail_into_a_closed_pipe_ends_quietly(cli: Cli, redis_url: str, prefix: str) -> None:
    ok(cli("publish", "many", "-", "--durable", input="1\n" * 5000))
    tail = subprocess.Popen(
        [*COMMAND, "tail", "many", "--from", "earliest"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=prefix),
    )
    assert tail.stdout is not None
    assert tail.stdout.readline()  # like `| head -1`
    tail.stdout.close()
    _, err = tail.communicate(timeout=TIMEOUT)
    assert tail.returncode == 141, err
    assert "Traceback" not in err
    assert "Error" not in err


def test_publish_an_event_with_headers_to_a_stream_found_by_its_kind(cli: Cli) -> None:
    ok(cli("publish", "audit", '{"first": true}', "--durable"))
    # No --durable now: the stream exists, so the topic is durable.
    result = cli("publish", "audit", '{"who": "me"}', "-H", "trace=t-1", "-H", "a=b")
    (event_id, stream_id) = ok(result).split()
    assert "live" not in result.stderr
    (last,) = json_lines(
        ok(cli("tail", "audit", "--until-caught-up", "--json", "--from", stream_id))
    )
    assert last["id"] == event_id
    assert last["headers"] == {"trace": "t-1", "a": "b"}
    assert last["data"] == {"who": "me"}


def test_tail_of_a_live_topic_shows_what_is_published_meanwhile(
    cli: Cli, redis_url: str, prefix: str
) -> None:
    tail = subprocess.Popen(
        [*COMMAND, "tail", "prices", "--live", "--count", "2", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=prefix),
    )
    try:
        assert tail.stderr is not None
        _wait_for_line(tail.stderr, "tailing 'prices' (live)")  # subscribed
        (first,) = json_lines(ok(cli("publish", "prices", '{"p": 1}', "--json")))
        assert first["receivers"] == 1  # the tail's subscription
        ok(cli("publish", "prices", '{"p": 2}'))
        out, _ = tail.communicate(timeout=TIMEOUT)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 0
    got = json_lines(out)
    assert [g["data"] for g in got] == [{"p": 1}, {"p": 2}]
    assert got[0]["id"] == first["id"]


def test_sigterm_ends_a_tail_and_its_embedded_server(prefix: str) -> None:
    import psutil

    tail = subprocess.Popen(
        [*COMMAND, "tail", "prices"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(EVENTBUS_PREFIX=prefix),  # no URL: an embedded server
    )
    try:
        assert tail.stderr is not None
        _wait_for_line(tail.stderr, "tailing 'prices'")
        (server,) = psutil.Process(tail.pid).children()
        assert "redis-server" in server.name()
        tail.send_signal(signal.SIGTERM)
        _, err = tail.communicate(timeout=TIMEOUT)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
    assert tail.returncode == 143
    assert "Traceback" not in err
    assert not server.is_running()


def test_a_live_topic_has_no_history_to_tail(cli: Cli) -> None:
    err = failed(cli("tail", "nothing-here", "--until-caught-up"), 2)
    assert "live" in err
    assert "--durable" in err


# -- stats and groups -------------------------------------------------------------------


@pytest.fixture
def group_state(cli: Cli, redis_url: str, prefix: str) -> Iterator[None]:
    """``orders`` with 4 events; group ``billing`` read 3 of them (member ``c1`` holds
    2, ``c2`` acked its one); group ``audit`` read none."""
    ok(cli("publish", "orders", "-", "--durable", input="1\n2\n3\n4\n"))

    async def make() -> None:
        async with control_client(redis_url) as admin:
            stream = f"{prefix}:{{orders}}:stream"
            await admin.xgroup_create(stream, "billing", id="0")
            await admin.xgroup_create(stream, "audit", id="0")
            await admin.xreadgroup("billing", "c1", {stream: ">"}, count=2)
            ((_, [(entry_id, _)]),) = await admin.xreadgroup(
                "billing", "c2", {stream: ">"}, count=1
            )
            await admin.xack(stream, "billing", entry_id)

    import anyio

    anyio.run(make)
    return


@pytest.mark.usefixtures("group_state")
def test_groups_lists_members_pending_and_lag(cli: Cli) -> None:
    doc = json.loads(ok(cli("groups", "orders", "--json")))
    assert doc["topic"] == "orders"
    billing, audit = sorted(doc["groups"], key=lambda g: g["name"], reverse=True)
    assert billing["name"] == "billing"
    assert (billing["consumers"], billing["pending"]) == (2, 2)
    members = {m["name"]: m for m in billing["members"]}
    assert members["c1"]["pending"] == 2
    assert members["c2"]["pending"] == 0
    assert members["c1"]["idle_ms"] >= 0
    assert audit["name"] == "audit"
    assert audit["pending"] == 0
    if billing["lag"] is not None:  # Redis 7+
        assert (billing["lag"], audit["lag"]) == (1, 4)

    table = ok(cli("groups", "orders"))
    assert "billing" in table
    assert "c1" in table
    assert "Members" in table


@pytest.mark.usefixtures("group_state")
def test_stats_tables_and_json(cli: Cli) -> None:
    doc = json.loads(ok(cli("stats", "--json")))
    (orders,) = doc["topics"]
    assert orders["name"] == "orders"
    assert orders["length"] == 4
    assert {g["name"]: g["pending"] for g in orders["groups"]} == {"billing": 2, "audit": 0}

    table = ok(cli("stats"))
    assert "Topics" in table
    assert "Groups" in table
    assert "billing" in table
    assert json.loads(ok(cli("stats", "orders", "--json")))["topics"][0]["name"] == "orders"


def test_groups_of_a_topic_without_a_stream(cli: Cli) -> None:
    err = failed(cli("groups", "missing"))
    assert "no stream" in err


# -- dead letters ---------------------------------------------------------------------


@pytest.fixture
def dead_letters(redis_url: str, prefix: str) -> list[str]:
    """Three events of ``jobs`` dead-lettered by group ``workers`` (one attempt each);
    their event ids."""
    jobs = Topic("jobs", durable=True)

    async def make() -> list[str]:
        bus = EventBus(redis_url, prefix=prefix)

        @bus.on(jobs, group="workers", max_attempts=1)
        async def fail(job: Any) -> None:
            raise RuntimeError(f"cannot do job {job}")

        async with bus:
            receipts = await bus.publish_many(jobs, [{"job": i} for i in range(3)])

            async def all_dead() -> bool:
                return (await bus.stats(jobs)).topic("jobs").dead_letters == 3

            await wait_until(all_dead, timeout=10)
        return [r.id for r in receipts]

    import anyio

    return anyio.run(make)


def test_dlq_list_show_and_replay(cli: Cli, dead_letters: list[str]) -> None:
    listed = json.loads(ok(cli("dlq", "list", "jobs", "--json")))
    assert sorted(d["event_id"] for d in listed) == sorted(dead_letters)  # in failure order
    first = next(d for d in listed if d["event_id"] == dead_letters[0])
    assert first["group"] == "workers"
    assert first["reason"] == "handler_error"
    assert first["error_type"] == "RuntimeError"
    assert first["data"] == {"job": 0}

    table = ok(cli("dlq", "list", "jobs"))
    assert first["id"] in table
    assert "RuntimeError" in table

    shown = json.loads(ok(cli("dlq", "show", "jobs", first["id"], "--json")))
    assert "cannot do job" in shown["traceback"]
    text = ok(cli("dlq", "show", "jobs", first["id"]))
    assert "traceback:" in text
    assert '{"job":0}' in text
    assert "no dead letter" in failed(cli("dlq", "show", "jobs", "1-1"))

    # Replay one by id, then the rest.
    assert json.loads(ok(cli("dlq", "replay", "jobs", first["id"], "--json")))["replayed"] == 1
    assert "replayed 2 dead letter(s)" in ok(cli("dlq", "replay", "jobs"))
    assert json.loads(ok(cli("dlq", "list", "jobs", "--json"))) == []
    replayed = json_lines(ok(cli("tail", "jobs", "--until-caught-up", "--json")))
    assert sorted(e["id"] for e in replayed[3:]) == sorted(dead_letters)  # same ids, back


def test_dlq_purge_asks_first(cli: Cli, dead_letters: list[str]) -> None:
    declined = cli("dlq", "purge", "jobs", input="n\n")
    assert "Delete all 3 dead letter(s) of topic 'jobs'?" in failed(declined)
    assert len(json.loads(ok(cli("dlq", "list", "jobs", "--json")))) == 3

    one = json.loads(ok(cli("dlq", "list", "jobs", "--json", "-n", "1")))[0]["id"]
    assert "purged 1" in ok(cli("dlq", "purge", "jobs", one, input="y\n"))
    assert json.loads(ok(cli("dlq", "purge", "jobs", "--yes", "--json"))) == {
        "topic": "jobs",
        "purged": 2,
    }
    assert "no dead letters" in ok(cli("dlq", "purge", "jobs"))
    assert "no dead letters" in ok(cli("dlq", "list", "jobs"))


# -- delayed and recurring events ------------------------------------------------------


def test_scheduled_list_and_cancel(cli: Cli) -> None:
    (receipt,) = json_lines(ok(cli("publish", "reminders", '{"r": 1}', "--delay", "1h", "--json")))
    ok(cli("publish", "reports", "2", "--durable", "--delay", "2h"))
    assert receipt["due"] is not None

    pending = json.loads(ok(cli("scheduled", "list", "--json")))
    assert [(p["topic"], p["data"], p["durable"]) for p in pending] == [
        ("reminders", {"r": 1}, False),
        ("reports", 2, True),
    ]
    assert pending[0]["id"] == receipt["id"]
    assert len(json.loads(ok(cli("scheduled", "list", "--topic", "reports", "--json")))) == 1
    assert "reminders" in ok(cli("scheduled", "list"))
    assert "Delayed events" in ok(cli("stats"))

    assert "cancelled" in ok(cli("scheduled", "cancel", receipt["id"], "--topic", "reminders"))
    assert "not pending" in failed(cli("scheduled", "cancel", receipt["id"]))
    assert [p["topic"] for p in json.loads(ok(cli("scheduled", "list", "--json")))] == ["reports"]


def test_schedules_list_and_remove(cli: Cli, redis_url: str, prefix: str) -> None:
    async def make() -> None:
        async with EventBus(redis_url, prefix=prefix, scheduler=False) as bus:
            await bus.schedule(
                "nightly", Topic("reports", durable=True), {"r": 1}, cron="0 2 * * *"
            )

    import anyio

    anyio.run(make)
    (nightly,) = json.loads(ok(cli("schedules", "list", "--json")))
    assert (nightly["name"], nightly["topic"], nightly["cron"]) == (
        "nightly",
        "reports",
        "0 2 * * *",
    )
    assert nightly["next_due"] is not None
    assert "nightly" in ok(cli("schedules", "list"))
    assert "removed" in ok(cli("schedules", "remove", "nightly"))
    assert "no recurring event" in failed(cli("schedules", "remove", "nightly"))
    assert json.loads(ok(cli("schedules", "list", "--json"))) == []


def test_run_refuses_a_target_it_cannot_import(cli: Cli) -> None:
    assert "no module named 'nowhere'" in failed(cli("run", "nowhere:bus"), status=2)
    assert "package.module:bus" in failed(cli("run", "nowhere"), status=2)


# -- work queues ------------------------------------------------------------------------


@pytest.fixture
def queue_with_dead_jobs(redis_url: str, prefix: str) -> list[str]:
    """Queue ``thumbs`` (3 priorities): 2 jobs that failed for good (their ids), 5 left
    waiting at priority 0 and 1 at priority 2, no worker running."""
    from eventbus import Queue, RetryPolicy

    thumbs = Queue("thumbs", priorities=3)

    async def make() -> list[str]:
        bus = EventBus(redis_url, prefix=prefix)
        failing = Queue("thumbs", priorities=3)

        @bus.worker(failing, retry=RetryPolicy(max_attempts=1))
        async def fail(job: Any) -> None:
            raise RuntimeError(f"cannot resize {job}")

        async with bus:
            receipts = await bus.enqueue_many(thumbs, [{"img": i} for i in range(2)])

            async def both_dead() -> bool:
                return (await bus.stats(thumbs)).queue("thumbs").dead_letters == 2

            await wait_until(both_dead, timeout=10)
        async with EventBus(redis_url, prefix=prefix) as producer:
            await producer.enqueue_many(thumbs, [{"img": i} for i in range(10, 15)])
            await producer.enqueue(thumbs, {"img": 99}, priority=2)
        return [r.id for r in receipts]

    import anyio

    return anyio.run(make)


def test_queues_lists_waiting_jobs_per_priority(cli: Cli, queue_with_dead_jobs: list[str]) -> None:
    (q,) = json.loads(ok(cli("queues", "--json")))
    assert q["name"] == "thumbs"
    assert q["waiting"] == [5, 0, 1]
    assert q["dead_letters"] == 2
    assert q["workers"] == 0
    assert q["processing"] == 0
    assert q["failed"] == 2
    assert q["oldest_waiting_age"] is not None
    table = ok(cli("queues"))
    assert "thumbs" in table
    assert "5 / 0 / 1" in table
    assert "Queues" in ok(cli("stats"))
    assert json.loads(ok(cli("stats", "--json")))["queues"][0]["length"] == 6
    assert "no work queues" in ok(cli("queues", "--prefix", "nothing-here"))


def test_dlq_of_a_queue_list_show_replay_purge(cli: Cli, queue_with_dead_jobs: list[str]) -> None:
    listed = json.loads(ok(cli("dlq", "list", "thumbs", "--queue", "--json")))
    assert sorted(d["job_id"] for d in listed) == sorted(queue_with_dead_jobs)
    first = listed[0]
    assert first["reason"] == "handler_error"
    assert first["error_type"] == "RuntimeError"
    assert first["data"] in ({"img": 0}, {"img": 1})
    assert "RuntimeError" in ok(cli("dlq", "list", "thumbs", "--queue"))
    shown = json.loads(ok(cli("dlq", "show", "thumbs", first["id"], "--queue", "--json")))
    assert "cannot resize" in shown["traceback"]
    assert "traceback:" in ok(cli("dlq", "show", "thumbs", first["id"], "--queue"))
    assert "no dead letter" in failed(cli("dlq", "show", "thumbs", "1-1", "--queue"))

    replayed = json.loads(ok(cli("dlq", "replay", "thumbs", first["id"], "--queue", "--json")))
    assert replayed == {"queue": "thumbs", "replayed": 1}
    (q,) = json.loads(ok(cli("queues", "thumbs", "--json")))
    assert q["waiting"] == [6, 0, 1]
    assert q["dead_letters"] == 1

    declined = cli("dlq", "purge", "thumbs", "--queue", input="n\n")
    assert "Delete all 1 dead letter(s)" in failed(declined)
    assert "purged 1" in ok(cli("dlq", "purge", "thumbs", "--queue", "--yes"))
    assert json.loads(ok(cli("dlq", "list", "thumbs", "--queue", "--json"))) == []
