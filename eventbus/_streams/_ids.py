"""Stream entry ids (order, arithmetic) and the shape of XREAD replies (RESP2 and RESP3)."""

from __future__ import annotations

from typing import Any

__all__ = ["id_key", "previous_id", "read_batches", "stream_ms"]


def id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of a stream id ``"<ms>-<seq>"`` (string order is wrong: "1-10" < "1-2")."""
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def stream_ms(entry_id: str) -> int:
    """The milliseconds part of a stream id: when Redis added the entry (its clock)."""
    return int(entry_id.partition("-")[0])


def previous_id(entry_id: str) -> str:
    """The largest id below ``entry_id``: reading *after* it starts *at* ``entry_id``."""
    ms, seq = id_key(entry_id)
    if seq > 0:
        return f"{ms}-{seq - 1}"
    return f"{ms - 1}-18446744073709551615" if ms > 0 else "0-0"


def read_batches(response: Any) -> list[tuple[Any, list[Any]]]:
    """``(stream key, entries)`` of an XREAD/XREADGROUP reply, RESP2 list or RESP3 dict."""
    if not response:
        return []
    if isinstance(response, dict):
        return [(key, value[0] if value else []) for key, value in response.items()]
    return [(key, entries) for key, entries in response]
