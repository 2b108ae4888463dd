"""The hub's Receiver (one subscriber's bounded buffer) and Hub (route -> receivers), alone.

No Redis here: these are the buffers every live, local and stream-tail subscriber
reads from, tested through their own interface.
"""

from __future__ import annotations

import anyio
import pytest

from eventbus._envelope import CONTENT_JSON, Envelope
from eventbus._hub import Hub, Receiver
from eventbus.errors import SubscriberOverflow


async def get(receiver: Receiver) -> Envelope:
    """What a subscription's ``__anext__`` does: take, else wait and take again."""
    env = receiver.take()
    while env is None:
        await receiver.waiter()
        env = receiver.take()
    return env


def env(n: int, *, seq: int | None = None, publisher: str = "p") -> Envelope:
    return Envelope(
        topic="t",
        id=f"e{n}",
        publisher=publisher,
        seq=n if seq is None else seq,
        published_ms=None,
        headers={},
        content_type=CONTENT_JSON,
        data=n,
    )


def drain(receiver: Receiver) -> list[int]:
    out = []
    while receiver.buffered():
        out.append(receiver._buf.popleft().data)
    return out


@pytest.mark.parametrize(
    ("policy", "kept"),
    [("drop_oldest", [3, 4, 5]), ("drop_newest", [1, 2, 3])],
)
def test_drop_policies_keep_the_right_events_and_count_them(policy: str, kept: list[int]) -> None:
    overflowed: list[int] = []
    receiver = Receiver(
        label="t",
        capacity=3,
        overflow=policy,  # type: ignore[arg-type]
        on_overflow=lambda r: overflowed.append(r.dropped),
    )
    for n in range(1, 6):
        assert receiver.offer(env(n)) is True
    stats = receiver.statistics()
    assert (stats.received, stats.dropped, stats.buffered, stats.buffer_size) == (5, 2, 3, 3)
    assert overflowed == [1, 2]
    assert drain(receiver) == kept


async def test_block_refuses_when_full_and_wakes_the_writer_at_half() -> None:
    receiver = Receiver(label="t", capacity=4, overflow="block")
    for n in range(4):
        assert receiver.offer(env(n))
    assert receiver.offer(env(4)) is False  # the dispatcher must wait
    assert receiver.statistics().received == 4  # a refused offer is not received
    woke = anyio.Event()

    async def writer() -> None:
        await receiver.wait_space()
        woke.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(writer)
        await anyio.wait_all_tasks_blocked()
        await get(receiver)
        await anyio.wait_all_tasks_blocked()
        assert not woke.is_set()  # 3 of 4 left: above the half mark
        await get(receiver)
        with anyio.fail_after(1):
            await woke.wait()  # 2 of 4: room again
    assert receiver.offer(env(4))


async def test_error_policy_ends_the_subscription_after_what_was_buffered() -> None:
    receiver = Receiver(label="t", capacity=2, overflow="error")
    receiver.offer(env(1))
    receiver.offer(env(2))
    receiver.offer(env(3))  # overflow: closes with the error
    assert receiver.closed
    assert receiver.statistics().dropped == 1
    assert (await get(receiver)).data == 1
    assert (await get(receiver)).data == 2
    with pytest.raises(SubscriberOverflow):
        await get(receiver)


async def test_close_keeps_or_discards_what_is_buffered() -> None:
    kept = Receiver(label="t", capacity=10, overflow="drop_oldest")
    discarded = Receiver(label="t", capacity=10, overflow="drop_oldest")
    for receiver in (kept, discarded):
        for n in range(3):
            receiver.offer(env(n))
    kept.close()
    discarded.close(discard=True)
    assert [(await get(kept)).data for _ in range(3)] == [0, 1, 2]
    for receiver in (kept, discarded):
        with pytest.raises(StopAsyncIteration):
            await get(receiver)
        assert receiver.offer(env(9))  # a closed receiver takes nothing, and never blocks
        assert receiver.buffered() == 0
    assert discarded.statistics().delivered == 0
    assert discarded.discarded == 3
    assert kept.statistics().delivered == 3


