"""Ordered, coalesced publishing: concurrent ``publish()`` calls share pipelined writes.

Why: a live subscriber orders and dedupes each publisher's events by sequence
number, so events must reach Redis in the order their numbers were taken. Sent
concurrently through a connection pool they can overtake each other (a false gap,
then the late one dropped as a repeat). Here the first caller to find the writer
idle becomes the writer: it sends everything queued, in order, one pipeline per
batch, until the queue is empty. No background task, and no added latency when
the bus is idle: a lone publish is a single command; only what is already
waiting is batched.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import anyio
import redis.asyncio as aioredis

from .._connection import translate

__all__ = ["OrderedPublisher"]

MAX_BATCH: Final = 1000


class OrderedPublisher:
    """Sends PUBLISH commands in the order they were submitted, batching under load."""

    __slots__ = ("_busy", "_client", "_queue")

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._queue: list[tuple[str, str, bytes, asyncio.Future[int]]] = []
        self._busy = False

    async def publish(self, topic: str, channel: str, raw: bytes) -> int:
        """Publish ``raw`` on ``channel``; return how many Redis clients received it.

        Cancellation: the event is queued before this awaits anything, so once
        called it is sent even if the caller is cancelled (the outcome is then
        unknown to the caller, as with any cancelled network call).

        :raises eventbus.errors.BackendError: (subclasses) as mapped by ``translate``.
        """
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._queue.append((topic, channel, raw, fut))
        await self._write()
        return await fut

    async def publish_all(self, topic: str, channel: str, raws: list[bytes]) -> list[int]:
        """Publish each of ``raws`` on ``channel``, in order; return each one's receivers.

        As :meth:`publish` for each (all queued before this awaits anything). Every
        one is sent even if an earlier one failed.

        :raises eventbus.errors.BackendError: the first failure, once all were sent.
        """
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[int]] = []
        for raw in raws:
            fut: asyncio.Future[int] = loop.create_future()
            self._queue.append((topic, channel, raw, fut))
            futs.append(fut)
        await self._write()
        results: list[int] = []
        error: BaseException | None = None
        for fut in futs:  # every outcome retrieved: no "exception never retrieved"
            try:
                results.append(await fut)
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
        return results

    async def _write(self) -> None:
        """Become the writer if there is none: send everything queued, in order."""
        if not self._busy:
            self._busy = True
            try:
                # Shielded: this task now writes for every queued caller, so its
                # own cancellation must not strand their futures.
                with anyio.CancelScope(shield=True):
                    while self._queue:
                        batch = self._queue[:MAX_BATCH]
                        del self._queue[:MAX_BATCH]
                        await self._send(batch)
            finally:
                self._busy = False

    async def _send(self, batch: list[tuple[str, str, bytes, asyncio.Future[int]]]) -> None:
        results: list[Any]
        try:
            if len(batch) == 1:
                _topic, channel, raw, _fut = batch[0]
                results = [await self._client.publish(channel, raw)]
            else:
                async with self._client.pipeline(transaction=False) as pipe:
                    for _topic, channel, raw, _fut in batch:
                        pipe.publish(channel, raw)
                    results = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            results = [exc] * len(batch)
        for (topic, channel, _raw, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                mapped = translate(result, topic=topic, command="PUBLISH", channel=channel)
                if mapped is not result:
                    mapped.__cause__ = result
                fut.set_exception(mapped)
            else:
                fut.set_result(int(result))
