"""Every Redis key and channel name eventbus uses, built in one place.

Layout (``prefix`` defaults to ``eb``; a topic name never contains ``:``, ``{`` or
``}``, so two different (prefix, topic) pairs can never build the same name)::

    {prefix}:{<topic>}               pub/sub channel of a live topic
    {prefix}:{<pattern>}             pub/sub pattern of a pattern subscription
    {prefix}:{<topic>}:stream        Redis Stream of a durable topic (its events)
    {prefix}:{<topic>}:dlq           dead-letter stream of a durable topic
    {prefix}:{<topic>}:dlq-count     hash: group -> events it dead-lettered
    {prefix}:{<topic>}:cursors       hash: group -> id below which its events were handled
    {prefix}:{<topic>}:seen:<group>:<event id>
                                     dedupe mark (``dedupe=`` groups), expires
    {prefix}:{<topic>}:lease:<len(group)>:<group>:<consumer>
                                     lease of a consumer name while its member runs
    {prefix}:{<topic>}:retry-at:<group>
                                     zset: entries of a group waiting out a long retry
                                     backoff, by retry time (ms)
    {prefix}:{<topic>}:delayed       zset: the topic's delayed events by due time (ms)
    {prefix}:{<topic>}:delayed-data  hash: event id -> the delayed event to release
    {prefix}:{<topic>}:delayed-done:<event id>
                                     an event released at once (its due time had
                                     passed), for 10 minutes: a retried call finds it
    {prefix}:{<topic>}:delayed-cancelled:<event id>
                                     string: the token of the cancel call that removed
                                     the event, for 10 minutes: that call, sent again
                                     after a lost reply, still answers True
    {prefix}:delayed                 zset: topics with delayed events by earliest due
    {prefix}:delayed:wake            channel: an earlier due time was scheduled
    {prefix}:delayed:lease           string: token of the scheduler that releases on
                                     time (the others stand by), with a TTL
    {prefix}:recurring               hash: schedule name -> definition (JSON)
    {prefix}:recurring:due           zset: schedule name by next occurrence (ms)
    {prefix}:recurring:last          hash: schedule name -> occurrence released last (ms)
    {prefix}:{<queue>}:q             list: a work queue's jobs of priority 0 (LPUSH in,
                                     taken from the right)
    {prefix}:{<queue>}:q:<level>     list: its jobs of priority ``level`` (1 and up)
    {prefix}:{<queue>}:q-active:<worker>
                                     list: the jobs one worker took and has not settled
    {prefix}:{<queue>}:q-workers     zset: worker id -> alive until (ms, server clock)
    {prefix}:{<queue>}:q-info        hash: worker id -> its recent rates (JSON)
    {prefix}:{<queue>}:q-ids         hash: job id -> 1, while the job waits or runs
    {prefix}:{<queue>}:q-stalled     hash: sha1 of a job -> times a dead worker held it
    {prefix}:{<queue>}:q-dead        stream: the queue's dead letters
    {prefix}:{<queue>}:q-rate        zset: start times of the rate limit's window
    {prefix}:{<queue>}:q-counts      hash: started, finished, failed, dead (totals)
    {prefix}:{<queue>}:q-delayed:<level>, ...:q-delayed-data:<level>
                                     the schedule of the level's delayed jobs (as a
                                     topic's), in the index as ``<queue>:q:<level>``
    {prefix}:{<queue>}:q-delayed-cancelled:<job id>
                                     a cancelled delayed job's tombstone (as a topic's)
    {prefix}:queues                  hash: queue name -> its settings (JSON)
    {prefix}:procs                   hash: ``<host>:<pid>`` -> that process's report of
                                     its local counters (JSON, with its time), written
                                     by buses that report (``report_every=``, serve())

The topic sits in a ``{hash tag}`` so every name of one topic maps to one Redis
Cluster slot. ``docs/wire-format.md`` is written from this module.
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from .errors import ConfigurationError

__all__ = [
    "DEFAULT_PREFIX",
    "NUDGE",
    "QueueKeys",
    "RecurringKeys",
    "ScheduleTarget",
    "TopicKeys",
    "channel_topic",
    "dedupe_prefix",
    "delayed_index",
    "delayed_lease",
    "delayed_wake",
    "live_channel",
    "live_pattern",
    "member_lease",
    "process_reports",
    "queue_keys",
    "queue_registry",
    "recurring_keys",
    "schedule_member",
    "schedule_target",
    "topic_keys",
    "validate_prefix",
]

DEFAULT_PREFIX: Final = "eb"
NUDGE: Final = "\x00eventbus:nudge"
"""Not a job: pushed onto a queue's level-0 list, where idle workers block, when a
job arrives on a more urgent level (no blocking command waits on several lists and
moves what it takes). Not JSON, so no producer's job can be mistaken for it; a
worker that takes it drops it."""
_PREFIX_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is a safe key prefix, else raise ``ConfigurationError``."""
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise ConfigurationError(
            f"invalid key prefix {prefix!r}: use 1-64 of [A-Za-z0-9._-], starting alphanumeric"
        )
    return prefix