async def test_a_closed_multi_route_receiver_takes_nothing_more() -> None:
    receiver = Receiver(label="a,b", capacity=10, overflow="drop_oldest", multi_route=True)
    receiver.close()
    assert receiver.offer(env(1))
    assert receiver.buffered() == 0


def test_multi_route_receiver_takes_one_publish_once() -> None:
    receiver = Receiver(label="a,b", capacity=10, overflow="drop_oldest", multi_route=True)
    one, two = env(1), env(2)
    for e in (one, one, two, two):  # each arrives by a channel and by a pattern
        receiver.offer(e)
    assert drain(receiver) == [1, 2]
    assert receiver.statistics().received == 2


async def test_get_is_cancellation_safe() -> None:
    receiver = Receiver(label="t", capacity=10, overflow="drop_oldest")
    with anyio.move_on_after(0.01):
        await get(receiver)
    receiver.offer(env(7))
    with anyio.fail_after(1):
        assert (await get(receiver)).data == 7


def test_hub_reference_counts_routes() -> None:
    hub = Hub()
    a = Receiver(label="t", capacity=1, overflow="drop_oldest")
    b = Receiver(label="t", capacity=1, overflow="drop_oldest")
    assert hub.add("r", a) is True  # first: subscribe upstream
    assert hub.add("r", b) is False
    assert hub.remove("r", a) is False
    assert hub.remove("r", a) is False  # not attached any more: nothing to do
    assert hub.remove("r", b) is True  # last: unsubscribe upstream
    assert "r" not in hub.routes


def test_hub_delivers_to_each_and_returns_the_blocked_ones() -> None:
    hub = Hub()
    free = Receiver(label="t", capacity=5, overflow="drop_oldest")
    full = Receiver(label="t", capacity=1, overflow="block")
    full.offer(env(0))
    hub.add("r", free)
    hub.add("r", full)
    assert hub.deliver(hub.routes["r"], env(1)) == [full]
    assert drain(free) == [1]


def test_gap_tracking_per_publisher() -> None:
    hub = Hub()
    assert hub.track("r", env(1)) is None
    assert hub.track("r", env(2)) is None
    gap = hub.track("r", env(5))
    assert gap is not None
    assert not isinstance(gap, bool)
    assert (gap.first_missing, gap.last_missing, gap.size) == (3, 4, 2)
    assert hub.track("r", env(4)) is False  # late or repeated: dropped
    assert hub.track("r", env(1, publisher="other")) is None  # another publisher: its own count


def test_tally_sums_every_receiver_and_picks_the_worst_first() -> None:
    from eventbus._hub import tally

    quiet = [Receiver(label=f"q{i}", capacity=4, overflow="drop_oldest") for i in range(5)]
    busy = Receiver(label="busy", capacity=4, overflow="drop_oldest")
    for n in range(3):
        busy.offer(env(n))  # buffered, none dropped
    lossy = Receiver(label="lossy", capacity=2, overflow="drop_oldest")
    for n in range(10):
        lossy.offer(env(n))  # 8 dropped
    lossy.take()
    gappy = Receiver(label="gappy", capacity=4, overflow="drop_oldest")
    gappy.gaps, gappy.missed = 1, 20
    found = [*quiet[:2], busy, *quiet[2:], lossy, gappy]
    totals, chosen = tally(found, 3)
    assert [found[i].label for i in chosen] == ["gappy", "lossy", "busy"]
    assert totals == {
        "received": 13, "delivered": 1, "dropped": 8, "buffered": 4,
        "gaps": 1, "missed": 20, "errors": 0,
    }  # fmt: skip
    assert totals["received"] == totals["delivered"] + totals["dropped"] + totals["buffered"]
    _, chosen = tally(found, 5)  # fewer in trouble than asked: the others in order
    assert [found[i].label for i in chosen] == ["gappy", "lossy", "busy", "q0", "q1"]
