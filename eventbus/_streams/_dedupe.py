"""Dedupe marks of a ``dedupe=`` group: skip an event whose id was handled already.

A mark is a plain string key per handled event id, set with the ack (in the
acker's pipeline, or after a chained publish) and expiring after the window. The
check before the handler runs is one ``EXISTS``. Marks are best effort by design:
they catch a producer's retried publish within the window, not a crash between
the handler and its ack (at least once stays at least once).
"""

from __future__ import annotations

from typing import Any

from .._keys import TopicKeys, dedupe_prefix

__all__ = ["Dedupe"]


class Dedupe:
    """The dedupe marks of one group on one topic, with a window of ``window`` seconds."""

    __slots__ = ("_client", "_prefix", "_ttl_ms")

    def __init__(self, client: Any, keys: TopicKeys, group: str, window: float) -> None:
        self._client = client
        self._prefix = dedupe_prefix(keys, group)
        self._ttl_ms = max(int(window * 1000), 1)

    async def seen(self, event_id: str) -> bool:
        """Whether event ``event_id`` was handled by this group within the window."""
        return bool(await self._client.exists(self._prefix + event_id))

    def mark_commands(self, event_ids: list[str]) -> list[tuple[Any, ...]]:
        """The commands that mark ``event_ids`` handled, for the acker's pipeline."""
        prefix = self._prefix
        ttl = self._ttl_ms
        return [("SET", prefix + event_id, 1, "PX", ttl) for event_id in event_ids]

    async def mark(self, event_id: str) -> None:
        """Mark event ``event_id`` handled (after its chained outputs were published)."""
        await self._client.set(self._prefix + event_id, 1, px=self._ttl_ms)
