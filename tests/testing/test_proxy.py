"""eventbus.testing.FaultProxy: the faults other tests rely on, checked on their own."""

from __future__ import annotations

import time
from typing import Any

import anyio
import redis.asyncio as aioredis

from eventbus.testing import FaultProxy


async def _round_trips(client: aioredis.Redis, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        assert await client.ping()
        times.append(time.perf_counter() - t0)
    return times


async def test_delay_is_added_each_way_and_can_change_at_any_time(
    redis_server_factory: Any,
) -> None:
    server = redis_server_factory()
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        client = aioredis.Redis(host="127.0.0.1", port=proxy.port)
        async with client:
            await client.ping()  # connected before anything is measured
            undelayed = await _round_trips(client, 10)
            proxy.delay = 0.02
            delayed = await _round_trips(client, 10)
            proxy.delay = 0.0
            healed = await _round_trips(client, 10)
    # Each PING waits once on its way in and once on its way out.
    assert min(delayed) >= 2 * 0.02
    assert max(delayed) < 2 * 0.02 + 0.5
    assert sorted(undelayed)[5] < 0.02
    assert sorted(healed)[5] < 0.02


async def test_delay_keeps_replies_in_order(redis_server_factory: Any) -> None:
    server = redis_server_factory()
    async with FaultProxy(("127.0.0.1", server.port)) as proxy:
        proxy.delay = 0.001
        client = aioredis.Redis(host="127.0.0.1", port=proxy.port, decode_responses=True)
        async with client, anyio.create_task_group() as tg:

            async def pairs(k: int) -> None:
                for i in range(50):
                    key = f"d:{k}:{i}"
                    await client.set(key, key)
                    assert await client.get(key) == key

            for k in range(4):
                tg.start_soon(pairs, k)