def live_channel(prefix: str, topic: str) -> str:
    """The pub/sub channel of live topic ``topic``."""
    return f"{prefix}:{{{topic}}}"


def live_pattern(prefix: str, pattern: str) -> str:
    """The pub/sub pattern for a topic pattern such as ``prices.*``.

    Glob characters stay inside the hash tag, so ``prices.*`` can never match a
    channel of another prefix.
    """
    return f"{prefix}:{{{pattern}}}"


def channel_topic(prefix: str, channel: str) -> str | None:
    """The topic name of a live channel, or ``None`` if it is not one of ``prefix``'s."""
    head = f"{prefix}:{{"
    if channel.startswith(head) and channel.endswith("}"):
        return channel[len(head) : -1]
    return None


class TopicKeys(NamedTuple):
    """The keys of one durable topic; all share the topic's hash tag (one Cluster slot)."""

    stream: str
    dlq: str
    dlq_count: str
    cursors: str
    seen: str
    """Prefix of dedupe marks (build them with :func:`dedupe_prefix`)."""
    lease: str
    """Prefix of consumer-name leases (build them with :func:`member_lease`)."""
    retry_at: str
    """Prefix of a group's long-retry times (append the group name)."""
    delayed: str
    """Sorted set of the topic's delayed events (member event id, score due ms)."""
    delayed_data: str
    """Hash of the topic's delayed events (event id -> what to release)."""
    delayed_done: str
    """Prefix of the marks of events released at once (append the event id)."""
    delayed_cancelled: str
    """Prefix of the tombstones of cancelled delayed events (append the event id)."""


def topic_keys(prefix: str, topic: str) -> TopicKeys:
    """The Redis keys of durable topic ``topic``."""
    base = f"{prefix}:{{{topic}}}"
    return TopicKeys(
        stream=f"{base}:stream",
        dlq=f"{base}:dlq",
        dlq_count=f"{base}:dlq-count",
        cursors=f"{base}:cursors",
        seen=f"{base}:seen:",
        lease=f"{base}:lease:",
        retry_at=f"{base}:retry-at:",
        delayed=f"{base}:delayed",
        delayed_data=f"{base}:delayed-data",
        delayed_done=f"{base}:delayed-done:",
        delayed_cancelled=f"{base}:delayed-cancelled:",
    )


def delayed_index(prefix: str) -> str:
    """Sorted set of the topics holding delayed events, scored by their earliest due time."""
    return f"{prefix}:delayed"


class RecurringKeys(NamedTuple):
    """The keys of a bus prefix's recurring events."""

    definitions: str
    due: str
    last: str


def recurring_keys(prefix: str) -> RecurringKeys:
    """Where recurring events are declared, and when each fires next."""
    base = f"{prefix}:recurring"
    return RecurringKeys(definitions=base, due=f"{base}:due", last=f"{base}:last")


def delayed_wake(prefix: str) -> str:
    """Channel on which a scheduler is told that an earlier due time was scheduled."""
    return f"{prefix}:delayed:wake"


def delayed_lease(prefix: str) -> str:
    """The schedulers' lease: the token of the one that releases on time (the
    others release only what it leaves overdue), expiring unless renewed."""
    return f"{prefix}:delayed:lease"


def dedupe_prefix(keys: TopicKeys, group: str) -> str:
    """The dedupe marks of ``group`` on a durable topic: event ``event_id``'s mark is
    ``dedupe_prefix(keys, group) + event_id`` (``{prefix}:{<topic>}:seen:<group>:<event id>``).

    A prefix, not a whole key: a member builds it once and appends each event id."""
    return keys.seen + group + ":"


