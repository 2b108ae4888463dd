"""Statistics records: frozen snapshots of counters, returned by the bus.

All of them live here (trio's ``MemoryChannelStatistics`` style): a snapshot is a
value, never a live view, and each field has a docstring. This module is a
primitive: it imports nothing of the bus's features, which import it.
"""

from __future__ import annotations

from typing import Any, final

import attrs

__all__ = [
    "BusStats",
    "ConsumerCounters",
    "ConsumerStatistics",
    "DelayedStatistics",
    "DurableStatistics",
    "GroupStats",
    "LiveStatistics",
    "LocalStatistics",
    "QueueStatistics",
    "QueueStats",
    "SubscriptionStatistics",
    "TopicStats",
    "WorkerStatistics",
]


@final
@attrs.frozen
class SubscriptionStatistics:
    """A snapshot of one subscription's counters.

    ``received == delivered + dropped + buffered`` at every snapshot.

    .. versionadded:: 0.1
    """

    received: int
    """Events that reached this subscription."""
    delivered: int
    """Events handed to the consumer (the iterator or the handler)."""
    dropped: int
    """Events discarded by the overflow policy."""
    buffered: int
    """Events waiting in the buffer now."""
    buffer_size: int
    """Capacity of the buffer."""
    overflow: str
    """The overflow policy."""
    gaps: int
    """Gaps detected: runs of a publisher's events that never arrived."""
    missed: int
    """Events in those gaps."""
    reconnects: int
    """Times the push connection was re-established while subscribed (each may lose events)."""
    errors: int
    """Handler exceptions and payloads that could not be structured."""


@attrs.define
class ConsumerCounters:
    """The live counters of one consumer-group member: the one list of them.

    Mutable, incremented in place by the member (and the parts it holds, such as
    its claimer) as plain attribute increments; :class:`ConsumerStatistics` is
    its frozen snapshot with the same fields.
    """

    handled: int = 0
    """Events the handler completed (acked, or acked with their chained outputs)."""
    failed: int = 0
    """Handler invocations that raised."""
    retried: int = 0
    """Retries started (after a failure and its backoff)."""
    dead_lettered: int = 0
    """Events this member moved to the dead-letter stream (failures and undecodable)."""
    claimed: int = 0
    """Entries taken over from other (crashed, hung) members with ``XAUTOCLAIM``."""
    acked: int = 0
    """Entries ``XACK`` removed from the group's pending list."""
    ack_lost_ownership: int = 0
    """Acks that found nothing to ack: another member claimed and finished the
    entry first (Redis acks have no owner check), so it ran twice; or it was
    trimmed while held. A retried ack's shortfall is not counted (the attempt
    whose reply was lost may have acked it)."""
    lost_to_trim: int = 0
    """Pending entries trimmed from the stream before they were handled
    (``XAUTOCLAIM``'s deleted ids, or a re-read that found them gone)."""
    released: int = 0
    """Prefetched entries handed back unstarted on shutdown."""
    reads: int = 0
    """``XREADGROUP`` calls made (own pending list and new entries)."""
    deduplicated: int = 0
    """Events skipped because their id was already handled (``dedupe=``)."""
    group_recreated: int = 0
    """Times the group had vanished (``NOGROUP``) and was recreated."""


def _member_first(cls: type, fields: list[attrs.Attribute[Any]]) -> list[attrs.Attribute[Any]]:
    # attrs puts inherited fields first: keep group and consumer leading (repr, order).
    own = [f for f in fields if f.name in ("group", "consumer", "topic")]
    return own + [f for f in fields if f.name not in ("group", "consumer", "topic")]


@attrs.frozen(kw_only=True, field_transformer=_member_first)
class ConsumerStatistics(ConsumerCounters):
    """Counters of one consumer-group member since the bus opened.

    Its counter fields are those of :class:`ConsumerCounters` (declared once there).

    .. versionadded:: 0.2
    """

    group: str
    """The consumer group."""
    consumer: str
    """This member's consumer name."""
    topic: str = ""
    """The durable topic the group reads.

    .. versionadded:: 0.3
    """


@attrs.frozen
class GroupStats:
    """One consumer group of a durable topic, as Redis reports it.

    .. versionadded:: 0.2
    """

    name: str
    """The group name."""
    consumers: int
    """Consumer names the group knows (including idle and dead ones)."""
    pending: int
    """Entries delivered to a member and not yet acknowledged."""
    lag: int | None
    """Entries not yet delivered to any member (``None`` when Redis cannot tell:
    before 7.0, or after deletions in the middle of the stream)."""
    oldest_pending_age: float | None
    """Seconds since the oldest pending entry was published (Redis clock), ``None``
    if nothing is pending."""
    last_delivered_id: str
    """The newest entry id delivered to the group."""
    dead_letters: int
    """Events this group moved to the dead-letter stream (``purge`` resets it)."""


@attrs.frozen
class TopicStats:
    """A durable topic's stream and its consumer groups.

    .. versionadded:: 0.2
    """

    name: str
    """The topic name."""
    length: int
    """Entries in the stream."""
    first_id: str | None
    """Oldest entry id (``None``: empty)."""
    last_id: str | None
    """Newest entry id (``None``: empty)."""
    dead_letters: int
    """Entries in the dead-letter stream."""
    groups: tuple[GroupStats, ...]
    """Each consumer group, by name."""


