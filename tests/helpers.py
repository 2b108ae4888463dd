"""Shared test helpers: a raw redis-py control client and bounded waits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import redis.asyncio as aioredis


def control_client(url: str) -> aioredis.Redis:
    """A plain redis-py client for inspecting the server (never used by the bus)."""
    return aioredis.Redis.from_url(url, decode_responses=True)


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
