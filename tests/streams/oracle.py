"""The crash-test oracle: what happened, recorded outside the Redis under test.

Each worker process appends one JSON line per handler completion to its own
``O_APPEND`` file with a single ``os.write``, *before* the handler returns (so
before the bus acks). A SIGKILL can lose the ack but never the line: the line
says "this handling happened", whatever Redis later believes.

The checker compares those lines with what the publisher was told
(``published_ok``: every ``Receipt`` returned) and computes, exactly (RELIABILITY.md §6):

* ``lost = published_ok - handled - dead_lettered`` (ids);
* ``dup = handler completions - unique ids handled`` (with the count distribution);
* ``unexpected = handled - published_ok`` (phantom ids);
* ``corrupt``: lines whose payload failed its own sha256 or whose ``seq`` does not
  match what was published under that id.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson

__all__ = [
    "OracleTail",
    "Report",
    "append_line",
    "check",
    "make_payload",
    "open_oracle",
    "payload_ok",
    "read_oracle",
]


def make_payload(seq: int, body: str) -> dict[str, Any]:
    """A self-verifying event: the handler checks ``sha`` against ``body``."""
    return {"seq": seq, "body": body, "sha": hashlib.sha256(body.encode()).hexdigest()}


def payload_ok(event: Any) -> bool:
    try:
        return hashlib.sha256(event["body"].encode()).hexdigest() == event["sha"]
    except (TypeError, KeyError, AttributeError):
        return False


def open_oracle(path: str | os.PathLike[str]) -> int:
    """An append-only descriptor: each ``os.write`` lands whole at the end."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


def append_line(fd: int, record: Mapping[str, Any]) -> None:
    """One record, one ``write(2)``: a crash loses whole lines, never half of one."""
    data = orjson.dumps(record) + b"\n"
    written = os.write(fd, data)
    if written != len(data):  # a regular file under O_APPEND: never short in practice
        raise OSError(f"short oracle write: {written} of {len(data)} bytes")


class OracleTail:
    """Incremental reader of every ``*.jsonl`` oracle file in a directory.

    ``poll()`` reads only what was appended since the last call, so a test can
    watch progress every few ms without re-reading thousands of lines. A line
    without its newline yet (a write racing the read) is kept for the next poll.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        self.lines: list[dict[str, Any]] = []
        self.done: list[dict[str, Any]] = []
        self.handled_ids: set[str] = set()
        self.bad_lines = 0

    def poll(self) -> list[dict[str, Any]]:
        new: list[dict[str, Any]] = []
        for path in sorted(self.directory.glob("*.jsonl")):
            offset = self._offsets.get(path, 0)
            with path.open("rb") as f:
                f.seek(offset)
                chunk = f.read()
            if not chunk:
                continue
            self._offsets[path] = offset + len(chunk)
            data = self._partial.pop(path, b"") + chunk
            *complete, rest = data.split(b"\n")
            if rest:
                self._partial[path] = rest
            for raw in complete:
                try:
                    record = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    self.bad_lines += 1
                    continue
                new.append(record)
        for record in new:
            self.lines.append(record)
            if record.get("kind", "done") == "done":
                self.done.append(record)
                self.handled_ids.add(record["event_id"])
        return new

    @property
    def trailing_partial(self) -> int:
        """Files that end in half a line (only a torn write could leave one)."""
        return len(self._partial)


def read_oracle(directory: Path) -> OracleTail:
    tail = OracleTail(directory)
    tail.poll()
    return tail


@attrs.frozen
class Report:
    published: int
    handled_unique: int
    invocations: int
    dead_lettered: int
    lost: int
    dup: int
    unexpected: int
    corrupt: int
    lost_ids: tuple[str, ...]
    unexpected_ids: tuple[str, ...]
    distribution: dict[int, int]
    """times handled -> number of event ids."""
    per_worker: dict[str, int]

    def summary(self) -> str:
        return (
            f"published={self.published} handled_unique={self.handled_unique} "
            f"invocations={self.invocations} dlq={self.dead_lettered} lost={self.lost} "
            f"dup={self.dup} unexpected={self.unexpected} corrupt={self.corrupt} "
            f"distribution={dict(sorted(self.distribution.items()))} "
            f"per_worker={dict(sorted(self.per_worker.items()))}"
        )


def check(
    published: Mapping[str, int],
    done_lines: Iterable[Mapping[str, Any]],
    dead_lettered: Iterable[str] = (),
) -> Report:
    """Compare handler completions with ``published`` (event id -> seq)."""
    counts: Counter[str] = Counter()
    per_worker: Counter[str] = Counter()
    corrupt = 0
    for line in done_lines:
        event_id = line["event_id"]
        counts[event_id] += 1
        per_worker[line["worker"]] += 1
        expected_seq = published.get(event_id)
        if not line.get("ok", False) or (expected_seq is not None and expected_seq != line["seq"]):
            corrupt += 1
    dlq = set(dead_lettered)
    handled = set(counts)
    lost_ids = sorted(set(published) - handled - dlq)
    unexpected_ids = sorted(handled - set(published))
    invocations = sum(counts.values())
    distribution = Counter(counts.values())
    return Report(
        published=len(published),
        handled_unique=len(handled),
        invocations=invocations,
        dead_lettered=len(dlq),
        lost=len(lost_ids),
        dup=invocations - len(handled),
        unexpected=len(unexpected_ids),
        corrupt=corrupt,
        lost_ids=tuple(lost_ids[:20]),
        unexpected_ids=tuple(unexpected_ids[:20]),
        distribution=dict(distribution),
        per_worker=dict(per_worker),
    )
