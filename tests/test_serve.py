"""Running a bus as a service: ``python -m eventbus run`` and ``EventBus.serve`` under
real signals, stable consumer names, and the removal of consumers that left.

The subprocess tests run ``tests.serve_app:bus`` (a group handler that sleeps
``SERVE_DELAY`` seconds and logs ``start``/``done`` lines to an oracle file) and
count what Redis holds afterwards: pending entries per consumer (``XPENDING``) and the
group's consumers (``XINFO CONSUMERS``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
import redis.asyncio as aioredis

from eventbus import ClaimPolicy, EventBus, RetryPolicy, Topic
from eventbus._keys import member_lease, topic_keys
from eventbus._runner import load
from eventbus._streams._options import group_options
from eventbus.errors import BusStateError, ConfigurationError

from .helpers import control_client, wait_until

ROOT = Path(__file__).resolve().parents[1]
HOST = socket.gethostname()
TOPIC = "orders"
GROUP = "billing"


class Service:
    """One ``python -m eventbus run`` process and what it wrote."""

    def __init__(self, tmp: Path, env: dict[str, str], argv: list[str]) -> None:
        self.stderr_path = tmp / f"stderr-{uuid.uuid4().hex[:6]}.txt"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "run", "tests.serve_app:bus", *argv],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def exit_code(self, timeout: float) -> int:
        await wait_until(lambda: self.proc.poll() is not None, timeout=timeout, interval=0.05)
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture
def service(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    oracle = tmp_path / "oracle.txt"
    started: list[Service] = []

    def start(
        *argv: str, delay: float = 1.0, concurrency: int = 2, name: str | None = None
    ) -> Service:
        env = dict(
            os.environ,
            SERVE_URL=redis_url,
            SERVE_PREFIX=prefix,
            SERVE_ORACLE=str(oracle),
            SERVE_DELAY=str(delay),
            SERVE_CONCURRENCY=str(concurrency),
        )
        env.pop("EVENTBUS_SLOT", None)
        env.pop("EVENTBUS_NAME", None)
        if name is not None:  # the environment variable, as a deployment would set it
            env["EVENTBUS_NAME"] = name
        svc = Service(tmp_path, env, list(argv))
        started.append(svc)
        return svc

    start.prefix = prefix  # type: ignore[attr-defined]
    start.oracle = oracle  # type: ignore[attr-defined]
    yield start
    for svc in started:
        svc.kill()


def lines(oracle: Path, kind: str) -> list[int]:
    if not oracle.exists():
        return []
    return [
        int(parts[1])
        for parts in (line.split() for line in oracle.read_text().splitlines())
        if parts and parts[0] == kind
    ]


async def consumers(client: aioredis.Redis, stream: str) -> dict[str, int]:
    """The group's consumers and their pending counts (none if the group does not exist)."""
    try:
        rows = await client.xinfo_consumers(stream, GROUP)
    except Exception:
        return {}
    return {row["name"]: int(row["pending"]) for row in rows}


async def pending_by_consumer(client: aioredis.Redis, stream: str) -> dict[str, int]:
    summary = await client.xpending(stream, GROUP)
    return {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}


async def publish(redis_url: str, prefix: str, count: int) -> None:
    async with EventBus(redis_url, prefix=prefix) as bus:
        topic: Topic[dict[str, int]] = Topic(TOPIC, dict[str, int], durable=True)
        await bus.publish_many(topic, [{"n": n} for n in range(count)])


