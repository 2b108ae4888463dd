"""FaultProxy: a loopback TCP relay between a client and redis-server, for fault tests."""

from __future__ import annotations

import socket
import struct
from types import TracebackType

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

__all__ = ["FaultProxy"]


class FaultProxy:
    """Relay TCP from a loopback port to ``upstream``, with faults switchable at runtime.

    ``async with FaultProxy(("127.0.0.1", port)) as proxy:`` then connect to
    ``proxy.port``.

    * :meth:`blackhole`: stop forwarding both ways and keep the sockets open (a
      half-open partition: no RST, no FIN);
    * :meth:`heal`: forward again;
    * :meth:`reset_all`: close every relayed connection with an RST;
    * ``delay``: seconds added before forwarding each chunk.
    """

    def __init__(self, upstream: tuple[str, int], *, host: str = "127.0.0.1") -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.delay = 0.0
        self.connections = 0
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
            sock = stream.extra(SocketAttribute.raw_socket)
            # SO_LINGER 0: close() sends RST instead of FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await stream.aclose()

    async def _handle(self, client: anyio.abc.SocketStream) -> None:
        self.connections += 1
        try:
            server = await anyio.connect_tcp(*self.upstream)
        except OSError:
            await client.aclose()
            return
        self._streams.update((client, server))
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._pump, client, server, tg)
                tg.start_soon(self._pump, server, client, tg)
        finally:
            self._streams.difference_update((client, server))
            await client.aclose()
            await server.aclose()

    async def _pump(
        self, src: anyio.abc.SocketStream, dst: anyio.abc.SocketStream, tg: anyio.abc.TaskGroup
    ) -> None:
        try:
            while True:
                data = await src.receive(65536)
                await self._flowing.wait()
                if self.delay:
                    await anyio.sleep(self.delay)
                await dst.send(data)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        tg.cancel_scope.cancel()
