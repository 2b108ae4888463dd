"""eventbus: one publish reaches every interested party, over Redis.

The names here are the public API; ``eventbus.errors``, ``eventbus.signals`` and
``eventbus.testing`` are public submodules.

The names are loaded on first use (PEP 562 ``__getattr__``): ``import eventbus``
alone loads no Redis client, so the ``eventbus`` command's ``--help`` and a
program that only imports the package start quickly. The first public name used
loads them all, as an eager import would have.
"""

from __future__ import annotations

import contextlib
import typing
from typing import Any

from . import errors
from ._version import __version__

if typing.TYPE_CHECKING:  # what __getattr__ below loads, for type checkers
    from . import signals
    from ._bus import EventBus
    from ._codec import configure_converter, make_converter
    from ._config import UNSET, ClaimPolicy, Limits, LivePolicy, Overflow, RetryPolicy
    from ._delayed import ScheduleInfo
    from ._envelope import Delivery, Receipt
    from ._handlers import Handler
    from ._hub import Gap
    from ._queues import Job, JobDeadLetter, JobSubscription, Queue
    from ._stats import (
        BusStats,
        ConsumerStatistics,
        DelayedStatistics,
        GroupStats,
        QueueStats,
        SubscriptionStatistics,
        TopicStats,
        WorkerStatistics,
    )
    from ._streams._deadletter import DeadLetter
    from ._streams._iterator import GroupSubscription
    from ._streams._options import StartPosition
    from ._subscription import Subscription
    from ._topic import Topic

__all__ = [
    "UNSET",
    "BusStats",
    "ClaimPolicy",
    "ConsumerStatistics",
    "DeadLetter",
    "DelayedStatistics",
    "Delivery",
    "EventBus",
    "Gap",
    "GroupStats",
    "GroupSubscription",
    "Handler",
    "Job",
    "JobDeadLetter",
    "JobSubscription",
    "Limits",
    "LivePolicy",
    "Overflow",
    "Queue",
    "QueueStats",
    "Receipt",
    "RetryPolicy",
    "ScheduleInfo",
    "StartPosition",
    "Subscription",
    "SubscriptionStatistics",
    "Topic",
    "TopicStats",
    "WorkerStatistics",
    "__version__",
    "configure_converter",
    "errors",
    "make_converter",
    "signals",
]


def _load() -> None:
    """Bind every public name here, and show each as eventbus.X in reprs, tracebacks
    and docs (httpx, trio)."""
    from ._bus import EventBus
    from ._codec import configure_converter, make_converter
    from ._config import UNSET, ClaimPolicy, Limits, LivePolicy, Overflow, RetryPolicy
    from ._delayed import ScheduleInfo
    from ._envelope import Delivery, Receipt
    from ._handlers import Handler
    from ._hub import Gap
    from ._queues import Job, JobDeadLetter, JobSubscription, Queue
    from ._stats import (
        BusStats,
        ConsumerStatistics,
        DelayedStatistics,
        GroupStats,
        QueueStats,
        SubscriptionStatistics,
        TopicStats,
        WorkerStatistics,
    )
    from ._streams._deadletter import DeadLetter
    from ._streams._iterator import GroupSubscription
    from ._streams._options import StartPosition
    from ._subscription import Subscription
    from ._topic import Topic

    found: dict[str, Any] = {
        "UNSET": UNSET,
        "BusStats": BusStats,
        "ClaimPolicy": ClaimPolicy,
        "ConsumerStatistics": ConsumerStatistics,
        "DeadLetter": DeadLetter,
        "DelayedStatistics": DelayedStatistics,
        "Delivery": Delivery,
        "EventBus": EventBus,
        "Gap": Gap,
        "GroupStats": GroupStats,
        "GroupSubscription": GroupSubscription,
        "Handler": Handler,
        "Job": Job,
        "JobDeadLetter": JobDeadLetter,
        "JobSubscription": JobSubscription,
        "Limits": Limits,
        "LivePolicy": LivePolicy,
        "Overflow": Overflow,
        "Queue": Queue,
        "QueueStats": QueueStats,
        "Receipt": Receipt,
        "RetryPolicy": RetryPolicy,
        "ScheduleInfo": ScheduleInfo,
        "StartPosition": StartPosition,
        "Subscription": Subscription,
        "SubscriptionStatistics": SubscriptionStatistics,
        "Topic": Topic,
        "TopicStats": TopicStats,
        "WorkerStatistics": WorkerStatistics,
        "configure_converter": configure_converter,
        "make_converter": make_converter,
    }
    for obj in found.values():
        if getattr(obj, "__module__", "").startswith("eventbus._"):
            with contextlib.suppress(AttributeError, TypeError):  # e.g. type aliases
                obj.__module__ = __name__
    globals().update(found)


def __getattr__(name: str) -> Any:
    if name == "signals":
        # The package's own modules import it (``from . import signals``) while they
        # load: it must not load the rest of the package under them. (An import
        # statement, not ``from . import``, which would ask this function again.)
        import eventbus.signals

        return eventbus.signals
    if name in __all__ and name not in globals():
        _load()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
