"""RELIABILITY.md F31(a), measured ahead of the Cluster work: which calls eventbus
sends would be refused with ``CROSSSLOT`` on a Redis Cluster.

A private standalone redis-server runs ``MONITOR`` on a control connection while one
bus walks a happy path touching every feature (live and durable publishing, a
consumer group retrying, dead-lettering, replaying and chaining, dedupe, live
subscribers of durable topics (the stream tail), delayed events released and
cancelled, a recurring event, a work queue's enqueue, workers acking, retrying,
delaying and dead-lettering jobs, ``bus.stats()``). Every command
the bus sent is read back from MONITOR; for each one naming several keys (a script
with ``numkeys > 1``, a multi-key command found with ``COMMAND GETKEYS``, or the
commands of one ``MULTI``/``EXEC``), each key's Cluster slot is computed (CRC16 and
the hash-tag rule, as ``CLUSTER KEYSLOT`` would on a cluster). Calls whose keys span
several slots are what the Cluster work has to change.

The set of such calls must equal ``KNOWN_CROSS_SLOT``: a new cross-slot call fails
this test, and a fixed one fails it too until the list shrinks. The happy path must
also have run every script in ``EXPECTED_SCRIPTS``, so the audit cannot pass by
running nothing. ``pytest -s`` prints the table (call, slots of its keys, the keys
outside the first key's slot).
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Any, Final

import anyio
import pytest
import redis.asyncio as aioredis
from anyio.abc import TaskStatus
from redis.crc import key_slot
from redis.exceptions import ResponseError

from eventbus import ClaimPolicy, Delivery, EventBus, Queue, RetryPolicy, Topic, _scripts
from eventbus._server import RedisServer

from .helpers import wait_until

pytestmark = pytest.mark.wire

KNOWN_CROSS_SLOT: Final = frozenset(
    {
        "ACK_PUBLISH",  # input topic's stream and output topic's stream: two hash tags
        "DELAYED_CANCEL",  # {prefix}:delayed, the index of topics with delayed events
        "DELAYED_RELEASE",  # {prefix}:delayed, the index of topics with delayed events
        "DELAYED_SCHEDULE",  # {prefix}:delayed, the index of topics with delayed events
        "MULTI[HDEL,ZREM]",  # unschedule(): {prefix}:recurring, :recurring:due, :recurring:last
        "MULTI[HGETALL,ZRANGE]",  # schedules(): {prefix}:recurring, :recurring:due, :last
        "QUEUE_RETRY",  # {prefix}:delayed, the index (a retry's backoff is a delayed job)
        "QUEUE_SCHEDULE",  # {prefix}:delayed, the index of delayed queue levels
        "RECURRING_DECLARE",  # {prefix}:recurring:due and {prefix}:recurring: no hash tag
        "RECURRING_FIRE",  # {prefix}:recurring, :due and :last beside the topic's stream
        "XREAD",  # the stream tail: one XREAD over every durable topic with live subscribers
    }
)
"""Calls (a script's name, a command, or ``MULTI[commands]``) whose keys span several
Cluster slots today, each with the key that takes it out of its topic's or queue's slot."""

EXPECTED_SCRIPTS: Final = frozenset(_scripts.__all__) - {
    "QUEUE_GIVE_BACK",  # only when a worker's reply to QUEUE_TAKE was lost
}
"""The scripts the happy path must run (all but those only faults reach)."""

SHA_NAMES: Final = {
    hashlib.sha1(getattr(_scripts, name).encode("utf-8")).hexdigest(): name
    for name in _scripts.__all__
}

# MONITOR prints each argument quoted, escaped as sdscatrepr does.
_LINE_RE: Final = re.compile(rb"^\d+\.\d+ \[\d+ ([^\]]*)\] (.*)$", re.DOTALL)
_ESCAPES: Final = {
    ord("n"): b"\n",
    ord("r"): b"\r",
    ord("t"): b"\t",
    ord("a"): b"\a",
    ord("b"): b"\b",
    ord('"'): b'"',
    ord("\\"): b"\\",
}


def parse_monitor_line(line: bytes) -> tuple[str, list[bytes]] | None:
    """``(client, argv)`` of one MONITOR line (client ``lua`` inside a script)."""
    match = _LINE_RE.match(line)
    if match is None:
        return None
    client, rest = match.group(1).decode(), match.group(2)
    argv: list[bytes] = []
    i = 0
    while i < len(rest):
        assert rest[i : i + 1] == b'"', f"unquoted MONITOR argument in {line!r}"
        i += 1
        arg = bytearray()
        while rest[i] != ord('"'):
            if rest[i] == ord("\\"):
                nxt = rest[i + 1]
                if nxt == ord("x"):
                    arg.append(int(rest[i + 2 : i + 4], 16))
                    i += 4
                else:
                    arg += _ESCAPES[nxt]
                    i += 2
            else:
                arg.append(rest[i])
                i += 1
        argv.append(bytes(arg))
        i += 2  # the closing quote and the space after it
    return client, argv


def test_parse_monitor_line_unescapes_arguments() -> None:
    line = rb'1.5 [0 127.0.0.1:5] "SET" "a \"b\"\\" "\x00\xff\n"'
    assert parse_monitor_line(line) == ("127.0.0.1:5", [b"SET", b'a "b"\\', b"\x00\xff\n"])
    assert parse_monitor_line(b"OK") is None


def test_key_slot_follows_the_hash_tag_rule() -> None:
    assert key_slot(b"foo") == 12182  # the Cluster spec's example (CLUSTER KEYSLOT foo)
    assert key_slot(b"eb:{orders}:stream") == key_slot(b"eb:{orders}:dlq") == key_slot(b"orders")
    assert key_slot(b"eb:delayed") != key_slot(b"eb:{orders}:stream")


class Monitor:
    """The commands a server ran, read from ``MONITOR`` until a marker shows up."""

    def __init__(self, url: str) -> None:
        self._client = aioredis.Redis.from_url(url)
        self.commands: list[tuple[str, list[bytes]]] = []
        self._marker = f"slot-audit-end-{uuid.uuid4().hex}".encode()
        self._done = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None]) -> None:
        async with self._client.monitor() as monitor:  # returns once MONITOR said OK
            task_status.started()
            assert monitor.connection is not None
            while True:
                line = await monitor.connection.read_response()
                parsed = parse_monitor_line(line)
                if parsed is None:
                    continue
                if parsed[1] == [b"ECHO", self._marker]:
                    self._done.set()
                    return
                self.commands.append(parsed)

    async def finish(self, url: str) -> None:
        """Send the marker on another connection and wait for MONITOR to show it:
        every command sent before it has been read then."""
        ctl = aioredis.Redis.from_url(url)
        try:
            await ctl.echo(self._marker)
        finally:
            await ctl.aclose()
        with anyio.fail_after(10):
            await self._done.wait()
        await self._client.aclose()


class Call:
    """One call that names keys: a command, a script, or a transaction."""

    def __init__(self, name: str, keys: list[bytes]) -> None:
        self.name = name
        self.keys = keys
        self.slots = [key_slot(k) for k in keys]

    @property
    def crosses(self) -> bool:
        return len(set(self.slots)) > 1

    def outside(self) -> list[str]:
        """The keys outside the first key's slot."""
        pairs = zip(self.keys, self.slots, strict=True)
        return sorted({k.decode() for k, s in pairs if s != self.slots[0]})


async def key_calls(url: str, commands: list[tuple[str, list[bytes]]]) -> list[Call]:
    """The calls among ``commands`` that name keys, each with its keys.

    Commands run inside a script (client ``lua``) are left out: a script's keys are
    its ``KEYS``, declared with the call. A ``MULTI``/``EXEC`` block of one client is
    one call with the keys of all its commands (Cluster refuses it across slots)."""
    ctl = aioredis.Redis.from_url(url)
    try:
        multi_key: dict[str, bool] = {}  # command -> can it take more than one key?
        calls: list[Call] = []
        open_tx: dict[str, tuple[list[str], list[bytes]]] = {}
        for client, argv in commands:
            if client == "lua" or not argv:
                continue
            name = argv[0].decode().upper()
            if name == "MULTI":
                open_tx[client] = ([], [])
                continue
            if name in ("EXEC", "DISCARD"):
                names, keys = open_tx.pop(client, ([], []))
                if name == "EXEC" and keys:
                    calls.append(Call(f"MULTI[{','.join(sorted(set(names)))}]", keys))
                continue
            if name in ("EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO"):
                numkeys = int(argv[2])
                keys = argv[3 : 3 + numkeys]
                script = argv[1].decode() if name.startswith("EVALSHA") else "<eval>"
                call_name = SHA_NAMES.get(script, f"{name} {script}")
            else:
                if name not in multi_key:
                    # COMMAND INFO: arity, flags, first key, last key, step (and more
                    # on Redis 7); a command with movable keys may name several.
                    [info] = await ctl.execute_command("COMMAND INFO", name)
                    _name, _arity, flags, first, last = info[:5]
                    multi_key[name] = last != first or b"movablekeys" in flags
                if not multi_key[name] and client not in open_tx:
                    continue
                keys = await _getkeys(ctl, argv)
                call_name = name
            if client in open_tx:
                open_tx[client][0].append(call_name)
                open_tx[client][1].extend(keys)
            elif len(keys) > 1:
                calls.append(Call(call_name, keys))
        return calls
    finally:
        await ctl.aclose()


async def _getkeys(ctl: aioredis.Redis, argv: list[bytes]) -> list[bytes]:
    try:
        keys = await ctl.execute_command("COMMAND GETKEYS", *argv)
        # redis-py decodes this reply to str
        return [k.encode() if isinstance(k, str) else k for k in keys]
    except ResponseError:  # a command without key arguments
        return []


# -- the happy path ------------------------------------------------------------------

LIVE = Topic("audit.live")
ORDERS = Topic("audit.orders", durable=True, maxlen=1000)
INVOICES = Topic("audit.invoices", durable=True)
TICKS = Topic("audit.ticks", durable=True)
JOBS = Queue("audit.jobs", priorities=2)


async def happy_path(bus: EventBus) -> dict[str, Any]:
    """Touch every feature once; returns what the handlers saw, for the asserts."""
    seen: dict[str, list[Any]] = defaultdict(list)
    poison = {"on": True}

    # Attempt 1 fails into a short retry (XCLAIM), attempt 2 into a long one
    # (RETRY_DEFER, past half of claim idle), attempt 3 into the dead letters.
    retry = RetryPolicy(max_attempts=3, backoff=0.02, multiplier=20.0, jitter=0.0)

    @bus.on(
        ORDERS,
        group="billing",
        retry=retry,
        claim=ClaimPolicy(idle=0.5, interval=0.1),
        dedupe=60,
        publish_to=INVOICES,
    )
    async def bill(order: dict[str, Any], delivery: Delivery) -> dict[str, Any]:
        seen["orders"].append((order["n"], delivery.attempt))
        if order["n"] == 1 and delivery.attempt == 1:
            raise RuntimeError("fails once")
        if order["n"] == 2 and poison["on"]:
            raise RuntimeError("poison")
        return {"invoice": order["n"]}

    @bus.on(INVOICES, group="ledger")
    async def ledger(invoice: dict[str, Any]) -> None:
        seen["invoices"].append(invoice["invoice"])

    @bus.on(ORDERS, INVOICES)  # live subscribers of durable topics: the stream tail
    async def watch(event: dict[str, Any], delivery: Delivery) -> None:
        seen["tail"].append(delivery.topic)

    @bus.on(TICKS, group="clock")
    async def tick(event: dict[str, Any], delivery: Delivery) -> None:
        seen["ticks"].append(delivery.id)

    @bus.worker(JOBS, retry=RetryPolicy(max_attempts=2, backoff=0.05, jitter=0.0))
    async def work(job: dict[str, Any], delivery: Delivery) -> None:
        seen["jobs"].append((job["j"], delivery.attempt))
        if job["j"] == "retry" and delivery.attempt == 1:
            raise RuntimeError("fails once")
        if job["j"] == "dead":
            raise RuntimeError("always fails")

    async with bus, bus.subscribe(LIVE) as sub:
        await bus.publish(LIVE, {"live": 1})
        with anyio.fail_after(5):
            assert (await sub.receive()) == {"live": 1}

        await bus.publish(ORDERS, {"n": 0})
        await bus.publish_many(ORDERS, [{"n": 1}, {"n": 2}, {"n": 3}])
        delayed = await bus.publish(ORDERS, {"n": 4}, delay=0.2)
        cancelled = await bus.publish(ORDERS, {"n": 5}, delay=60)
        assert await bus.cancel(cancelled) is True
        assert await bus.schedule("audit-tick", TICKS, {"t": 1}, every=0.2) is True

        await bus.enqueue(JOBS, {"j": "ok"})
        await bus.enqueue_many(JOBS, [{"j": "retry"}, {"j": "dead"}], job_ids=["r", "d"])
        await bus.enqueue(JOBS, {"j": "urgent"}, priority=1)
        await bus.enqueue(JOBS, {"j": "later"}, delay=0.2)

        await wait_until(lambda: _dead_letters(bus, ORDERS, 1), timeout=10)
        poison["on"] = False
        assert await bus.replay_dead_letters(ORDERS) == 1
        await wait_until(lambda: {0, 1, 2, 3, 4} <= set(seen["invoices"]), timeout=10)
        await wait_until(lambda: {ORDERS.name, INVOICES.name} <= set(seen["tail"]), timeout=10)
        await wait_until(lambda: len(seen["ticks"]) >= 1, timeout=10)
        assert [s.name for s in await bus.schedules()] == ["audit-tick"]
        assert await bus.unschedule("audit-tick") is True
        await wait_until(
            lambda: (
                {("ok", 1), ("retry", 2), ("dead", 2), ("urgent", 1), ("later", 1)}
                <= set(seen["jobs"])
            ),
            timeout=10,
        )
        await wait_until(lambda: _dead_letters(bus, JOBS, 1), timeout=10)
        assert await bus.replay_dead_letters(JOBS) == 1
        await wait_until(lambda: seen["jobs"].count(("dead", 2)) == 2, timeout=10)
        await wait_until(lambda: _dead_letters(bus, JOBS, 1), timeout=10)
        assert await bus.purge_dead_letters(ORDERS) == 0  # replayed: none left
        assert await bus.purge_dead_letters(JOBS) == 1
        assert await bus.trim(ORDERS) >= 0
        stats = await bus.stats()
        assert {t.name for t in stats.topics} >= {ORDERS.name, INVOICES.name}
        assert delayed.due is not None
    return seen


async def _dead_letters(bus: EventBus, where: Topic[Any] | Queue[Any], count: int) -> bool:
    return len(await bus.dead_letters(where)) == count


async def test_f31a_cross_slot_calls_are_the_known_ones(
    redis_server_factory: Callable[..., RedisServer], bus_factory: Callable[..., EventBus]
) -> None:
    server = redis_server_factory()
    monitor = Monitor(server.url)
    async with anyio.create_task_group() as tg:
        await tg.start(monitor.run)
        bus = bus_factory(server.url, scheduler=True, report_every=0.2)
        await happy_path(bus)
        await monitor.finish(server.url)

    ran = {SHA_NAMES[argv[1].decode()] for _, argv in monitor.commands if argv[0] == b"EVALSHA"}
    assert ran >= EXPECTED_SCRIPTS, f"the happy path never ran {sorted(EXPECTED_SCRIPTS - ran)}"

    calls = await key_calls(server.url, monitor.commands)
    crossing: dict[str, list[Call]] = defaultdict(list)
    for call in calls:
        if call.crosses:
            crossing[call.name].append(call)
    prefix = bus.prefix
    print(f"\n{'call':<24} {'seen':>5}  {'slots of its keys (first call)':<40} keys outside")
    for name in sorted(crossing):
        first = crossing[name][0]
        slots = " ".join(str(s) for s in first.slots)
        outside = sorted({k for c in crossing[name] for k in c.outside()})
        shown = ", ".join(k.replace(prefix, "{prefix}", 1) for k in outside)
        print(f"{name:<24} {len(crossing[name]):>5}  {slots:<40} {shown}")
    same = sorted({c.name for c in calls} - set(crossing))
    print(f"multi-key calls within one slot: {', '.join(same)}")
    assert set(crossing) == KNOWN_CROSS_SLOT
