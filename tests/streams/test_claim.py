"""Claiming stuck deliveries: the XAUTOCLAIM scan window (RELIABILITY.md F3b)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from eventbus import ClaimPolicy, Delivery, EventBus, Topic
from tests.helpers import command_calls, control_client, wait_until


@pytest.mark.fault
async def test_f3b_claimer_follows_the_cursor_past_5000_fresh_entries(
    bus_factory: Callable[..., EventBus], redis_url: str
) -> None:
    # A pending list of 5,000 fresh entries followed by 10 idle ones. XAUTOCLAIM
    # scans at most COUNT x 10 entries per call, so a claimer that restarts at
    # 0-0 every call, or stops at the first empty page, never reaches the 10.
    topic = Topic("scan", durable=True)
    seed = bus_factory()
    async with seed:
        receipts = await seed.publish_many(topic, list(range(5010)))
    key = f"{seed.prefix}:{{scan}}:stream"
    idle_ids = [r.stream_id for r in receipts[-10:]]
    async with control_client(redis_url) as admin:
        await admin.xgroup_create(key, "g", id="0")
        await admin.xreadgroup("g", "gone", {key: ">"}, count=5010)
        # The last 10 have been idle for 1,000 s; the 5,000 before them are fresh.
        await admin.xclaim(key, "g", "gone", 0, idle_ids, idle=1_000_000, justid=True)

        claimer = bus_factory(prefix=seed.prefix)
        got: list[tuple[str, int]] = []

        @claimer.on(topic, group="g", claim=ClaimPolicy(idle=60, interval=0.2, count=100))
        def handle(n: int, delivery: Delivery) -> None:
            got.append((delivery.stream_id, delivery.attempt))

        before = await command_calls(admin, "xautoclaim")
        async with claimer:
            await wait_until(lambda: len(got) == 10, timeout=10)
            calls = await command_calls(admin, "xautoclaim") - before
            stats = claimer.consumer_statistics(handle)[0]
        pending = await admin.xpending(key, "g")
    print(f"F3b: 10 idle entries found behind 5,000 fresh ones in {calls} XAUTOCLAIM calls")
    assert sorted(stream_id for stream_id, _ in got) == sorted(idle_ids)
    assert {attempt for _, attempt in got} == {2}  # Redis counted the claim
    assert calls <= 10
    assert stats.claimed == 10
    assert pending["pending"] == 5000  # the fresh ones stay with their owner
