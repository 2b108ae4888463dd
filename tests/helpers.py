"""Shared test helpers: a raw redis-py control client and bounded waits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import redis.asyncio as aioredis

from eventbus import Limits
from eventbus._codec import Codec
from eventbus._envelope import Envelope


def control_client(url: str, *, socket_timeout: float | None = None) -> aioredis.Redis:
    """A plain redis-py client for inspecting the server (never used by the bus).

    ``socket_timeout``: seconds a reply may take (redis-py 8's default is 5 s: too
    short for a long ``DEBUG POPULATE`` on a loaded machine)."""
    if socket_timeout is None:
        return aioredis.Redis.from_url(url, decode_responses=True)
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=socket_timeout)


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool], *, timeout: float = 5.0, interval: float = 0.01
) -> float:
    """Poll ``predicate`` until true; fail after ``timeout``. Returns the seconds waited."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return anyio.current_time() - start
            await anyio.sleep(interval)


async def command_calls(client: aioredis.Redis, command: str) -> int:
    """How many times ``command`` ran on the server (INFO commandstats)."""
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command.lower()}", {}).get("calls", 0))


def stored_event(fields: Mapping[Any, Any], stream_id: str = "0-1") -> Envelope:
    """The event a stream entry carries, as a reader decodes it (any wire version).

    ``fields`` as redis-py returns them, bytes or (``decode_responses``) str."""
    raw = {
        (k.encode() if isinstance(k, str) else k): (v.encode() if isinstance(v, str) else v)
        for k, v in fields.items()
    }
    return Codec(None, Limits()).decode_entry("t", stream_id, raw)
