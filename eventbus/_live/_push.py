"""ONE push connection per bus, broadcast to every local subscriber.

The supervisor owns the connection's whole life: connect, (re)subscribe every
route, confirm, read frames, PING on a timer, and on any failure close the
socket, back off, reconnect and resubscribe. redis-py's own retry is switched
off on this connection, because a reconnect it performed silently would hide
lost messages; here every reconnect is counted and reported (R3, R4, R10 in
RELIABILITY.md).

SUBSCRIBE/PSUBSCRIBE are reference counted by the hub: the first local subscriber
of a channel subscribes upstream and waits for the confirmation; later ones send
nothing; the last to leave unsubscribes.

Subscribes and unsubscribes coalesce: each is queued, and the first one queued
schedules a flush (``loop.call_soon``: no timer) that sends everything queued by
then as one SUBSCRIBE / PSUBSCRIBE / UNSUBSCRIBE / PUNSUBSCRIBE per kind. 10,000
subscribers entering at once cost one command and one round trip, while a lone
subscriber pays nothing extra. Each caller still waits for the confirmation of its
own channel. Redis refuses a whole multi-channel SUBSCRIBE when the ACL denies one
of its channels (one NOPERM for the command, naming at most one channel), so a
refused batch is asked again one channel per command: each caller gets its own
answer, and a refused channel does not fail its neighbours.

Replies to our commands (subscribe confirmations, pongs, errors) come back in
the order the commands were sent, interleaved with pushed messages, so a FIFO of
outstanding commands pairs each reply (one per channel of a command, or one error
for the whole command) with its command and channel.

Why one module past 600 lines: it is one connection's supervisor, one concept.
Subscribing, reading, the PING watchdog and reconnecting all share the one
socket and the route table, and each step depends on the state the others
leave (what is confirmed, what is queued, whether the reader is held).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import anyio
import anyio.abc
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection, ConnectionPool, SSLConnection

from .. import signals
from .._codec import Codec
from .._config import LivePolicy
from .._connection import translate
from .._envelope import Envelope
from .._hub import Gap, Hub, Receiver
from .._keys import channel_topic
from ..errors import (
    AuthenticationFailed,
    PayloadError,
    PermissionDenied,
    RedisUnavailable,
)
from ..signals import emit

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["LiveConnection", "pattern_route"]

logger = logging.getLogger("eventbus")

_YIELD_EVERY: Final = 64  # frames handled before letting subscribers run
_MAX_BATCH: Final = 10_000
"""Channels (or patterns) per coalesced SUBSCRIBE/UNSUBSCRIBE command."""
_PATTERN_MARK: Final = b"\x00"
_TICK: Final = 0.5
"""Seconds between the stall watcher's wake-ups."""
_STALL: Final = 1.0
"""Seconds without reading (a stopped process, a blocked event loop, a full
``block`` subscriber) after which a server close is put down to the output buffer."""
_STALL_RECENT: Final = 3.0
"""How long after such a stall a server close is still put down to it (the reader
first reads what the kernel had buffered, then the close)."""


async def _pass_through(frame: Any) -> Any:
    return frame


def pattern_route(pattern: bytes) -> bytes:
    """Hub key of a pattern route (channels are keyed by their own bytes)."""
    return _PATTERN_MARK + pattern


class _Route:
    """Desired upstream subscription and its confirmation state.

    Small on purpose (one per subscribed channel, tens of thousands per process):
    the futures its first subscribers wait on exist only while they wait.
    """

    __slots__ = ("confirmed", "error", "kind", "name", "waiters")

    def __init__(self, kind: bytes, name: bytes) -> None:
        self.kind = kind  # b"SUBSCRIBE" or b"PSUBSCRIBE"
        self.name = name
        self.confirmed = False
        self.error: BaseException | None = None
        self.waiters: list[asyncio.Future[None]] | None = None

    @property
    def route(self) -> bytes:
        """The hub's key: the channel, or the pattern behind a mark (see
        :func:`pattern_route`). Computed, not stored: one slot less per route."""
        return self.name if self.kind == b"SUBSCRIBE" else _PATTERN_MARK + self.name

    def waiter(self) -> asyncio.Future[None]:
        """A future settled once the server confirms (or refuses) the subscription;
        :meth:`forget` it when done waiting."""
        fut = asyncio.get_running_loop().create_future()
        waiters = self.waiters
        if waiters is None:
            waiters = self.waiters = []
        waiters.append(fut)
        if self.confirmed:
            fut.set_result(None)
        return fut

    def forget(self, fut: asyncio.Future[None]) -> None:
        if self.waiters is not None:
            self.waiters.remove(fut)
            if not self.waiters:
                self.waiters = None

    async def wait(self) -> None:
        """Until the server confirmed (or refused: see ``error``) the subscription."""
        if not self.confirmed:
            fut = self.waiter()
            try:
                await fut
            finally:
                self.forget(fut)

    def settle(self, error: BaseException | None = None) -> None:
        """Confirmed (``error`` None) or refused: wake whoever waits."""
        if error is not None:
            self.error = error
        self.confirmed = True
        waiters = self.waiters
        if waiters is not None:
            self.waiters = None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)


