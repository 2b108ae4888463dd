"""A scheduler process for the delayed-event fault tests: ``python -m tests.delayed_worker``.

A real subprocess, so SIGKILL is real. It opens an ``EventBus(scheduler=True)`` that
serves nothing else and releases due events until SIGTERM or ``--max-seconds``.
``--clock-skew`` moves this process's wall clock (``time.time`` and
``time.time_ns``) by that many seconds, as a host whose clock is off would
(RELIABILITY.md F18b): due times are the server's, so nothing may change.
``--standby-lag`` overrides ``eventbus._delayed._lease.STANDBY_LAG`` in this
process (a test of the lease alone, not of its safety net).

stdout: ``{"event": "ready"}`` once the bus is open, ``{"event": "leader", "leader":
bool}`` when it takes or loses the schedulers' lease, then ``{"event": "exit",
"released": n}`` after it closed.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import anyio
import orjson

from eventbus import EventBus


def skew_clock(seconds: float) -> None:
    real_time, real_time_ns = time.time, time.time_ns
    time.time = lambda: real_time() + seconds  # type: ignore[assignment]
    time.time_ns = lambda: real_time_ns() + int(seconds * 1e9)  # type: ignore[assignment]


def say(**fields: object) -> None:
    sys.stdout.write(orjson.dumps(fields).decode() + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    bus = EventBus(args.url, prefix=args.prefix, scheduler=True, shutdown_grace=1.0)
    async with bus, anyio.create_task_group() as tg:
        say(event="ready", pid=__import__("os").getpid())
        tg.start_soon(report_leadership, bus)
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            with anyio.move_on_after(args.max_seconds):
                async for _ in signals:
                    break
        tg.cancel_scope.cancel()
        released = bus.delayed_statistics().released
    say(event="exit", released=released)


async def report_leadership(bus: EventBus) -> None:
    """``{"event": "leader", "leader": bool}`` each time this scheduler starts or
    stops holding the schedulers' lease (looked at every 20 ms)."""
    leader = False
    while True:
        now = bus.delayed_statistics().scheduler_leader
        if now != leader:
            leader = now
            say(event="leader", leader=leader, t=time.time())
        await anyio.sleep(0.02)


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m tests.delayed_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--clock-skew", type=float, default=0.0)
    p.add_argument(
        "--standby-lag",
        type=float,
        default=None,
        help="seconds overdue before a standby releases (default: the library's)",
    )
    arguments = p.parse_args()
    if arguments.clock_skew:
        skew_clock(arguments.clock_skew)
    if arguments.standby_lag is not None:
        from eventbus._delayed import _lease

        _lease.STANDBY_LAG = arguments.standby_lag  # type: ignore[misc]
    anyio.run(main, arguments)