@attrs.frozen
class QueueStats:
    """A work queue, read from Redis.

    .. versionadded:: 0.3
    """

    name: str
    """The queue name."""
    waiting: tuple[int, ...]
    """Jobs waiting, per priority level (level 0 first)."""
    scheduled: int
    """Jobs held for later (``delay=``, ``at=``, retries waiting out their backoff)."""
    processing: int
    """Jobs taken by a worker and not yet settled (in the workers' processing lists)."""
    workers: int
    """Workers whose heartbeat is current."""
    dead_letters: int
    """Entries in the queue's dead-letter stream."""
    oldest_waiting_age: float | None
    """Seconds since the job next in line of the oldest level was enqueued (Redis
    clock against the enqueuing host's; ``None``: nothing waits, or a raw job with
    no time)."""
    started: int
    """Jobs started, in total (every attempt counts)."""
    finished: int
    """Jobs that finished (acked), in total."""
    failed: int
    """Attempts that failed (retried or dead-lettered), in total."""
    started_per_s: float
    """Jobs started per second by the live workers, over their last minute."""
    finished_per_s: float
    """Jobs finished per second by the live workers, over their last minute."""
    failed_per_s: float
    """Failed attempts per second of the live workers, over their last minute."""

    @property
    def length(self) -> int:
        """Jobs waiting, all levels."""
        return sum(self.waiting)


@attrs.frozen
class BusStats:
    """What :meth:`EventBus.stats` returns.

    .. versionadded:: 0.2
    .. versionchanged:: 0.3 ``queues``.
    """

    topics: tuple[TopicStats, ...]
    """Each durable topic this bus knows, by name."""
    queues: tuple[QueueStats, ...] = ()
    """Each work queue this bus knows, by name."""

    def topic(self, name: str) -> TopicStats:
        """The stats of topic ``name`` (``KeyError`` if absent)."""
        for topic in self.topics:
            if topic.name == name:
                return topic
        raise KeyError(name)

    def queue(self, name: str) -> QueueStats:
        """The stats of queue ``name`` (``KeyError`` if absent)."""
        for queue in self.queues:
            if queue.name == name:
                return queue
        raise KeyError(name)


# -- the features' records (bus internals, not exported) ---------------------------


@attrs.frozen
class LocalStatistics:
    """Counters of the local feature."""

    published: int
    """Events published to local topics."""


@attrs.frozen
class LiveStatistics:
    """Counters of the live feature."""

    reconnects: int
    """Times the push connection was re-established since the bus opened."""
    push_client_id: int | None
    """Redis ``CLIENT ID`` of the push connection (``None`` before it is opened)."""
    decode_errors: int
    """Pushed messages that could not be decoded (logged and skipped)."""
    disconnects: dict[str, int]
    """Established push connections lost, by reason (``closed``, ``output_buffer``,
    ``ping_timeout``, ``error``; see ``EventBus.disconnects``)."""


@attrs.frozen
class DurableStatistics:
    """Counters of the durable feature."""

    consumers: tuple[ConsumerStatistics, ...]
    """Each running consumer-group member (handlers and iterators)."""
    trimmed: int
    """Entries removed by background trimming."""


@attrs.frozen
class DelayedStatistics:
    """Counters of this bus's delayed events and scheduler.

    .. versionadded:: 0.2
    """

    scheduled: int
    """Events this bus scheduled (``delay=`` or ``at=`` in the future)."""
    cancelled: int
    """Events this bus cancelled while they were pending."""
    released: int
    """Events this bus's scheduler released (others may have released the rest)."""
    release_errors: int
    """Release calls Redis refused (a topic's key of the wrong type, OOM...)."""
    scheduler_running: bool
    """Whether this bus runs a scheduler."""
    scheduler_leader: bool
    """Whether this bus's scheduler holds the schedulers' lease now: the one of its
    prefix that releases on time (the others stand by and release only what it
    leaves overdue by more than 0.1 s, and one takes over within 2.5 s if it dies).

    .. versionadded:: 0.2
    """


@attrs.frozen
class WorkerStatistics:
    """Counters of one queue worker of this bus.

    .. versionadded:: 0.3
    """

    queue: str
    worker: str
    """The worker id (its processing list's suffix)."""
    concurrency: int
    running: int
    """Jobs taken and not yet settled."""
    started: int
    finished: int
    failed: int
    """Attempts that failed (raised, timed out, nacked)."""
    retried: int
    dead_lettered: int
    reaped: int
    """Jobs of dead workers this worker put back."""
    orphans: int
    """Jobs found in this worker's processing list that it did not hold (a reply lost
    with its connection), put back."""
    lost_ownership: int
    """Jobs settled after a reaper had put them back (they may run twice). An ack
    sent again after its reply was lost does not count the jobs its first run
    removed."""


@attrs.frozen
class QueueStatistics:
    """Counters of the queue feature."""

    workers: tuple[WorkerStatistics, ...]
    enqueued: int
    duplicates: int
