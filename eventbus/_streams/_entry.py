"""An entry a consumer-group member holds, and the reply shape it reads entries in.

Shared by the member (``_group``) and the parts it holds (its claimer, dead-letter
writer and chainer), which all take and hand back these objects.
"""

from __future__ import annotations

from typing import Any

from .._codec import field_map

__all__ = ["Work", "entries_as_sent"]


class Work:
    """One entry held by a member.

    ``fields``: as XREADGROUP sent them (``[name, value, ...]``), or as a dict
    (XCLAIM replies); :meth:`field_map` gives the dict either way.
    """

    __slots__ = ("count", "fields", "id")

    def __init__(self, entry_id: str, fields: list[bytes] | dict[bytes, bytes], count: int) -> None:
        self.id = entry_id
        self.fields = fields
        self.count = count

    def field_map(self) -> dict[bytes, bytes]:
        fields = self.fields
        if isinstance(fields, list):
            fields = self.fields = field_map(fields)
        return fields


def entries_as_sent(response: Any, **_options: Any) -> list[Any]:
    """The member's XREADGROUP reply callback: a one-stream reply's entries as Redis
    sent them, ``[id, [field, value, ...]]`` (RESP2 or RESP3), without redis-py's
    dict per entry (``Codec.decode_entry`` reads the usual two fields as they are)."""
    if not response:
        return []
    if isinstance(response, dict):  # RESP3: {stream: entries}
        return next(iter(response.values()))
    return response[0][1]  # type: ignore[no-any-return]  # RESP2: [[stream, entries]]
