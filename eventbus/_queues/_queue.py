"""Queues: a validated name, the job type, its priority levels and its rate limit."""

from __future__ import annotations

import builtins
from datetime import timedelta
from typing import Any, Final, Generic, TypeVar, final, overload

from .._config import seconds
from .._topic import validate_name
from ..errors import ConfigurationError

__all__ = ["MAX_PRIORITIES", "Queue"]

T = TypeVar("T")

MAX_PRIORITIES: Final = 16
"""Most priority levels of a queue: each level is a list a worker looks at."""


@final
class Queue(Generic[T]):
    """A work queue of jobs of type ``T``: each job goes to exactly one worker.

    ``Queue("thumbnails", Resize)`` holds ``Resize`` jobs in a Redis list that any
    process can push to (``bus.enqueue``, or ``LPUSH`` of a plain JSON value from
    another system) and any number of workers take from (``@bus.worker``). Each job
    runs **at least once**: a worker moves it into a processing list of its own as
    it takes it, and removes it only once the job is settled; the jobs of a worker
    that dies are put back by the live ones.

    :param name: queue name, as a topic's (``[A-Za-z0-9._-]``, at most
        ``Limits.max_topic_len``). A queue and a topic may share a name.
    :param type: the job type (attrs class, dataclass, anything cattrs structures);
        ``object`` (the default) is the plain JSON value.
    :param priorities: how many priority levels (1 to 16). ``priority=0`` is the
        default and least urgent; a higher level is always taken first (strict),
        and jobs of one level are taken in the order they were enqueued.
    :param rate: ``(n, per)``: at most ``n`` jobs *start* in any window of ``per``
        seconds (or a ``timedelta``), across every worker of every process, enforced
        in Redis by its clock (a sliding window, to the millisecond). Jobs over the
        limit wait in the queue; workers sleep until the window has room.
    :raises eventbus.errors.InvalidTopic: the name is not allowed.
    :raises eventbus.errors.ConfigurationError: a bad ``priorities`` or ``rate``.

    .. versionadded:: 0.3
    """

    __slots__ = ("name", "priorities", "rate", "type")
    name: str
    type: builtins.type[T]
    priorities: int
    rate: tuple[int, float] | None

    @overload
    def __init__(
        self: Queue[Any],
        name: str,
        *,
        priorities: int = ...,
        rate: tuple[int, float | timedelta] | None = ...,
    ) -> None: ...
    @overload
    def __init__(
        self,
        name: str,
        type: builtins.type[T],
        *,
        priorities: int = ...,
        rate: tuple[int, float | timedelta] | None = ...,
    ) -> None: ...
    def __init__(
        self,
        name: str,
        type: builtins.type[T] | None = None,
        *,
        priorities: int = 1,
        rate: tuple[int, float | timedelta] | None = None,
    ) -> None:
        validate_name(name)
        if (
            not isinstance(priorities, int)
            or isinstance(priorities, bool)
            or not 1 <= priorities <= MAX_PRIORITIES
        ):
            raise ConfigurationError(
                f"queue {name!r}: priorities must be an int from 1 to {MAX_PRIORITIES},"
                f" got {priorities!r}"
            )
        checked: tuple[int, float] | None = None
        if rate is not None:
            try:
                n, per = rate
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"queue {name!r}: rate must be (jobs, per seconds), got {rate!r}"
                ) from None
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ConfigurationError(f"queue {name!r}: rate's job count must be >= 1")
            per_s = seconds(per, name="rate's window")
            if not per_s >= 0.001:
                raise ConfigurationError(f"queue {name!r}: rate's window must be >= 1 ms")
            checked = (n, per_s)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "type", object if type is None else type)
        object.__setattr__(self, "priorities", priorities)
        object.__setattr__(self, "rate", checked)

    def __setattr__(self, key: str, value: object) -> None:
        raise AttributeError("Queue is immutable")

    def _key(self) -> tuple[object, ...]:
        return (self.name, self.type, self.priorities, self.rate)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Queue):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        tp = getattr(self.type, "__qualname__", repr(self.type))
        extra = f", priorities={self.priorities}" if self.priorities != 1 else ""
        if self.rate is not None:
            extra += f", rate={self.rate}"
        return f"Queue({self.name!r}, {tp}{extra})"
