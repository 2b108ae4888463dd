"""A service for tests/test_serve.py, run as ``python -m eventbus run tests.serve_app:bus``.

Configured from the environment: ``SERVE_URL``, ``SERVE_PREFIX``, ``SERVE_ORACLE`` (an
``O_APPEND`` file: one ``start <n> <pid>`` line when a handler begins, one ``done <n>
<pid>`` line when it returns, before the ack), ``SERVE_DELAY`` (seconds each handler
sleeps), ``SERVE_CONCURRENCY``. ``factory`` builds the same bus (a target may name a
function returning one).
"""

from __future__ import annotations

import os

import anyio

from eventbus import ClaimPolicy, Delivery, EventBus, Topic

orders: Topic[dict[str, int]] = Topic("orders", dict[str, int], durable=True)


def _line(text: str) -> None:
    fd = os.open(os.environ["SERVE_ORACLE"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def factory() -> EventBus:
    bus = EventBus(os.environ["SERVE_URL"], prefix=os.environ["SERVE_PREFIX"], shutdown_grace=20.0)
    delay = float(os.environ.get("SERVE_DELAY", "1.0"))

    @bus.on(
        orders,
        group="billing",
        concurrency=int(os.environ.get("SERVE_CONCURRENCY", "2")),
        batch=4,
        block=0.5,
        claim=ClaimPolicy(idle=30.0, interval=0.5),
    )
    async def handle(event: dict[str, int], d: Delivery) -> None:
        _line(f"start {event['n']} {os.getpid()}")
        await anyio.sleep(delay)
        _line(f"done {event['n']} {os.getpid()}")

    return bus


bus = factory() if "SERVE_URL" in os.environ else None
