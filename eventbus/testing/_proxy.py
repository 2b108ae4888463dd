"""FaultProxy: a loopback TCP relay between a client and redis-server, for fault tests."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections import deque
from types import TracebackType
from typing import Final

import anyio
import anyio.abc
import attrs
from anyio.abc import SocketAttribute

__all__ = ["DroppedReply", "FaultProxy"]

_PUSH: Final = ord(">")
_LINE: Final = frozenset(b"+-:_,#(")  # simple types: one line
_BULK: Final = frozenset(b"$!=")  # length-prefixed strings
_ARRAY: Final = frozenset(b"*~>")  # n elements
_UNTRACKED: Final = frozenset(
    # Replies no longer pair one-to-one with commands on such a connection
    # (RESP2 pub/sub confirmations, MONITOR's stream, CLIENT REPLY OFF/SKIP).
    {b"SUBSCRIBE", b"PSUBSCRIBE", b"SSUBSCRIBE", b"MONITOR", b"CLIENT REPLY"}
)


@attrs.frozen
class DroppedReply:
    """A reply :meth:`FaultProxy.drop_next_reply` swallowed (Redis executed the command)."""

    command: tuple[bytes, ...]
    """The command and its arguments, as the client sent them."""
    reply: bytes
    """The whole reply frame the server sent and the client never got."""
    forwarded: int
    """Bytes of ``reply`` the client did get before the reset (``keep``)."""
    at: float
    """``anyio.current_time()`` of the reset."""


@attrs.define(eq=False)
class _DropRule:
    prefix: bytes
    remaining: int
    keep: int
    cancelled: bool = False


def _frame_end(buf: bytearray, pos: int) -> int | None:
    """End offset of the RESP2/RESP3 frame at ``pos``, ``None`` if not complete yet.

    Aggregates have known lengths, so a count of frames still to read replaces
    recursion. An attribute (``|``) belongs to the value after it. Streamed
    (``?``) lengths and unknown type bytes raise ``ValueError``.
    """
    todo = 1
    size = len(buf)
    while todo:
        if pos >= size:
            return None
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None
        kind = buf[pos]
        todo -= 1
        if kind in _LINE:
            pos = eol + 2
        elif kind in _BULK:
            length = int(buf[pos + 1 : eol])
            pos = eol + 2
            if length >= 0:
                pos += length + 2
                if pos > size:
                    return None
        elif kind in _ARRAY:
            todo += max(int(buf[pos + 1 : eol]), 0)
            pos = eol + 2
        elif kind == ord("%"):
            todo += 2 * int(buf[pos + 1 : eol])
            pos = eol + 2
        elif kind == ord("|"):
            todo += 2 * int(buf[pos + 1 : eol]) + 1
            pos = eol + 2
        else:
            raise ValueError(f"not RESP: {bytes(buf[pos : pos + 16])!r}")
    return pos


def _command(buf: bytearray, pos: int) -> tuple[list[bytes], int] | None:
    """The command at ``pos`` (RESP array of bulk strings, or inline) and its end."""
    if buf[pos : pos + 1] != b"*":
        eol = buf.find(b"\r\n", pos)
        return None if eol < 0 else (bytes(buf[pos:eol]).split(), eol + 2)
    end = _frame_end(buf, pos)
    if end is None:
        return None
    args: list[bytes] = []
    eol = buf.find(b"\r\n", pos)
    cursor = eol + 2
    for _ in range(int(buf[pos + 1 : eol])):
        eol = buf.find(b"\r\n", cursor)
        if buf[cursor : cursor + 1] != b"$":
            raise ValueError("command arguments must be bulk strings")
        length = int(buf[cursor + 1 : eol])
        args.append(bytes(buf[eol + 2 : eol + 2 + length]))
        cursor = eol + 4 + length
    return args, end


class _Link:
    """Reply accounting of one relayed connection (for :meth:`FaultProxy.drop_next_reply`).

    Commands are parsed on their way to the server; each expects one reply
    frame (push frames excepted), in order. A command a drop rule matched marks
    its reply: the bytes before that reply are forwarded, the reply is held
    back until complete, then the client side is reset.
    """

    def __init__(self, proxy: FaultProxy) -> None:
        self._proxy = proxy
        self.tracking = True
        self.expected: deque[tuple[_DropRule | None, tuple[bytes, ...]]] = deque()
        self._commands = bytearray()
        self._replies = bytearray()
        self._sent = 0

    def armed(self) -> list[_DropRule]:
        return [rule for rule, _ in self.expected if rule is not None]

    def stop_tracking(self) -> None:
        self.tracking = False
        for rule in self.armed():
            self._proxy._rearm(rule)
        self.expected.clear()
        self._commands.clear()
        self._replies.clear()
        self._sent = 0

    def on_commands(self, data: bytes) -> None:
        if not self.tracking:
            return
        buf = self._commands
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                parsed = _command(buf, pos)
                if parsed is None:
                    break
                args, pos = parsed
                if not args:
                    continue
                name = args[0].upper()
                if name in _UNTRACKED or b" ".join([name, *args[1:2]]).upper() in _UNTRACKED:
                    self.stop_tracking()
                    return
                rule = self._proxy._take_rule(name)
                self.expected.append((rule, tuple(args) if rule is not None else ()))
        except (ValueError, IndexError):
            self.stop_tracking()
            return
        del buf[:pos]

    def on_replies(self, data: bytes) -> tuple[bytes, DroppedReply | None]:
        """What to forward now, and the reply to drop (then reset) if one completed.

        The buffer starts at the first incomplete frame; ``_sent`` of its bytes
        were forwarded already (0 when that frame's reply is held back).
        """
        if not self.tracking:
            return data, None
        buf = self._replies
        buf += data
        sent = self._sent
        pos = 0
        try:
            while pos < len(buf):
                end = _frame_end(buf, pos)
                if end is None:
                    break
                if buf[pos] == _PUSH:
                    pos = end
                    continue
                if not self.expected:
                    raise ValueError("a reply without a command")
                rule, command = self.expected.popleft()
                if rule is not None and not rule.cancelled:
                    keep = min(rule.keep, end - pos - 1)
                    drop = DroppedReply(
                        command=command,
                        reply=bytes(buf[pos:end]),
                        forwarded=keep,
                        at=anyio.current_time(),
                    )
                    return bytes(buf[sent : pos + keep]), drop
                pos = end
        except (ValueError, IndexError):
            out = bytes(buf[sent:])
            self.stop_tracking()
            return out, None
        head = self.expected[0][0] if self.expected else None
        hold = pos < len(buf) and buf[pos] != _PUSH and head is not None and not head.cancelled
        stop = pos if hold else len(buf)
        out = bytes(buf[sent:stop]) if stop > sent else b""
        self._sent = max(sent, stop) - pos
        del buf[:pos]
        return out, None


class FaultProxy:
    """Relay TCP from a loopback port to ``upstream``, with faults switchable at runtime.

    ``async with FaultProxy(("127.0.0.1", port)) as proxy:`` then connect to
    ``proxy.port``.

    * :meth:`blackhole`: stop forwarding both ways and keep the sockets open (a
      half-open partition: no RST, no FIN);
    * :meth:`heal`: forward again;
    * :meth:`reset_all`: close every relayed connection with an RST;
    * :meth:`drop_next_reply`: let Redis execute a command, swallow its reply and
      reset the client's connection ("executed, but the reply was lost");
    * ``delay``: seconds added before forwarding each chunk, both ways (a
      request-reply round trip takes ``2 * delay`` longer); set it at any time.

    ``connections`` counts accepted client connections; ``dropped`` lists the
    replies swallowed so far (:class:`DroppedReply`).
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.delay = 0.0
        self.connections = 0
        self.dropped: list[DroppedReply] = []
        self._rules: list[_DropRule] = []
        self._flowing = anyio.Event()
        self._flowing.set()
        self._streams: set[anyio.abc.SocketStream] = set()
        self._tg: anyio.abc.TaskGroup | None = None

    async def __aenter__(self) -> FaultProxy:
        self._listener = await anyio.create_tcp_listener(local_host=self.host, local_port=0)
        self.port = self._listener.extra(SocketAttribute.local_port)
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self._tg.start_soon(self._listener.serve, self._handle)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        await self._tg.__aexit__(None, None, None)
        await self._listener.aclose()
        for stream in list(self._streams):
            await stream.aclose()

    def blackhole(self) -> None:
        self._flowing = anyio.Event()

    def heal(self) -> None:
        self._flowing.set()

    async def reset_all(self) -> None:
        for stream in list(self._streams):
            if stream in self._streams:  # not closed meanwhile with its peer
                await _reset(stream)

    def drop_next_reply(self, prefix: bytes = b"XADD", times: int = 1, *, keep: int = 0) -> None:
        """Swallow the replies to the next ``times`` commands whose name starts with
        ``prefix`` (case-insensitive), each on its way back, and reset that client
        connection with an RST: the server executed the command, the client never
        learns the outcome. Replies before it on the same connection are delivered;
        later ones (the rest of a pipeline) die with the connection.

        Replies pair with commands in order per connection (RESP3 push frames do
        not count); connections that subscribe or run ``MONITOR`` are not
        tracked. A matched command whose connection closes before its reply
        arrives re-arms the rule. ``keep``: bytes of the reply still forwarded
        before the reset (a reply cut mid-frame; never the whole frame).
        """
        if times < 1 or keep < 0:
            raise ValueError("times must be >= 1 and keep >= 0")
        self._rules.append(_DropRule(prefix.upper(), times, keep))

    @property
    def armed_drops(self) -> int:
        """Drops requested and not yet matched to a command."""
        return sum(rule.remaining for rule in self._rules if not rule.cancelled)

    def cancel_drops(self) -> None:
        """Forget every requested drop, including matched ones whose reply is pending."""
        for rule in self._rules:
            rule.cancelled = True
        self._rules.clear()

    def _take_rule(self, name: bytes) -> _DropRule | None:
        for rule in self._rules:
            if rule.remaining > 0 and not rule.cancelled and name.startswith(rule.prefix):
                rule.remaining -= 1
                return rule
        return None

    def _rearm(self, rule: _DropRule) -> None:
        if not rule.cancelled:
            rule.remaining += 1
            if rule not in self._rules:
                self._rules.append(rule)

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            server = await anyio.connect_tcp(*self.upstream)
        except OSError:
            await client.aclose()
            return
        self._streams.update((client, server))
        link = _Link(self)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump_commands, client, server, link, tg)
                tg.start_soon(self._pump_replies, server, client, link, tg)
        finally:
            for rule in link.armed():
                self._rearm(rule)
            self._streams.difference_update((client, server))
            with anyio.CancelScope(shield=True):  # closing the proxy cancels us: close both
                await client.aclose()
                await server.aclose()

    async def _forward(self, dst: anyio.abc.SocketStream, data: bytes) -> None:
        await self._flowing.wait()
        if self.delay:
            await anyio.sleep(self.delay)
        if data:
            await dst.send(data)

    async def _pump_commands(
        self,
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        link: _Link,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            while True:
                data = await src.receive(65536)
                # Counted before it can reach the server, so before its reply can come back.
                link.on_commands(data)
                await self._forward(dst, data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        tg.cancel_scope.cancel()

    async def _pump_replies(
        self,
        src: anyio.abc.SocketStream,
        dst: anyio.abc.SocketStream,
        link: _Link,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        try:
            while True:
                data = await src.receive(65536)
                out, drop = link.on_replies(data)
                await self._forward(dst, out)
                if drop is not None:
                    self.dropped.append(drop)
                    await _reset(dst)
                    break
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        tg.cancel_scope.cancel()


async def _reset(stream: anyio.abc.SocketStream) -> None:
    """Close with an RST (``SO_LINGER`` 0) instead of a FIN."""
    sock = stream.extra(SocketAttribute.raw_socket)
    with contextlib.suppress(OSError):  # closed already: nothing left to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()
