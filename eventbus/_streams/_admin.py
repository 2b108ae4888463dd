"""Statistics of a durable topic, read from Redis (the records are in ``_stats``)."""

from __future__ import annotations

from typing import Any

from .._keys import TopicKeys
from .._stats import GroupStats, TopicStats

__all__ = ["topic_stats"]


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
