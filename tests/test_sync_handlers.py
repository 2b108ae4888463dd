"""Sync handlers run in worker threads: a blocking one stalls no other subscriber."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import anyio
import pytest

from eventbus import EventBus, Topic
from eventbus.errors import ConfigurationError

from .helpers import wait_until

BLOCK_S = 2.0
"""How long the blocking handlers block (on the event loop, this whole delay would
reach every other subscriber)."""
BOUND_S = 0.5
"""The most another subscriber may be delayed by it."""


async def _delay_of_fast_subscriber(
    bus: EventBus, topic: Topic[int], blocked: threading.Event
) -> float:
    """Seconds from publishing to the slow handler's topic until a live subscriber of
    another topic has an event published once the slow handler has started."""
    async with bus.subscribe("fast") as fast:
        start = time.monotonic()
        await bus.publish(topic, 0)
        # In a worker thread the handler starts at once; on the event loop it would
        # hold the loop, and this wait would only see it after its whole block.
        await wait_until(blocked.is_set, timeout=10)
        await bus.publish("fast", 1)
        with anyio.fail_after(10):
            assert await fast.receive() == 1
        return time.monotonic() - start


@pytest.mark.parametrize("kind", ["live", "local", "group"])
async def test_a_blocking_sync_handler_does_not_delay_other_subscribers(
    bus_factory: Callable[..., EventBus], kind: str
) -> None:
    topic = {
        "live": Topic("slow"),
        "local": Topic("slow", local=True),
        "group": Topic("slow", durable=True),
    }[kind]
    bus = bus_factory()
    blocked = threading.Event()
    finished = threading.Event()
    loop_thread = threading.get_ident()
    threads: list[int] = []

    def slow(event: int) -> None:
        threads.append(threading.get_ident())
        blocked.set()
        time.sleep(BLOCK_S)  # a sync client, a CPU-bound step: blocking
        finished.set()

    if kind == "group":
        bus.on(topic, group="g")(slow)
    else:
        bus.on(topic)(slow)
    async with bus:
        delay = await _delay_of_fast_subscriber(bus, topic, blocked)
        await wait_until(finished.is_set, timeout=10)
    print(f"{kind}: fast subscriber delayed {delay:.3f}s by a handler blocking {BLOCK_S}s")
    assert delay < BOUND_S
    assert threads
    assert loop_thread not in threads


async def test_in_thread_false_keeps_a_sync_handler_on_the_loop(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory()
    on_loop: list[int] = []
    in_thread: list[int] = []
    topic = Topic("cheap", local=True)
    bus.on(topic, in_thread=False)(lambda event: on_loop.append(threading.get_ident()))
    bus.on(topic)(lambda event: in_thread.append(threading.get_ident()))
    async with bus:
        await bus.publish(topic, 1)
        await wait_until(lambda: len(on_loop) == len(in_thread) == 1)
    assert on_loop == [threading.get_ident()]
    assert in_thread != on_loop


async def test_the_bus_runs_at_most_handler_threads_sync_handlers_at_once(
    bus_factory: Callable[..., EventBus],
) -> None:
    bus = bus_factory(handler_threads=2)
    lock = threading.Lock()
    running = peak = done = 0

    def busy(event: int) -> None:
        nonlocal running, peak, done
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.5)  # long enough for all four to overlap without the limit
        with lock:
            running -= 1
            done += 1

    for _ in range(4):
        bus.on("work")(lambda event, f=busy: f(event))
    async with bus:
        await bus.publish("work", 1)
        await wait_until(lambda: done == 4, timeout=10)
    assert peak == 2


def test_handler_threads_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="handler_threads"):
        EventBus("redis://127.0.0.1:1/0", handler_threads=0)