class _Expiries:
    """Deadlines of waiting subscribers, one loop timer for all of them.

    Every waiter gets the same timeout, so deadlines come in the order waiters
    arrive: a FIFO, whose head alone needs a timer. 10,000 subscribers entering
    at once cost 10,000 appends, not 10,000 timers in the loop's heap.
    """

    __slots__ = ("_queue", "_timeout", "_timer")

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._queue: deque[tuple[float, asyncio.Future[None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __call__(self, fut: asyncio.Future[None]) -> None:
        """Settle ``fut`` (with None) ``timeout`` seconds from now, unless done by then."""
        if self._timeout == math.inf:
            return
        self.prune()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        self._queue.append((deadline, fut))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._fire)

    def prune(self) -> None:
        """Let go of the waiters at the head that were settled meanwhile."""
        queue = self._queue
        while queue and queue[0][1].done():
            queue.popleft()

    def _fire(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while queue and queue[0][0] <= now:
            fut = queue.popleft()[1]
            if not fut.done():
                fut.set_result(None)
        self._timer = loop.call_at(queue[0][0], self._fire) if queue else None


class _Sent:
    """A command written to the push connection, waiting for its replies: one per
    item (a channel of a (P)(UN)SUBSCRIBE, or the PING), or one error for all."""

    __slots__ = ("command", "index", "items")

    def __init__(self, command: bytes, items: list[Any]) -> None:
        self.command = command
        # A (P)(UN)SUBSCRIBE's _Route per channel (an unsubscribe's is no longer
        # in the route table), or the PING's Event.
        self.items = items
        self.index = 0  # replies received so far


class LiveConnection:
    """The supervisor of the bus's single pub/sub connection."""

    def __init__(
        self,
        *,
        pool: ConnectionPool,
        hub: Hub,
        codec: Codec,
        prefix: str,
        policy: LivePolicy,
        sender: object,
        address: str = "?",
    ) -> None:
        self._pool = pool
        self._address = address
        self._tls = issubclass(pool.connection_class, SSLConnection)
        self._hub = hub
        self._codec = codec
        self._prefix = prefix
        self._policy = policy
        self._sender = sender
        self._routes: dict[bytes, _Route] = {}
        self._expiries = _Expiries(policy.connect_timeout)
        self._conn: AbstractConnection | None = None
        self._outstanding: deque[_Sent] = deque()
        self._pending: list[tuple[bytes, _Route]] = []
        """(Un)subscribes queued for the next flush: (command, route state)."""
        self._flush_scheduled = False
        self._topics: dict[bytes, str] = {}
        self._last_frame: tuple[bytes, bytes, Envelope, set[bytes]] | None = None
        self._fatal: BaseException | None = None
        self._lost: BaseException | None = None
        self._frames = 0
        self._step = ""
        self._reader_blocked = False
        self._last_tick = time.monotonic()
        self._stall_end = -math.inf
        self.reconnects = 0
        self.disconnects: dict[str, int] = {}
        """Established connections lost, by reason: see :meth:`_loss_reason`."""
        self.decode_errors = 0
        self.client_id: int | None = None

    # -- subscription management ----------------------------------------------

    async def attach(self, route: bytes, kind: bytes, name: bytes, receiver: Receiver) -> None:
        """Attach ``receiver`` to ``route``; subscribe upstream if it is the first.

        Returns once the server confirmed the subscription. Concurrent attaches
        share one SUBSCRIBE (see the module doc); each returns once its own channel
        is confirmed. Cancellation: the receiver is detached (unsubscribed upstream
        if it was the route's last).

        :raises eventbus.errors.PermissionDenied: the ACL refuses the channel.
        :raises eventbus.errors.RedisUnavailable: no confirmation within ``connect_timeout``.
        """
        if self._fatal is not None:
            raise self._fatal
        first = self._hub.add(route, receiver)
        state = self._routes.get(route)
        if first or state is None:
            state = self._routes[route] = _Route(kind, name)
            self._queue(kind, state)
        if not state.confirmed:
            # Waited for here, not in a method of _Route: one frame fewer per
            # subscriber while 10,000 wait at once.
            fut = state.waiter()
            self._expiries(fut)
            try:
                await fut
            except BaseException:
                state.forget(fut)
                self._detach_sync(route, receiver)
                raise
            state.forget(fut)
            if not state.confirmed:
                self._detach_sync(route, receiver)
                raise RedisUnavailable(
                    f"Redis at {self._address} did not confirm {kind.decode()} "
                    f"{name.decode(errors='replace')!r} within "
                    f"{self._policy.connect_timeout:g}s (connect_timeout)"
                )
        if state.error is not None:
            self._detach_sync(route, receiver)
            raise state.error

    def detach(self, route: bytes, receiver: Receiver) -> None:
        """Detach ``receiver``; unsubscribe upstream when it was the last one.

        The UNSUBSCRIBE is queued (coalesced with its neighbours'), not awaited:
        messages still arriving for the route meanwhile find no receiver.
        """
        self._detach_sync(route, receiver)

    def _detach_sync(self, route: bytes, receiver: Receiver) -> None:
        if not self._hub.remove(route, receiver):
            return
        state = self._routes.pop(route, None)
        if not self._routes:
            self._topics.clear()
        else:
            self._topics.pop(route, None)
        if state is None or state.error is not None:
            return
        unsub = b"UNSUBSCRIBE" if state.kind == b"SUBSCRIBE" else b"PUNSUBSCRIBE"
        self._queue(unsub, state)

    def _queue(self, command: bytes, state: _Route) -> None:
        """Queue a (un)subscribe for the next flush, scheduling it if none is."""
        pending = self._pending
        pending.append((command, state))
        if len(pending) >= _MAX_BATCH:
            self.flush()  # a full batch goes now: the first callers need not wait for the rest
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send every queued (un)subscribe, one command per kind (and per
        ``_MAX_BATCH``). Without a connection, drop them: the supervisor subscribes
        every route in ``_routes`` when it connects."""
        self._flush_scheduled = False
        pending = self._pending
        if not pending:
            return
        self._pending = []
        conn = self._conn
        if conn is None or not conn.is_connected:
            return
        # A channel appears at most once per round, so the commands of one channel
        # (a SUBSCRIBE, its UNSUBSCRIBE, a SUBSCRIBE again) go out in queue order.
        batches: dict[bytes, list[_Route]] = {}
        seen: set[bytes] = set()
        for command, state in pending:
            name = state.name
            if name in seen:
                self._write_batches(batches)
                batches = {}
                seen = set()
            seen.add(name)
            batches.setdefault(command, []).append(state)
        self._write_batches(batches)

    def _write_batches(self, batches: dict[bytes, list[_Route]]) -> None:
        for command, items in batches.items():
            for start in range(0, len(items), _MAX_BATCH):
                self._write(command, items[start : start + _MAX_BATCH])

    def _send_ping(self, pong: anyio.Event) -> bool:
        conn = self._conn
        if conn is None or not conn.is_connected:
            return False
        self._write(b"PING", [pong])
        return True

    def _write(self, command: bytes, items: list[Any]) -> None:
        conn = self._conn
        assert conn is not None
        args = [command] if command == b"PING" else [command, *(s.name for s in items)]
        # Append before writing: the write happens synchronously (no await), so
        # FIFO order = wire order.
        self._outstanding.append(_Sent(command, items))
        conn._writer.writelines(conn.pack_command(*args))  # type: ignore[union-attr]

    async def aclose(self) -> None:
        """Close every connection of the pool (the supervisor closes its own on exit)."""
        await self._pool.disconnect()

    # -- the supervisor ---------------------------------------------------------

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect and serve until cancelled. ``started()`` once every route is confirmed.

        Before the first successful start, errors propagate (the bus fails to
        open); afterwards they are retried with capped, jittered backoff, except
        authentication and ACL errors, which close every live subscription.
        """
        started = False
        failures = 0
        down_since: float | None = None
        while True:
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            error: BaseException | None = None
            established = False
            self._lost = None
            try:
                await self._open(conn)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._guard, tg, self._read_loop, conn)
                    try:
                        await self._resubscribe_all()
                    except TimeoutError as exc:
                        self._lost = exc
                        tg.cancel_scope.cancel()
                    else:
                        established = True
                        tg.start_soon(self._guard, tg, self._ping_loop, conn)
                        tg.start_soon(self._guard, tg, self._watch_stalls, conn)
                        if started:
                            self._on_reconnected(down_since)
                        else:
                            started = True
                            task_status.started()
                        failures = 0
                        down_since = None
                error = self._lost
            except (rex.RedisError, OSError, TimeoutError) as exc:
                error = exc
            finally:
                self._conn = None
                self._last_frame = None
                with anyio.CancelScope(shield=True):
                    await conn.disconnect()
            if error is None:  # pragma: no cover - the loops only end by raising
                continue
            if type(error) is TimeoutError and not str(error):  # one of our fail_after
                error = TimeoutError(
                    f"Redis at {self._address} did not answer within "
                    f"{self._policy.connect_timeout:g}s (connect_timeout)"
                )
            # The "use rediss://" hint is for a first connection that fails; once one
            # worked, a reset is a kill, a restart or the network, not the scheme.
            mapped = translate(
                error, tls="established" if started else self._tls, command=self._step
            )
            self._step = ""
            if not started:
                raise mapped from error
            if isinstance(mapped, AuthenticationFailed | PermissionDenied):
                self._fail_all(mapped)
                logger.error("live push connection failed for good: %s", mapped)
                return
            failures += 1
            reason = "connect"
            if established:
                reason = self._loss_reason(error)
                self.disconnects[reason] = self.disconnects.get(reason, 0) + 1
                if reason == "output_buffer":
                    logger.warning(
                        "Redis closed the push connection after this process had not read"
                        " it for %.0fs or more: most likely its client-output-buffer-limit"
                        " pubsub; the messages it held are lost",
                        _STALL,
                    )
            if down_since is None:
                down_since = time.monotonic()
                if signals.disconnected.receivers:
                    emit(signals.disconnected, self._sender, error=mapped, reason=reason)
            delay = min(
                self._policy.reconnect_backoff_max,
                self._policy.reconnect_backoff * 2 ** (failures - 1),
            )
            delay *= 0.5 + random.random() / 2
            logger.warning(
                "live push connection lost (%s); reconnecting in %.2fs (attempt %d)",
                mapped,
                delay,
                failures,
            )
            await anyio.sleep(delay)

    def _loss_reason(self, error: BaseException) -> str:
        """Why an established connection was lost, as far as this side can tell.

        ``ping_timeout``: no PONG in time (a half-open connection, a hung server).
        ``output_buffer``: the server closed it after this process had not read it
        for ``_STALL`` seconds (stopped, its event loop blocked, or a full ``block``
        subscriber holding the reader). Redis does that to a slow pub/sub reader
        past its ``client-output-buffer-limit pubsub``, and says nothing to the
        client, so this is an inference: a ``CLIENT KILL`` or a restart landing in
        such a stall counts here too. ``closed``: the server closed or reset it
        otherwise (``CLIENT KILL``, a restart, the network). ``error``: anything
        else (a reply that could not be parsed).
        """
        if isinstance(error, rex.TimeoutError | TimeoutError):
            return "ping_timeout"
        if isinstance(error, rex.ConnectionError | OSError):
            now = time.monotonic()
            if now - self._last_tick >= _TICK + _STALL or now - self._stall_end <= _STALL_RECENT:
                return "output_buffer"
            return "closed"
        return "error"

    async def _watch_stalls(self, conn: AbstractConnection) -> None:
        """Note when this process stopped running for ``_STALL`` seconds (see
        :meth:`_loss_reason`): a wake-up that comes that late means the event loop
        did not run (SIGSTOP, a paused VM, a blocking call)."""
        self._last_tick = time.monotonic()
        while True:
            await anyio.sleep(_TICK)
            now = time.monotonic()
            if now - self._last_tick >= _TICK + _STALL:
                self._stall_end = now
            self._last_tick = now

    async def _open(self, conn: AbstractConnection) -> None:
        with anyio.fail_after(self._policy.connect_timeout):
            await conn.connect()  # type: ignore[no-untyped-call]
            # redis-py's default RESP3 push handler formats every message for a
            # debug log (str(frame), even with debug off): pass frames through.
            conn._parser.set_pubsub_push_handler(_pass_through)  # type: ignore[attr-defined]
            # CLIENT ID before subscribing: the connection answers normally only now.
            self._step = "CLIENT|ID"  # names the refused rule if the ACL says no
            await conn.send_command("CLIENT", "ID")
            self.client_id = int(await conn.read_response())
            self._step = ""
        self._outstanding.clear()
        self._pending.clear()  # the routes they subscribe are resubscribed
        self._conn = conn

    async def _guard(self, tg: anyio.abc.TaskGroup, loop: Callable[..., Any], conn: Any) -> None:
        try:
            await loop(conn)
        except (rex.RedisError, OSError, TimeoutError) as exc:
            # Any read or parse failure is fatal for this socket (R10): record it
            # and end this connection's task group; the supervisor starts afresh.
            if self._lost is None:
                self._lost = exc
            tg.cancel_scope.cancel()

    async def _resubscribe_all(self) -> None:
        pending = list(self._routes.values())
        for state in pending:
            # A new connection: confirmed again only once Redis says so, so this
            # waits for it (and a subscribe meanwhile returns only then too).
            state.confirmed = False
            self._queue(state.kind, state)
        self.flush()  # batched, as any other subscribes: _MAX_BATCH channels a command
        with anyio.fail_after(self._policy.connect_timeout):
            for state in pending:
                await state.wait()

    def _on_reconnected(self, down_since: float | None) -> None:
        self.reconnects += 1
        downtime = 0.0 if down_since is None else time.monotonic() - down_since
        for route in self._routes:
            for receiver in self._hub.routes.get(route, ()):
                receiver.reconnects += 1
        logger.warning(
            "live push connection re-established after %.2fs; messages published "
            "meanwhile are lost (gaps are reported per publisher)",
            downtime,
        )
        if signals.reconnected.receivers:
            emit(signals.reconnected, self._sender, reconnects=self.reconnects, downtime=downtime)

    def _fail_all(self, error: BaseException) -> None:
        self._fatal = error
        for route in list(self._routes):
            for receiver in self._hub.routes.get(route, ()):
                receiver.close(error)

    async def _ping_loop(self, conn: AbstractConnection) -> None:
        interval = self._policy.ping_interval
        timeout = self._policy.ping_timeout
        while True:
            await anyio.sleep(interval)
            pong = anyio.Event()
            if not self._send_ping(pong):
                raise rex.ConnectionError("push connection closed")
            # The PONG queues behind the frames sent before it. A reader that is
            # making progress (or waiting on a full "block" subscriber) is alive;
            # only silence with an idle reader means a dead peer.
            while not pong.is_set():
                progress = self._frames
                with anyio.move_on_after(timeout):
                    await pong.wait()
                if not pong.is_set() and self._frames == progress and not self._reader_blocked:
                    raise rex.TimeoutError(f"no PONG on the push connection within {timeout}s")

    async def _read_loop(self, conn: AbstractConnection) -> None:
        read = conn.read_response
        handle = self._handle_frame
        count = 0
        while True:
            try:
                frame = await read(timeout=math.inf, disconnect_on_error=False, push_request=True)
            except (rex.ResponseError, rex.BusyLoadingError) as exc:
                # An error reply (redis-py raises LOADING as a connection error): the
                # connection is fine, the command was refused.
                self._on_error_reply(exc)
                continue
            self._frames += 1
            blocked = handle(frame)
            if blocked is not None:
                self._reader_blocked = True
                since = time.monotonic()
                try:
                    await blocked
                finally:
                    self._reader_blocked = False
                    if time.monotonic() - since >= _STALL:
                        self._stall_end = time.monotonic()  # not read meanwhile: a stall
            count += 1
            if count >= _YIELD_EVERY:
                count = 0
                await anyio.lowlevel.checkpoint()

    # -- frames -------------------------------------------------------------------

    def _handle_frame(self, frame: Any) -> Any:
        """Handle one frame; return an awaitable only if a ``block`` subscriber is full."""
        if isinstance(frame, list):
            kind = frame[0]
            if kind == b"message":
                return self._dispatch(frame[1], frame[1], frame[2])
            if kind == b"pmessage":
                return self._dispatch(_PATTERN_MARK + frame[1], frame[2], frame[3])
            if kind == b"pong":
                self._on_reply(b"PING", b"")
                return None
            if kind in (b"subscribe", b"psubscribe", b"unsubscribe", b"punsubscribe"):
                self._on_reply(kind.upper(), frame[1])
                return None
            return None
        if frame == b"PONG" or frame == "PONG":
            self._on_reply(b"PING", b"")
        return None

    def _on_reply(self, command: bytes, name: bytes) -> None:
        if not self._outstanding:
            return
        sent = self._outstanding[0]
        token: Any = sent.items[sent.index]  # the PING's Event, or a _Route
        sent.index += 1
        if sent.index >= len(sent.items):
            self._outstanding.popleft()
            self._expiries.prune()
        if sent.command == b"PING":
            token.set()
            return
        state: _Route = token
        if self._routes.get(state.route) is state:  # not left (nor unsubscribed) meanwhile
            state.settle()

    def _on_error_reply(self, exc: rex.ResponseError | rex.BusyLoadingError) -> None:
        if not self._outstanding:
            logger.error("unexpected error on the push connection: %s", exc)
            return
        sent = self._outstanding.popleft()  # one error answers the whole command
        if sent.command == b"PING":
            # The server answered, so it is alive: a refused PING is no dead peer.
            # Redis refuses PING while it loads its dataset (LOADING), and
            # meanwhile delivers what is published, as SUBSCRIBE works then.
            sent.items[0].set()
            logger.debug("PING on the push connection refused: %s", exc)
            return
        if isinstance(exc, rex.BusyLoadingError):
            raise exc  # a (P)SUBSCRIBE refused while loading: reconnect and try again
        items: list[_Route] = sent.items[sent.index :]
        command = sent.command.decode()
        subscribe = sent.command in (b"SUBSCRIBE", b"PSUBSCRIBE")
        if len(items) > 1:
            # Redis refused the whole command for one of its channels (and names at
            # most that one): ask again, one channel per command, for each caller's
            # own answer. Unsubscribes are not retried (nobody waits for them).
            live = [s for s in items if subscribe and self._routes.get(s.route) is s]
            for state in live:
                self._write(sent.command, [state])
            if len(live) < len(items):
                logger.error(
                    "%s of %d channels on the push connection failed: %s",
                    command,
                    len(items) - len(live),
                    translate(exc, command=command),
                )
            return
        route_state = items[0]
        route = route_state.route
        channel = route_state.name.decode(errors="replace") or None
        mapped = translate(exc, command=command, channel=channel)
        if not subscribe:
            logger.error("%s on the push connection failed: %s", command, mapped)
            return
        route_state.settle(mapped)
        if self._routes.get(route) is route_state:
            # Refused for good: wake and close every receiver waiting on it.
            del self._routes[route]
            for receiver in self._hub.routes.pop(route, ()):
                receiver.close(mapped)

    def _topic_of(self, channel: bytes) -> str:
        topic = self._topics.get(channel)
        if topic is None:
            text = channel.decode("utf-8", errors="replace")
            topic = channel_topic(self._prefix, text) or text
            if len(self._topics) < 100_000:
                self._topics[channel] = topic
        return topic

    def _dispatch(self, route: bytes, channel: bytes, raw: bytes) -> Any:
        receivers = self._hub.routes.get(route)
        if not receivers:
            return None
        # One publish reaches us once per matching subscription (channel, then each
        # pattern), consecutively. Reuse the decoded envelope for those copies: the
        # payload is decoded once, and a subscriber on several routes sees the same
        # object and skips the repeat.
        last = self._last_frame
        if last is not None and last[0] == channel and last[1] == raw and route not in last[3]:
            env = last[2]
            last[3].add(route)
        else:
            topic = self._topic_of(channel)
            try:
                env = self._codec.decode(topic, raw)
            except PayloadError as exc:
                self.decode_errors += 1
                for receiver in receivers:
                    receiver.errors += 1
                logger.warning("dropped an undecodable live message: %s", exc)
                if signals.failed.receivers:
                    emit(
                        signals.failed,
                        self._sender,
                        topic=topic,
                        event_id=exc.event_id,
                        subscription=None,
                        error=exc,
                    )
                return None
            self._last_frame = (channel, raw, env, {route})
        if env.seq:
            verdict = self._hub.track(route, env)
            if verdict is False:
                return None  # a repeat of an event already delivered (a retried PUBLISH)
            if verdict is not None:
                self._report_gap(receivers, verdict)  # type: ignore[arg-type]
        blocked = self._hub.deliver(receivers, env)
        if blocked is None:
            return None
        return self._hub.redeliver(blocked, env)

    def _report_gap(self, receivers: tuple[Receiver, ...], gap: Gap) -> None:
        for receiver in receivers:
            receiver.gaps += 1
            receiver.missed += gap.size
        if signals.gap.receivers:
            for receiver in receivers:
                emit(
                    signals.gap, self._sender, topic=gap.topic, subscription=receiver.owner, gap=gap
                )
