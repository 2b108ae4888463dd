"""How user code is called: ``invoke`` (group members) and ``run_handler`` (live handlers,
whose hot loop inlines ``invoke``) must call a handler the same way."""

from __future__ import annotations

from typing import Any

import pytest

from eventbus import Delivery
from eventbus._codec import Codec
from eventbus._config import DEFAULT_LIMITS
from eventbus._envelope import CONTENT_JSON, Envelope
from eventbus._handlers import HandlerSpec, inspect_handler, invoke, run_handler
from eventbus._hub import Receiver


def envelope(n: int) -> Envelope:
    return Envelope(
        topic="t",
        id=f"e{n}",
        publisher="p",
        seq=n,
        published_ms=1_700_000_000_000,
        headers={"h": "v"},
        content_type=CONTENT_JSON,
        data={"n": n},
    )


def recorder() -> tuple[list[tuple[Any, ...]], list[HandlerSpec]]:
    calls: list[tuple[Any, ...]] = []

    def plain(event: dict[str, int]) -> None:
        calls.append(("plain", event))

    def with_delivery(event: dict[str, int], delivery: Delivery) -> None:
        calls.append(("with_delivery", event, delivery))

    async def async_plain(event: dict[str, int]) -> None:
        calls.append(("async_plain", event))

    async def async_with_delivery(event: dict[str, int], delivery: Delivery) -> None:
        calls.append(("async_with_delivery", event, delivery))

    specs = [
        inspect_handler(fn, dict) for fn in (plain, with_delivery, async_plain, async_with_delivery)
    ]
    return calls, specs


async def test_run_handler_calls_a_handler_as_invoke_does() -> None:
    codec = Codec(None, DEFAULT_LIMITS)
    by_invoke, specs = recorder()
    for spec in specs:
        for n in range(3):
            result = invoke(spec, {"n": n}, envelope(n))
            if spec.is_async:
                await result
    by_loop, specs = recorder()
    for spec in specs:
        receiver = Receiver(label="t", capacity=10, overflow="block")
        for n in range(3):
            receiver.offer(envelope(n))
        receiver.close()
        await run_handler(receiver, spec, codec, sender=None)
    assert by_loop == by_invoke
    assert len(by_invoke) == 12
    delivery = by_invoke[3][2]
    assert isinstance(delivery, Delivery)
    assert (delivery.id, delivery.attempt, delivery.group, delivery.headers) == (
        "e0",
        1,
        None,
        {"h": "v"},
    )


async def test_invoke_gives_a_group_member_its_group_and_attempt() -> None:
    calls, specs = recorder()
    await invoke(specs[3], {"n": 1}, envelope(1), "billing", 3)
    ((_name, _event, delivery),) = calls
    assert (delivery.group, delivery.attempt) == ("billing", 3)


def test_invoke_lets_the_handler_error_through() -> None:
    def boom(event: object) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        invoke(inspect_handler(boom, object), 1, envelope(1))
