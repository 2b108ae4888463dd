"""A notification server: every connected client gets its own channel.

Run it with nothing but the package installed::

    python examples/notifications_server.py --demo        # self-check, exits by itself
    python examples/notifications_server.py --port 8765   # serve until Ctrl-C

``EVENTBUS_URL`` unset: a private redis-server (``EventBus.embedded()``); set it to
use your Redis (``EVENTBUS_URL=redis://127.0.0.1:6379/0``).

The protocol is plain text lines over TCP (no web framework needed; the same
shape fits a websocket or server-sent-events endpoint: one ``bus.subscribe`` per
connection, forward what it yields)::

    HELLO <user>         ->  OK <user>     once Redis confirmed the user's channel,
                             then one JSON line per notification for <user>
    SEND <user> <text>   ->  SENT <n>      publishes a notification for <user>
                                           (n: push connections that got it)

Each connection subscribes to the live topic ``notify.<user>`` of the one bus
of the process: all the connections share ONE push connection to Redis, and a
notification for a user published by any process on the same Redis reaches that
user's connections only. When the client goes, its subscription goes with it.
Try it with two terminals: ``nc 127.0.0.1 8765`` then ``HELLO alice`` in one,
``SEND alice hello`` in the other.

``--demo`` starts the server on a free port, connects ``--clients`` clients, each
as its own user, publishes one notification to each (and then a closing one), checks
that every client got its own notification and nothing addressed to anyone
else, prints a summary and exits 0 (1 if a check failed). It is bounded by
``DEADLINE`` seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys

import anyio
import anyio.abc
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from eventbus import EventBus, Topic

DEADLINE = 30.0  # seconds, the whole demo; it takes about one
USER_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_LINE = 4096


@attrs.frozen
class Notification:
    user: str
    text: str


def topic_of(user: str) -> Topic[Notification]:
    """The user's own live topic (channel ``<prefix>:{notify.<user>}``)."""
    return Topic(f"notify.{user}", Notification)


async def send_line(stream: anyio.abc.ByteStream, line: str) -> None:
    await stream.send(line.encode() + b"\n")


async def serve_client(bus: EventBus, stream: anyio.abc.ByteStream) -> None:
    """One connection: ``HELLO <user>`` subscribes it; ``SEND`` publishes."""
    lines = BufferedByteReceiveStream(stream)
    async with stream, anyio.create_task_group() as tg:
        while True:
            try:
                raw = await lines.receive_until(b"\n", MAX_LINE)
            except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
                break  # the client went: its subscription (below) goes with it
            except anyio.DelimiterNotFound:
                await send_line(stream, "ERR line too long")
                break
            command, _, rest = raw.decode(errors="replace").strip().partition(" ")
            if command == "HELLO" and USER_RE.fullmatch(rest):
                ready = anyio.Event()
                tg.start_soon(forward, bus, rest, stream, ready)
                await ready.wait()  # Redis confirmed the channel: say OK
                await send_line(stream, f"OK {rest}")
            elif command == "SEND" and USER_RE.fullmatch(rest.partition(" ")[0]):
                user, _, text = rest.partition(" ")
                receipt = await bus.publish(topic_of(user), Notification(user, text))
                await send_line(stream, f"SENT {receipt.receivers}")
            else:
                await send_line(stream, "ERR expected: HELLO <user> | SEND <user> <text>")
        tg.cancel_scope.cancel()


async def forward(
    bus: EventBus, user: str, stream: anyio.abc.ByteStream, ready: anyio.Event
) -> None:
    """Relay the user's notifications to the connection until either side ends."""
    async with bus.subscribe(topic_of(user)) as notes:  # returns once Redis confirmed it
        ready.set()
        async for note in notes:
            line = json.dumps({"user": note.user, "text": note.text})
            try:
                await send_line(stream, line)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return


async def serve(bus: EventBus, listener: anyio.abc.Listener[anyio.abc.SocketStream]) -> None:
    async def handle(stream: anyio.abc.SocketStream) -> None:
        await serve_client(bus, stream)

    await listener.serve(handle)


def open_bus() -> EventBus:
    url = os.environ.get("EVENTBUS_URL")
    return EventBus(url) if url else EventBus.embedded()


async def demo_client(
    port: int, user: str, subscribed: anyio.Event, results: dict[str, list[str]]
) -> None:
    """Say HELLO, then read notifications until the closing one for this user."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        lines = BufferedByteReceiveStream(stream)
        await send_line(stream, f"HELLO {user}")
        reply = (await lines.receive_until(b"\n", MAX_LINE)).decode()
        if reply != f"OK {user}":
            raise RuntimeError(f"{user}: expected OK, got {reply!r}")
        subscribed.set()
        got = results[user]
        while True:
            note = json.loads(await lines.receive_until(b"\n", MAX_LINE))
            if note["text"] == "bye" and note["user"] == user:
                return
            got.append(f"{note['user']}:{note['text']}")


async def demo(clients: int) -> int:
    bus = open_bus()
    users = [f"user{i}" for i in range(clients)]
    results: dict[str, list[str]] = {u: [] for u in users}
    with anyio.fail_after(DEADLINE):
        async with bus, anyio.create_task_group() as tg:
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            port = listener.extra(anyio.abc.SocketAttribute.local_port)
            print(f"server on 127.0.0.1:{port}, bus on {bus.url}", flush=True)
            tg.start_soon(serve, bus, listener)
            async with anyio.create_task_group() as clients_tg:
                for user in users:
                    subscribed = anyio.Event()
                    clients_tg.start_soon(demo_client, port, user, subscribed, results)
                    await subscribed.wait()
                print(f"{clients} clients connected, each subscribed to its own channel")
                for user in users:
                    receipt = await bus.publish(topic_of(user), Notification(user, f"hello {user}"))
                    assert receipt.receivers == 1, receipt  # one push connection: ours
                for user in users:
                    await bus.publish(topic_of(user), Notification(user, "bye"))
            tg.cancel_scope.cancel()  # stop serving
    own = sum(1 for u in users if results[u] == [f"{u}:hello {u}"])
    wrong = {u: got for u, got in results.items() if got != [f"{u}:hello {u}"]}
    print(
        f"demo: {clients} clients, {own} got exactly their own notification, "
        f"{len(wrong)} got something else"
    )
    for user, got in wrong.items():
        print(f"  {user}: {got}")
    return 0 if own == clients else 1


async def main_serve(port: int) -> None:
    bus = open_bus()
    async with bus:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port)
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"serving on 127.0.0.1:{port} (bus on {bus.url}); Ctrl-C to stop", flush=True)
        await serve(bus, listener)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="self-check and exit")
    parser.add_argument("--clients", type=int, default=20, help="demo clients")
    parser.add_argument("--port", type=int, default=8765, help="port to serve on (not --demo)")
    args = parser.parse_args()
    if args.demo:
        sys.exit(anyio.run(demo, args.clients))
    with contextlib.suppress(KeyboardInterrupt):
        anyio.run(main_serve, args.port)


if __name__ == "__main__":
    main()