def assert_quiet(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "KeyboardInterrupt" not in stderr, stderr


async def test_sigterm_drains_exits_zero_and_the_restart_reuses_the_name(
    service: Any, redis_url: str
) -> None:
    client = control_client(redis_url)
    stream = topic_keys(service.prefix, TOPIC).stream
    name = f"{HOST}:0"
    first = service("--grace", "10", delay=1.0, concurrency=2)
    await wait_until(lambda: _has_consumer(client, stream, name), timeout=20)
    await publish(redis_url, service.prefix, 6)
    await wait_until(lambda: len(lines(service.oracle, "start")) >= 2, timeout=10)
    first.signal(signal.SIGTERM)
    assert await first.exit_code(timeout=20) == 0, first.stderr()
    assert_quiet(first.stderr())
    started, done = lines(service.oracle, "start"), lines(service.oracle, "done")
    assert sorted(started) == sorted(done)  # every handler that began finished
    assert len(done) >= 2
    # The rest were handed back: pending under the slot's name, nothing elsewhere.
    assert await pending_by_consumer(client, stream) == {name: 6 - len(done)}

    second = service("--grace", "10", delay=0.05)
    await wait_until(lambda: set(lines(service.oracle, "done")) == set(range(6)), timeout=20)
    assert sorted(lines(service.oracle, "done")) == list(range(6))  # none twice
    await wait_until(lambda: _nothing_pending(client, stream), timeout=10)
    assert list(await consumers(client, stream)) == [name]  # the same name, no new one
    second.signal(signal.SIGINT)
    assert await second.exit_code(timeout=20) == 0, second.stderr()
    assert_quiet(second.stderr())
    # Left cleanly with nothing pending: no consumer is left in the group.
    assert await consumers(client, stream) == {}
    await client.aclose()


async def test_a_second_signal_exits_at_once_and_loses_nothing(
    service: Any, redis_url: str
) -> None:
    client = control_client(redis_url)
    stream = topic_keys(service.prefix, TOPIC).stream
    name = f"{HOST}:0"
    first = service("--grace", "60", delay=60.0, concurrency=2)
    await wait_until(lambda: _has_consumer(client, stream, name), timeout=20)
    await publish(redis_url, service.prefix, 6)
    await wait_until(lambda: len(lines(service.oracle, "start")) >= 2, timeout=10)
    first.signal(signal.SIGTERM)
    await wait_until(lambda: "draining" in first.stderr(), timeout=10)
    first.signal(signal.SIGTERM)
    t0 = time.monotonic()
    assert await first.exit_code(timeout=15) == 0
    assert time.monotonic() - t0 < 10  # not the 60 s grace, nor the 60 s handlers
    assert_quiet(first.stderr())
    assert lines(service.oracle, "done") == []
    assert await pending_by_consumer(client, stream) == {name: 6}  # all still there

    second = service("--grace", "10", delay=0.05)
    await wait_until(lambda: set(lines(service.oracle, "done")) == set(range(6)), timeout=20)
    second.signal(signal.SIGTERM)
    assert await second.exit_code(timeout=20) == 0, second.stderr()
    assert await consumers(client, stream) == {}
    await client.aclose()


async def test_workers_run_one_process_per_slot_and_a_killed_one_is_restarted(
    service: Any, redis_url: str
) -> None:
    client = control_client(redis_url)
    stream = topic_keys(service.prefix, TOPIC).stream
    runner = service("--workers", "2", "--grace", "10", delay=0.05)
    names = {f"{HOST}:0", f"{HOST}:1"}
    await wait_until(lambda: _has_consumers(client, stream, names), timeout=30, interval=0.1)
    children = psutil.Process(runner.proc.pid).children()
    assert len(children) == 2
    victim = children[0]
    victim.kill()
    victim.wait(10)

    def replaced() -> bool:
        now = psutil.Process(runner.proc.pid).children()
        return len(now) == 2 and victim.pid not in {c.pid for c in now}

    await wait_until(replaced, timeout=20, interval=0.1)
    await publish(redis_url, service.prefix, 20)
    await wait_until(lambda: set(lines(service.oracle, "done")) >= set(range(20)), timeout=30)
    await wait_until(lambda: _nothing_pending(client, stream), timeout=10)
    assert set(await consumers(client, stream)) <= names  # no name beyond the two slots
    runner.signal(signal.SIGTERM)
    assert await runner.exit_code(timeout=30) == 0, runner.stderr()
    assert_quiet(runner.stderr())
    assert all(not psutil.pid_exists(c.pid) or _zombie(c) for c in children[1:])
    assert await consumers(client, stream) == {}
    await client.aclose()


async def test_a_signal_while_the_workers_start_up_still_exits_zero(
    service: Any, redis_url: str
) -> None:
    runner = service("--workers", "2", "--grace", "10", delay=0.05)
    await wait_until(
        lambda: len(psutil.Process(runner.proc.pid).children()) == 2, timeout=20, interval=0.01
    )
    runner.signal(signal.SIGINT)  # the workers are still importing, or connecting
    assert await runner.exit_code(timeout=30) == 0, runner.stderr()
    assert_quiet(runner.stderr())


async def test_two_runners_on_one_host_serve_one_group_under_their_own_names(
    service: Any, redis_url: str
) -> None:
    # Without --name both would run as <host>:0 and the second would be refused.
    client = control_client(redis_url)
    stream = topic_keys(service.prefix, TOPIC).stream
    blue = service("--name", "blue", "--grace", "10", delay=0.05)
    green = service("--workers", "2", "--grace", "10", delay=0.05, name="green")
    names = {"blue:0", "green:0", "green:1"}
    await wait_until(lambda: _has_consumers(client, stream, names), timeout=30, interval=0.1)
    await publish(redis_url, service.prefix, 40)
    await wait_until(lambda: set(lines(service.oracle, "done")) >= set(range(40)), timeout=30)
    await wait_until(lambda: _nothing_pending(client, stream), timeout=10)
    assert set(await consumers(client, stream)) <= names
    assert blue.proc.poll() is None
    assert green.proc.poll() is None
    for runner in (blue, green):
        runner.signal(signal.SIGTERM)
    for runner in (blue, green):
        assert await runner.exit_code(timeout=30) == 0, runner.stderr()
        assert_quiet(runner.stderr())
        assert "ConsumerNameInUse" not in runner.stderr()
    assert await consumers(client, stream) == {}
    await client.aclose()


def _zombie(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _has_consumer(client: aioredis.Redis, stream: str, name: str) -> bool:
    return await _has_consumers(client, stream, {name})


async def _has_consumers(client: aioredis.Redis, stream: str, names: set[str]) -> bool:
    """Whether a member runs under each of ``names`` (holds its lease: Redis 6.2 adds
    a consumer to the group only once it was delivered something)."""
    keys = topic_keys(stream.split(":")[0], TOPIC)
    found = await client.exists(*(member_lease(keys, GROUP, name) for name in names))
    return int(found) == len(names)


async def _nothing_pending(client: aioredis.Redis, stream: str) -> bool:
    summary = await client.xpending(stream, GROUP)
    return int(summary["pending"]) == 0


# -- consumer names and their removal (in process) ----------------------------------------


def test_default_names_are_unique_outside_the_runner_and_stable_under_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    topic = Topic("t", durable=True)

    def options() -> Any:
        return group_options(
            topic,
            group="g",
            consumer=None,
            concurrency=1,
            max_attempts=None,
            claim_idle=None,
            retry=RetryPolicy(),
            claim=ClaimPolicy(),
            batch=10,
            block=1.0,
            start="earliest",
            publish_to=None,
            dedupe=None,
        )

    monkeypatch.delenv("EVENTBUS_SLOT", raising=False)
    monkeypatch.delenv("EVENTBUS_NAME", raising=False)
    a, b = options(), options()
    assert a.consumer != b.consumer
    assert not a.stable_name
    monkeypatch.setenv("EVENTBUS_SLOT", "3")
    c = options()
    assert c.consumer == f"{HOST}:3"
    assert c.stable_name
    monkeypatch.setenv("EVENTBUS_NAME", "api-blue")
    assert options().consumer == "api-blue:3"


async def test_members_of_one_group_in_one_slot_get_distinct_stable_names(
    bus_factory: Any, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVENTBUS_SLOT", "7")
    bus = bus_factory()
    topic = Topic(TOPIC, durable=True)

    @bus.on(topic, group=GROUP, block=0.2)
    async def one(event: Any) -> None: ...

    @bus.on(topic, group=GROUP, block=0.2)
    async def two(event: Any) -> None: ...

    client = control_client(redis_url)
    stream = topic_keys(bus.prefix, TOPIC).stream
    async with bus:
        expected = {f"{HOST}:7", f"{HOST}:7.1"}
        await wait_until(lambda: _has_consumers(client, stream, expected), timeout=5)
    assert await consumers(client, stream) == {}  # both left cleanly
    await client.aclose()


async def test_live_members_remove_stale_consumers_with_nothing_pending(
    bus_factory: Any, redis_url: str
) -> None:
    bus = bus_factory()
    topic = Topic(TOPIC, durable=True)
    client = control_client(redis_url)
    keys = topic_keys(bus.prefix, TOPIC)
    await client.xgroup_create(keys.stream, GROUP, id="0", mkstream=True)
    await client.xadd(keys.stream, {"x": "1"})
    for ghost in ("gone", "leased", "holding"):
        await client.xgroup_createconsumer(keys.stream, GROUP, ghost)
    await client.xreadgroup(GROUP, "holding", {keys.stream: ">"}, count=1)
    await client.set(member_lease(keys, GROUP, "leased"), "someone", px=60_000)

    # claim idle 0.3 s: stale after 3 s idle, swept every 0.3 s.
    @bus.on(
        topic, group=GROUP, consumer="live", block=0.2, claim=ClaimPolicy(idle=0.3, interval=0.1)
    )
    async def handle(event: Any) -> None: ...

    stream = keys.stream
    async with bus:
        # "gone" goes once idle past 3 s; "holding"'s entry is claimed first (idle
        # past 0.3 s), then it has nothing pending and goes too; "leased" stays.
        await wait_until(
            lambda: _names_are(client, stream, {"live", "leased"}), timeout=10, interval=0.1
        )
    assert set(await consumers(client, stream)) == {"leased"}
    await client.aclose()


async def _names_are(client: aioredis.Redis, stream: str, names: set[str]) -> bool:
    return set(await consumers(client, stream)) == names


# -- serve() in this process ---------------------------------------------------------------


async def test_serve_on_an_open_bus_returns_on_sigterm_and_leaves_the_bus_open(
    bus_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="eventbus")
    bus = bus_factory()
    async with bus:
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(bus.serve)
                # Logged once its signal receiver is open: the signal is caught.
                await wait_until(lambda: "serving" in caplog.text, timeout=5)
                os.kill(os.getpid(), signal.SIGTERM)
        assert "SIGTERM received, draining" in caplog.text
        await bus.publish("still-open", {"n": 1})  # the block's exit is the drain


async def test_serve_refuses_a_negative_grace_and_a_closed_bus(bus_factory: Any) -> None:
    bus = bus_factory()
    with pytest.raises(ConfigurationError, match="grace"):
        await bus.serve(grace=-1)
    async with bus:
        pass
    with pytest.raises(BusStateError):
        await bus.serve()


# -- the runner's pieces ---------------------------------------------------------------------


def test_load_takes_a_bus_or_a_factory_and_refuses_anything_else(
    monkeypatch: pytest.MonkeyPatch, redis_url: str
) -> None:
    monkeypatch.setenv("SERVE_URL", redis_url)
    monkeypatch.setenv("SERVE_PREFIX", "p")
    assert isinstance(load("tests.serve_app:factory"), EventBus)
    with pytest.raises(ConfigurationError, match=r"package\.module:bus"):
        load("tests.serve_app")
    with pytest.raises(ConfigurationError, match="no attribute"):
        load("tests.serve_app:nothing")
    with pytest.raises(ConfigurationError, match="not an EventBus"):
        load("tests.serve_app:orders")


def test_a_bad_target_is_refused_with_status_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "eventbus", "run", "no_such_module_x:bus", "--workers", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "no module named 'no_such_module_x'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_bad_runner_name_is_refused_with_status_2() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "eventbus", "run", "tests.serve_app:bus", "--name", "a b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert "runner name 'a b' must not contain spaces" in out.stderr
    assert "Traceback" not in out.stderr


async def test_reload_restarts_the_worker_on_a_change_and_stops_on_sigterm(
    tmp_path: Path, redis_url: str
) -> None:
    app = tmp_path / "reload_app.py"
    app.write_text(
        "import os\n"
        "from eventbus import EventBus, Topic\n"
        "bus = EventBus(os.environ['SERVE_URL'], prefix=os.environ['SERVE_PREFIX'])\n"
        "@bus.on(Topic('orders', durable=True), group='billing', block=0.2)\n"
        "async def handle(event: object) -> None: ...\n"
    )
    env = dict(os.environ, SERVE_URL=redis_url, SERVE_PREFIX=f"t{uuid.uuid4().hex[:8]}")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("EVENTBUS_SLOT", None)
    stderr = tmp_path / "stderr.txt"
    with stderr.open("wb") as err:
        proc = _spawn(["reload_app:bus", "--reload"], tmp_path, env, err)
        try:
            await wait_until(lambda: stderr.read_text().count("serving") == 1, timeout=20)
            app.write_text(app.read_text() + "# changed\n")
            await wait_until(lambda: stderr.read_text().count("serving") == 2, timeout=20)
            proc.send_signal(signal.SIGTERM)
            await wait_until(lambda: proc.poll() is not None, timeout=20)
            assert proc.returncode == 0
            assert "Traceback" not in stderr.read_text()
            assert "changed; restarting" in stderr.read_text()
        finally:
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait(10)


def _spawn(argv: list[str], cwd: Path, env: dict[str, str], err: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "eventbus", "run", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=err,
    )
