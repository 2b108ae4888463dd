"""Issue 11: retries whose backoff is longer than half of ``claim_idle`` are noted in
Redis, so a member that dies during the backoff loses nothing and no other member
runs the event before its retry time.

A worker process fails the first attempt of each event; its backoff (3 s) is past
the group's claim window (``claim_idle`` 1 s). Another member runs in the test
process.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventbus import ClaimPolicy, Delivery, EventBus, RetryPolicy, Topic
from eventbus._keys import topic_keys

from ..helpers import control_client, wait_until
from .oracle import OracleTail
from .test_crash import GROUP, TOPIC, fleet_of

pytestmark = [pytest.mark.fault]

BACKOFF = 3.0
CLAIM = 1.0


def survivor(url: str, prefix: str, runs: list[tuple[str, int, float]]) -> EventBus:
    bus = EventBus(url, prefix=prefix, scheduler=False)

    @bus.on(
        Topic(TOPIC, durable=True),
        group=GROUP,
        consumer="survivor",
        claim=ClaimPolicy(idle=CLAIM, interval=0.2),
    )
    async def handle(event: Any, delivery: Delivery) -> None:
        runs.append((delivery.id, delivery.attempt, time.time()))

    return bus


@pytest.mark.parametrize("crash", [False, True], ids=["holder-lives", "holder-killed"])
async def test_a_long_backoff_is_held_in_redis(
    redis_server_factory: Any, tmp_path: Path, crash: bool
) -> None:
    server = redis_server_factory()
    prefix = "longretry"
    with fleet_of(
        tmp_path,
        server.url,
        prefix,
        seed=1,
        claim_idle=CLAIM,
        claim_interval=0.2,
        fail_attempts=1,
        retry_backoff=BACKOFF,
        log_starts=True,
    ) as fleet:
        holder = fleet.spawn("holder")
        await holder.wait_event("ready", timeout=20)
        publisher = EventBus(server.url, prefix=prefix, scheduler=False)
        async with publisher:
            receipt = await publisher.publish(Topic(TOPIC, durable=True), {"n": 1})
        oracle = OracleTail(fleet.oracle_dir)

        def failed() -> bool:
            oracle.poll()
            return any(line["kind"] == "fail" for line in oracle.lines)

        await wait_until(failed, timeout=10)
        (fail,) = [line for line in oracle.lines if line["kind"] == "fail"]
        assert fail["event_id"] == receipt.id
        retry_key = f"{prefix}:{{{TOPIC}}}:retry-at:{GROUP}"
        ctl = control_client(server.url)
        try:
            # The member notes the retry time right after the failure; the crash
            # comes during the backoff, after that.
            async def noted() -> bool:
                return await ctl.zscore(retry_key, fail["stream_id"]) is not None

            await wait_until(noted, timeout=5)
        finally:
            await ctl.aclose()
        if crash:
            holder.send(signal.SIGKILL)
            await holder.wait_exit(timeout=10)
        runs: list[tuple[str, int, float]] = []
        async with survivor(server.url, prefix, runs):
            ctl = control_client(server.url)
            try:

                def retried() -> bool:
                    oracle.poll()
                    return bool(runs) or any(line["kind"] == "done" for line in oracle.lines)

                await wait_until(retried, timeout=BACKOFF + 10)
                await anyio.sleep(2 * CLAIM)  # room for a wrong second run to show
                oracle.poll()
                done = [line for line in oracle.lines if line["kind"] == "done"]
                starts = [(line["t"], line["attempt"], "holder") for line in done]
                starts += [(t, attempt, "survivor") for _id, attempt, t in runs]
                assert len(starts) == 1, f"run {len(starts)} times after the failure: {starts}"
                (started, attempt, by) = starts[0]
                assert attempt == 2
                assert by == ("survivor" if crash else "holder")
                assert started >= fail["t"] + BACKOFF - 0.05, (
                    f"retried {started - fail['t']:.2f}s after the failure, backoff {BACKOFF}s"
                )
                assert started <= fail["t"] + BACKOFF + 2 * CLAIM + 1.0
                assert await ctl.zscore(retry_key, fail["stream_id"]) is None
                pending = await ctl.xpending(f"{prefix}:{{{TOPIC}}}:stream", GROUP)
                assert pending["pending"] == 0
            finally:
                await ctl.aclose()


async def test_a_long_retry_of_a_trimmed_entry_leaves_no_retry_time(
    bus_factory: Callable[..., EventBus], server_version: tuple[int, ...]
) -> None:
    """The stream is trimmed under an entry waiting out a long backoff. When its
    retry time comes, the member finds the entry gone (Redis 7: its heartbeat's
    XCLAIM already dropped it from the pending list; 6.2: XCLAIM returns nil and
    keeps it pending), counts it in ``lost_to_trim``, and leaves nothing behind:
    no retry time in ``retry-at`` (before the fix it stayed there forever) and,
    on 6.2, no pending entry."""
    topic = Topic("trimmedretry", durable=True)
    bus = bus_factory(scheduler=False)
    runs: list[int] = []

    @bus.on(
        topic,
        group=GROUP,
        claim=ClaimPolicy(idle=CLAIM, interval=0.2),
        retry=RetryPolicy(backoff=1.5, jitter=0),
    )
    async def handle(event: Any, delivery: Delivery) -> None:
        runs.append(delivery.attempt)
        raise RuntimeError("the first attempt fails")

    keys = topic_keys(bus.prefix, topic.name)
    retry_key = keys.retry_at + GROUP
    async with control_client(bus.url) as ctl, bus:
        receipt = await bus.publish(topic, {"n": 1})

        async def noted() -> bool:
            return await ctl.zscore(retry_key, receipt.stream_id) is not None

        await wait_until(noted, timeout=5)
        await ctl.xtrim(keys.stream, maxlen=0)  # the entry is gone; its retry is due in 1.5 s

        def counted() -> int:
            return sum(s.lost_to_trim for s in bus.consumer_statistics(handle))

        # Redis 7's XAUTOCLAIM reports (and drops) the trimmed entry at the member's
        # next claim pass; 6.2 only tells at the retry time. Either way the member
        # holds the entry until its retry time, and then lets it go.
        (member,) = [m.consumer for m in bus._durable._members if m.consumer is not None]
        assert member.holds(receipt.stream_id)
        await wait_until(lambda: not member.holds(receipt.stream_id), timeout=10)
        assert counted() == 1
        assert await ctl.zcard(retry_key) == 0
        pending = await ctl.xpending(keys.stream, GROUP)
        assert pending["pending"] == 0, f"Redis {server_version}: {pending}"
        assert runs == [1]  # never run again: there is nothing to run
