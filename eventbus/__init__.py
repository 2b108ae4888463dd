"""eventbus: one publish reaches every interested party, over Redis.

The names here are the public API; ``eventbus.errors``, ``eventbus.signals``,
``eventbus.sync`` (blocking publish for code without an event loop) and
``eventbus.testing`` are public submodules.
"""

from __future__ import annotations

import contextlib

from . import errors, signals
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
from ._version import __version__

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

# Show public names as eventbus.X in reprs, tracebacks and docs (httpx, trio).
for _name in __all__:
    _obj = globals()[_name]
    if getattr(_obj, "__module__", "").startswith("eventbus._"):
        with contextlib.suppress(AttributeError, TypeError):  # e.g. type aliases
            _obj.__module__ = __name__
del _name, _obj
