"""What durable topics read back from Redis: a topic's statistics (the records
are in ``_stats``), and the server's eviction policy."""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions as rex

from .._keys import TopicKeys
from .._stats import GroupStats, TopicStats

__all__ = ["topic_stats", "warn_if_evicting"]

logger = logging.getLogger("eventbus")


async def warn_if_evicting(client: Any) -> str | None:
    """Log a WARNING if Redis may evict keys when full; return its ``maxmemory-policy``.

    One ``INFO memory`` (not ``CONFIG GET``, which least-privilege users and managed
    services refuse). An eviction policy deletes durable data with no error to
    anyone: ``allkeys-*`` whole streams (events, and with them the consumer groups
    and their pending lists), dead letters and cursors; ``volatile-*`` only keys that
    expire, which are the ``dedupe=`` marks. A refused or failed ``INFO`` is not an
    error: the check is skipped (logged at DEBUG).
    """
    try:
        info = await client.info("memory")
    except (rex.RedisError, OSError) as exc:
        logger.debug("maxmemory-policy not checked: INFO memory failed: %s", exc)
        return None
    policy = info.get("maxmemory_policy")
    if not isinstance(policy, str) or policy == "noeviction":
        return None if policy is None else str(policy)
    maxmemory = int(info.get("maxmemory", 0) or 0)
    limit = (
        f"maxmemory is {maxmemory} bytes"
        if maxmemory
        else "maxmemory is 0 (no limit) now, so nothing is evicted until one is set"
    )
    if policy.startswith("volatile"):
        effect = (
            "it evicts keys that expire, which are the dedupe= marks: duplicates are then"
            " no longer skipped (streams do not expire and are kept)"
        )
    else:
        effect = (
            "it can delete whole streams of durable topics (their events, consumer groups"
            " and pending lists), dead letters and cursors, with no error to anyone"
        )
    logger.warning(
        "Redis maxmemory-policy is %r (%s): when memory is full %s. Durable topics need"
        " maxmemory-policy noeviction (a full Redis then refuses publishes with BackendOOM)",
        policy,
        limit,
        effect,
    )
    return policy


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def topic_stats(client: Any, name: str, keys: TopicKeys) -> TopicStats:
    async with client.pipeline(transaction=False) as pipe:
        pipe.xlen(keys.stream)
        pipe.xrange(keys.stream, count=1)
        pipe.xrevrange(keys.stream, count=1)
        pipe.xlen(keys.dlq)
        pipe.hgetall(keys.dlq_count)
        pipe.time()
        length, first, last, dead, dead_counts, now = await pipe.execute()
    now_ms = int(now[0]) * 1000 + int(now[1]) // 1000
    groups: list[GroupStats] = []
    if length or first or dead:
        try:
            infos = await client.xinfo_groups(keys.stream)
        except Exception:  # no stream: no groups
            infos = []
        counts = {_decode(k): int(v) for k, v in (dead_counts or {}).items()}
        for info in infos:
            group = _decode(info["name"])
            oldest: float | None = None
            if int(info["pending"]):
                summary = await client.xpending(keys.stream, group)
                if summary["min"] is not None:  # None: acked since XINFO
                    oldest_ms = int(_decode(summary["min"]).split("-")[0])
                    oldest = max(now_ms - oldest_ms, 0) / 1000
            lag = info.get("lag")
            groups.append(
                GroupStats(
                    name=group,
                    consumers=int(info["consumers"]),
                    pending=int(info["pending"]),
                    lag=None if lag is None else int(lag),
                    oldest_pending_age=oldest,
                    last_delivered_id=_decode(info["last-delivered-id"]),
                    dead_letters=counts.get(group, 0),
                )
            )
    return TopicStats(
        name=name,
        length=int(length),
        first_id=first[0][0].decode() if first else None,
        last_id=last[0][0].decode() if last else None,
        dead_letters=int(dead),
        groups=tuple(sorted(groups, key=lambda g: g.name)),
    )
