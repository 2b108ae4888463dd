"""Chaining consumers that crash: ``python -m tests.streams._chain_worker ...`` (RELIABILITY F29).

A supervisor process imports everything once, then forks ``--workers`` children
and replaces each child that dies (so a restart costs a fork, not an interpreter
start). Each child is one member of group ``chain`` on durable topic ``orders``,
under a fresh consumer name, with ``publish_to=invoices``: the handler returns
one invoice per order, which the bus publishes atomically with the order's ack.

An order with ``"crash": true`` SIGKILLs the child inside its handler, once per
event: the handler first creates ``<markers>/<event id>`` with ``O_EXCL``, so the
delivery after the crash (claimed by another child after ``claim_idle``) runs to
completion. Crashes therefore happen exactly once per flagged order, whatever
order the children meet them in.

stdout: one JSON object per line from the supervisor: ``spawn`` (pid, consumer),
``exit`` (pid, consumer, signal or code), and ``done`` (spawned, killed) when
SIGTERM (or ``--max-seconds``) stopped it. Children are stopped with SIGTERM and
leave their bus gracefully.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import orjson

from eventbus import ClaimPolicy, Delivery, EventBus, Topic


class _Stop(Exception):
    pass


def _emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.streams._chain_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--markers", required=True, help="directory of per-event crash markers")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--max-seconds", type=int, default=60)
    return p.parse_args(argv)


async def child(args: argparse.Namespace, consumer: str) -> None:
    markers = Path(args.markers)
    bus = EventBus(args.url, prefix=args.prefix, shutdown_grace=2.0)
    orders = Topic("orders", durable=True)
    invoices = Topic("invoices", durable=True)

    @bus.on(
        orders,
        group="chain",
        consumer=consumer,
        publish_to=invoices,
        claim_idle=2.0,
        claim=ClaimPolicy(idle=2.0, interval=0.5),
        batch=10,
        concurrency=4,
        block=1.0,
        # Entries orphaned by one crash may be claimed by a child that crashes in
        # turn; this test is about exactly-once chaining, not the dead-letter limit.
        max_attempts=50,
    )
    async def invoice(order: Any, d: Delivery) -> dict[str, Any]:
        if order.get("crash"):
            try:
                fd = os.open(markers / d.id, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass  # crashed on this event once already: finish it this time
            else:
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return {"order": order["n"], "parent": d.id}

    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with bus:
            async for _ in signals:
                break


def spawn(args: argparse.Namespace, consumer: str) -> int:
    sys.stdout.flush()
    pid = os.fork()
    if pid:
        return pid
    # In the child: no supervisor handlers, no inherited alarm, signals unblocked.
    signal.alarm(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())
    code = 0
    try:
        anyio.run(child, args, consumer, backend="asyncio")
    except BaseException as exc:  # report and exit non-zero: the test sees the code
        sys.stderr.write(f"child {consumer} failed: {exc!r}\n")
        code = 1
    finally:
        sys.stderr.flush()
        os._exit(code)


def main(args: argparse.Namespace) -> int:
    def stop(signum: int, frame: object) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(args.max_seconds)
    children: dict[int, str] = {}
    spawned = killed = 0

    def start() -> None:
        nonlocal spawned
        consumer = f"chain-{spawned}"
        spawned += 1
        # No _Stop between the fork and the bookkeeping: a child is never untracked.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGALRM})
        try:
            pid = spawn(args, consumer)
            children[pid] = consumer
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _emit({"event": "spawn", "pid": pid, "consumer": consumer, "t": time.time()})

    try:
        for _ in range(args.workers):
            start()
        while True:
            pid, status = os.wait()
            consumer = children.pop(pid, "?")
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0
            killed += sig == signal.SIGKILL
            _emit(
                {
                    "event": "exit",
                    "pid": pid,
                    "consumer": consumer,
                    "signal": sig,
                    "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                    "t": time.time(),
                }
            )
            start()
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for pid in children:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while children and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            time.sleep(0.02)
            continue
        consumer = children.pop(pid, "?")
        _emit({"event": "exit", "pid": pid, "consumer": consumer, "stopped": True})
    for pid in children:  # a child that ignored SIGTERM: do not leave it behind
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    _emit({"event": "done", "spawned": spawned, "killed": killed, "stuck": len(children)})
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