def member_lease(keys: TopicKeys, group: str, consumer: str) -> str:
    """The lease of consumer name ``consumer`` in ``group`` on a durable topic:
    ``{prefix}:{<topic>}:lease:<len(group)>:<group>:<consumer>``.

    Group and consumer names may contain ``:``; the group's length in front keeps
    the key one-to-one with the pair (``a:b``/``c`` and ``a``/``b:c`` differ)."""
    return f"{keys.lease}{len(group)}:{group}:{consumer}"


class QueueKeys:
    """The keys of one work queue; all share the queue's hash tag (one Cluster slot).

    A queue and a topic of the same name share the tag, never a key: every queue
    key ends in ``q`` or starts its suffix with ``q-``, which no topic key does."""

    __slots__ = (
        "base",
        "counts",
        "dead",
        "ids",
        "info",
        "levels",
        "name",
        "rate",
        "stalled",
        "workers",
    )

    def __init__(self, prefix: str, name: str, priorities: int) -> None:
        base = f"{prefix}:{{{name}}}"
        self.name = name
        self.base = base
        self.levels: tuple[str, ...] = (
            f"{base}:q",
            *(f"{base}:q:{level}" for level in range(1, priorities)),
        )
        """The list of each priority level, level 0 (the default, least urgent) first."""
        self.workers = f"{base}:q-workers"
        self.info = f"{base}:q-info"
        self.ids = f"{base}:q-ids"
        self.stalled = f"{base}:q-stalled"
        self.dead = f"{base}:q-dead"
        self.rate = f"{base}:q-rate"
        self.counts = f"{base}:q-counts"

    def processing(self, worker: str) -> str:
        """The processing list of worker ``worker``."""
        return f"{self.base}:q-active:{worker}"

    def acked(self, worker: str) -> str:
        """The last ack batch of worker ``worker`` (token and result; ``QUEUE_ACK``)."""
        return f"{self.base}:q-acked:{worker}"

    def delayed(self, level: int) -> tuple[str, str]:
        """The schedule (zset, data hash) of the level's delayed jobs."""
        return f"{self.base}:q-delayed:{level}", f"{self.base}:q-delayed-data:{level}"


def queue_keys(prefix: str, name: str, priorities: int) -> QueueKeys:
    """The Redis keys of work queue ``name`` with ``priorities`` levels."""
    return QueueKeys(prefix, name, priorities)


def queue_registry(prefix: str) -> str:
    """Hash of the queues known under ``prefix``: name -> settings (JSON)."""
    return f"{prefix}:queues"


def process_reports(prefix: str) -> str:
    """Hash of the processes' reports under ``prefix``: ``<host>:<pid>`` -> JSON
    (see ``eventbus._procs``)."""
    return f"{prefix}:procs"


def schedule_member(queue: str, level: int) -> str:
    """A queue level's member in the delayed index (a topic's member is its name;
    a topic name never holds ``:``)."""
    return f"{queue}:q:{level}"


class ScheduleTarget(NamedTuple):
    """Where one member of the delayed index releases its events."""

    delayed: str
    delayed_data: str
    destination: str
    """A topic's stream, or a queue level's list."""
    kind: str
    """``stream`` or ``list``: the type ``destination`` must have."""
    name: str
    """The topic or queue name."""
    nudge: str
    """A queue: its level-0 list (where idle workers block); a topic: ``destination``."""
    cancelled: str
    """Prefix of the tombstones a cancel leaves (append the event or job id)."""


def schedule_target(prefix: str, member: str) -> ScheduleTarget:
    """The keys of delayed-index member ``member`` (a topic, or a queue level)."""
    name, sep, level = member.partition(":q:")
    if not sep:
        keys = topic_keys(prefix, member)
        return ScheduleTarget(
            keys.delayed,
            keys.delayed_data,
            keys.stream,
            "stream",
            member,
            keys.stream,
            keys.delayed_cancelled,
        )
    n = int(level)
    qkeys = QueueKeys(prefix, name, n + 1)
    delayed, data = qkeys.delayed(n)
    return ScheduleTarget(
        delayed,
        data,
        qkeys.levels[n],
        "list",
        name,
        qkeys.levels[0],
        f"{qkeys.base}:q-delayed-cancelled:",
    )
