"""Delayed events still pending, read back from Redis (read-only: the CLI's
``eventbus scheduled list``).

What a topic holds (``_keys``): ``{prefix}:{<topic>}:delayed``, event ids scored by
due time (ms), and ``...:delayed-data``, each id's event encoded as the release
will write it (see ``DelayedFeature._blob``): ``l`` and a live envelope, or ``d``
and length-prefixed items (the topic's ``MAXLEN`` or nothing, then the stream
entry's fields, name and value in turn). ``{prefix}:delayed`` indexes the topics
that hold any.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Final

import attrs

from .._codec import Codec
from .._keys import delayed_index, topic_keys
from ..errors import DecodeError

__all__ = ["PendingDelayed", "delayed_topics", "pending_delayed"]

_PAGE: Final = 500


@attrs.frozen
class PendingDelayed:
    """One delayed event not yet released."""

    id: str
    """The event id (what ``EventBus.cancel`` takes)."""
    topic: str
    due: datetime
    """When it is due (UTC, by the Redis server's clock)."""
    durable: bool
    """Whether it will be released to a stream (else published live)."""
    headers: dict[str, str]
    content_type: str
    data: Any
    """The event's JSON value (or bytes); ``None`` when it could not be decoded."""
    size: int
    """Bytes held for it."""


def _split(blob: bytes) -> list[bytes]:
    """The length-prefixed items of a durable blob (after its ``d``)."""
    items: list[bytes] = []
    pos = 1
    while pos < len(blob):
        colon = blob.index(b":", pos)
        length = int(blob[pos:colon])
        items.append(blob[colon + 1 : colon + 1 + length])
        pos = colon + 1 + length
    return items


def _decode(codec: Codec, topic: str, blob: bytes) -> tuple[bool, dict[str, str], str, Any]:
    durable = blob[:1] == b"d"
    try:
        if durable:
            env = codec.decode_entry(topic, "0-0", _split(blob)[1:])
        else:
            env = codec.decode(topic, blob[1:])
    except (DecodeError, ValueError):
        return durable, {}, "", None
    return durable, env.headers, env.content_type, env.data


async def delayed_topics(client: Any, prefix: str) -> list[str]:
    """The topics holding delayed events, earliest due first."""
    names = await client.zrange(delayed_index(prefix), 0, -1)
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


async def pending_delayed(
    client: Any, prefix: str, codec: Codec, topic: str, *, count: int
) -> list[PendingDelayed]:
    """Up to ``count`` pending delayed events of ``topic``, earliest due first."""
    keys = topic_keys(prefix, topic)
    found: list[PendingDelayed] = []
    start = 0
    while len(found) < count:
        page = await client.zrange(
            keys.delayed, start, start + min(_PAGE, count - len(found)) - 1, withscores=True
        )
        if not page:
            break
        ids = [m.decode() if isinstance(m, bytes) else str(m) for m, _ in page]
        blobs = await client.hmget(keys.delayed_data, ids)
        for event_id, (_m, score), blob in zip(ids, page, blobs, strict=True):
            if blob is None:
                continue  # released between the two reads
            durable, headers, content_type, data = _decode(codec, topic, blob)
            found.append(
                PendingDelayed(
                    id=event_id,
                    topic=topic,
                    due=datetime.fromtimestamp(score / 1000, tz=timezone.utc),
                    durable=durable,
                    headers=headers,
                    content_type=content_type,
                    data=data,
                    size=len(blob),
                )
            )
        start += len(page)
    return found
