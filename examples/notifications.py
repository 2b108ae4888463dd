"""Notification fan-out across processes: decorated handlers in two processes.

Run it with nothing but the package installed::

    python examples/notifications.py                                        # private redis-server
    EVENTBUS_URL=redis://127.0.0.1:6379/0 python examples/notifications.py  # your Redis

The script is both sides:

* the **main** process opens a bus (``EventBus.embedded()`` starts a private
  redis-server when ``EVENTBUS_URL`` is unset), then starts a second copy of
  this script in ``listener`` mode on the same Redis URL;
* the **listener** opens its own bus with its own ``@bus.on(notifications)``
  handler and prints ``ready`` once Redis confirmed its subscription;
* main waits for ``ready``, publishes ``COUNT`` notifications, and both
  processes' handlers print every one: each process holds one push connection,
  and every live subscriber in every process gets every event.

The listener exits after ``COUNT`` notifications, main after its own handler saw
them all and the listener is gone. Everything is bounded by ``DEADLINE`` seconds.
"""

from __future__ import annotations

import os
import sys

import anyio
import anyio.abc
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from eventbus import Delivery, EventBus, Topic

SCRIPT = os.path.abspath(__file__)
COUNT = 5
DEADLINE = 20.0  # seconds; the whole run takes about one


@attrs.frozen
class Notification:
    user: str
    text: str


notifications = Topic("notifications", Notification)


async def listener(url: str, count: int) -> None:
    """The second process: its own bus, its own handler; exits after ``count`` events."""
    bus = EventBus(url)
    seen = 0
    all_seen = anyio.Event()

    @bus.on(notifications)
    async def show(note: Notification, delivery: Delivery) -> None:
        nonlocal seen
        seen += 1
        print(f"got #{delivery.seq} for {note.user}: {note.text}", flush=True)
        if seen == count:
            all_seen.set()

    with anyio.fail_after(DEADLINE):
        async with bus:  # returns once Redis confirmed the handler's subscription
            print("ready", flush=True)
            await all_seen.wait()
    print(f"received {seen} notifications, exiting", flush=True)


async def relay(stdout: anyio.abc.ByteReceiveStream, ready: anyio.Event) -> None:
    """Print the listener's lines as they come; set ``ready`` when it says so."""
    lines = BufferedByteReceiveStream(stdout)
    while True:
        try:
            line = (await lines.receive_until(b"\n", 65536)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead):
            if not ready.is_set():
                raise RuntimeError("the listener exited before it was ready") from None
            return
        print(f"  [listener] {line}", flush=True)
        if line == "ready":
            ready.set()


async def main() -> None:
    external = os.environ.get("EVENTBUS_URL")
    bus = EventBus(external) if external else EventBus.embedded()
    seen = 0
    all_seen = anyio.Event()
    status: int | None = None

    @bus.on(notifications)
    def show(note: Notification) -> None:  # a plain function works as well
        nonlocal seen
        seen += 1
        print(f"  [main]     got {note.user}: {note.text}", flush=True)
        if seen == COUNT:
            all_seen.set()

    with anyio.fail_after(DEADLINE):
        async with bus:
            # The embedded server's URL exists only now. `bus.url` masks a password,
            # so hand the child the URL we were given when there is one.
            url = external or bus.url
            print(f"main: bus on {bus.url}; starting the listener", flush=True)
            process = await anyio.open_process(
                [sys.executable, SCRIPT, "listener", url, str(COUNT)],
                stdin=None,
                stderr=None,  # the listener's errors go straight to our stderr
            )
            try:
                assert process.stdout is not None
                ready = anyio.Event()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(relay, process.stdout, ready)
                    await ready.wait()
                    for n in range(1, COUNT + 1):
                        note = Notification(user=f"user{n}", text=f"your order #{100 + n} shipped")
                        receipt = await bus.publish(notifications, note)
                        print(
                            f"main: published {receipt.id[:8]} "
                            f"to {receipt.receivers} push connections",
                            flush=True,
                        )
                    await all_seen.wait()
                    status = await process.wait()  # the relay ends with its output
            finally:
                if process.returncode is None:
                    process.kill()
                    with anyio.CancelScope(shield=True):
                        await process.wait()
    print(f"main: handled {seen} notifications; listener exited with status {status}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["listener"]:
        anyio.run(listener, sys.argv[2], int(sys.argv[3]))
    else:
        anyio.run(main)
