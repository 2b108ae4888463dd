"""Group options: what one member of a consumer group runs with (:class:`GroupOptions`),
checked in one place for ``bus.on(..., group=)`` and ``bus.subscribe(..., group=)``."""

from __future__ import annotations

import os
import socket
import uuid
from datetime import timedelta
from typing import Any, Final, Literal

import attrs

from .._config import ClaimPolicy, RetryPolicy, seconds
from .._topic import Topic, as_topic
from ..errors import ConfigurationError

__all__ = [
    "NAME_ENV",
    "SLOT_ENV",
    "GroupOptions",
    "StartPosition",
    "check_name",
    "group_options",
    "release_name",
    "reserve_name",
]

SLOT_ENV: Final = "EVENTBUS_SLOT"
"""The environment variable in which the runner (``eventbus run``) gives each worker
process its slot number: the stable part of its default consumer names."""

NAME_ENV: Final = "EVENTBUS_NAME"
"""The first part of the stable default consumer names, ``<name>:<slot>``, in place of
the host name (``eventbus run --name``): for two runners on one host, or a host name
that changes at each start (containers)."""

_NAME_MAX: Final = 200
_ADAPTIVE_FIRST_BATCH: Final = 100
"""A member's first read without ``batch=``; reads double while handlers keep up..."""
_ADAPTIVE_MAX_BATCH: Final = 1000
"""... up to this (``XREADGROUP COUNT``; a larger count saves little more)."""


StartPosition = Literal["earliest", "latest"]
"""Where a new group starts: every event in the stream, or only those after it was created."""


@attrs.frozen
class GroupOptions:
    """How one handler consumes a durable topic as a member of a group."""

    group: str
    consumer: str
    concurrency: int
    batch: int
    max_batch: int
    """Largest read: ``batch`` when it was given, else reads grow while handlers keep up."""
    block: float
    retry: RetryPolicy
    claim: ClaimPolicy
    start: StartPosition
    publish_to: Topic[Any] | None
    dedupe: float | None
    stable_name: bool = False
    """``consumer`` is the runner slot's default (``<host>:<slot>``): the member takes
    the first free one of it, ``<host>:<slot>.1``, ... (see :func:`reserve_name`)."""


def check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > _NAME_MAX:
        raise ConfigurationError(f"{kind} name must be a non-empty str of at most 200 characters")
    if any(ch.isspace() or not ch.isprintable() for ch in name):
        raise ConfigurationError(
            f"{kind} name {name!r} must not contain spaces or control characters"
        )
    return name


def _default_consumer_name() -> tuple[str, bool]:
    """The default consumer name, and whether it is the stable one of a runner slot.

    Under the runner (``$EVENTBUS_SLOT`` set) it is ``<host>:<slot>``, or
    ``<name>:<slot>`` with ``$EVENTBUS_NAME`` (``eventbus run --name``): a worker that
    restarts in the same slot takes back its own pending entries at once. Anywhere
    else it is unique per process start (two processes on one host must not share a
    name, and nothing says which is which): pass ``consumer=`` for a stable one."""
    slot = os.environ.get(SLOT_ENV, "").strip()
    if slot:
        name = os.environ.get(NAME_ENV, "").strip() or socket.gethostname()
        return check_name("consumer", f"{name}:{slot}"), True
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}", False


_RESERVED: set[tuple[str, str, str]] = set()
"""(stream, group, consumer) of the stable default names members of this process run
under (a process may have several members of one group: each needs its own name)."""


def reserve_name(stream: str, group: str, base: str) -> str:
    """The first of ``base``, ``base.1``, ``base.2``, ... that no member of this process
    runs under in ``group`` of ``stream``; reserved until :func:`release_name`.

    Members start in the order they were declared, so a restarted worker gets the same
    names for the same handlers."""
    n = 0
    name = base
    while (stream, group, name) in _RESERVED:
        n += 1
        name = f"{base}.{n}"
    _RESERVED.add((stream, group, name))
    return name


def release_name(stream: str, group: str, name: str) -> None:
    _RESERVED.discard((stream, group, name))


def group_options(
    topic: Topic[Any],
    *,
    group: str,
    consumer: str | None,
    concurrency: int,
    max_attempts: int | None,
    claim_idle: float | timedelta | None,
    retry: RetryPolicy,
    claim: ClaimPolicy,
    batch: int | None,
    block: float | timedelta,
    start: StartPosition,
    publish_to: Topic[Any] | str | None,
    dedupe: float | timedelta | None,
) -> GroupOptions:
    """Check the group options of one member of ``topic`` and fold the shortcuts
    (``max_attempts``, ``claim_idle``) into their policies.

    ``batch=None`` reads adaptively: 100 entries first, doubling up to 1,000
    while the handlers keep up.

    :raises eventbus.errors.ConfigurationError: a bad name, count, start or target.
    """
    check_name("group", group)
    stable = False
    if consumer is None:
        consumer, stable = _default_consumer_name()
    name = check_name("consumer", consumer)
    if batch is None:
        batch, max_batch = _ADAPTIVE_FIRST_BATCH, _ADAPTIVE_MAX_BATCH
    else:
        max_batch = batch
    for label, value in (("concurrency", concurrency), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ConfigurationError(
                f"topic {topic.name!r}: {label} must be a positive int, got {value!r}"
            )
    if start not in ("earliest", "latest"):
        raise ConfigurationError(f"start must be 'earliest' or 'latest', got {start!r}")
    if max_attempts is not None:
        retry = attrs.evolve(retry, max_attempts=max_attempts)
    if claim_idle is not None:
        claim = attrs.evolve(claim, idle=claim_idle)
    target = None if publish_to is None else as_topic(publish_to)
    if target is not None and target.pattern:
        raise ConfigurationError("publish_to must be a topic, not a pattern")
    return GroupOptions(
        group=group,
        consumer=name,
        concurrency=concurrency,
        batch=batch,
        max_batch=max_batch,
        block=seconds(block, name="block"),
        retry=retry,
        claim=claim,
        start=start,
        publish_to=target,
        dedupe=None if dedupe is None else seconds(dedupe, name="dedupe"),
        stable_name=stable,
    )
