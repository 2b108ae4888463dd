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
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventbus import ClaimPolicy, Delivery, EventBus, Topic

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
