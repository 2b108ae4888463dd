"""docs/wire-format.md is the contract: every example marked as a test vector is read here.

A vector is an HTML comment ``<!-- vector: NAME MODE -->`` followed by two fenced
blocks: the example (a JSON message of a live topic, or a ``redis-cli XADD`` of a
stream entry) and what a reader gets from it (or ``{"error": reason}``).

* ``reads``: the example decodes to the second block;
* ``writes``: that too, and eventbus, given the second block, writes the example
  byte for byte;
* ``refuses``: the example is refused with that reason.

Stream vectors are also written with ``XADD`` to a real redis-server and read back
by a consumer group, so the page holds against Redis, not only against the codec.
"""

from __future__ import annotations

import base64
import re
import shlex
from pathlib import Path
from typing import Any

import orjson
import pytest

from eventbus import Delivery, EventBus, Limits, Topic
from eventbus._codec import Codec
from eventbus._envelope import Envelope
from eventbus.errors import DecodeError

from .helpers import control_client, wait_until

PAGE = Path(__file__).resolve().parent.parent / "docs" / "wire-format.md"
_VECTOR = re.compile(
    r"<!-- vector: (?P<name>[\w-]+) (?P<mode>reads|writes|refuses) -->\s*"
    r"```(?P<lang>\w+)\n(?P<example>.*?)\n```.*?```json\n(?P<expected>.*?)\n```",
    re.DOTALL,
)


def _vectors() -> list[Any]:
    found = [m.groupdict() for m in _VECTOR.finditer(PAGE.read_text())]
    names = [v["name"] for v in found]
    assert len(names) == len(set(names)), "two vectors share a name"
    assert PAGE.read_text().count("<!-- vector:") == len(found), "a vector did not parse"
    return [pytest.param(v, id=v["name"]) for v in found]


VECTORS = _vectors()
CODEC = Codec(None, Limits())


def _entry_fields(example: str) -> tuple[str, list[bytes]]:
    """(stream key, flat fields) of a ``redis-cli XADD <key> '*' <fields>`` line."""
    argv = shlex.split(example)
    assert argv[:2] == ["redis-cli", "XADD"], example
    assert argv[3] == "*", example
    return argv[2], [a.encode() for a in argv[4:]]


def _decode(vector: dict[str, str], stream_id: str) -> Envelope:
    if vector["lang"] == "json":
        return CODEC.decode("t", vector["example"].encode())
    _key, fields = _entry_fields(vector["example"])
    return CODEC.decode_entry("t", stream_id, fields)


def _expected_data(expected: dict[str, Any]) -> Any:
    return expected["data_text"].encode() if "data_text" in expected else expected["data"]


def _check(env: Envelope, expected: dict[str, Any]) -> None:
    got = {
        "id": env.id,
        "publisher": env.publisher,
        "seq": env.seq,
        "published_at_ms": env.published_ms,
        "headers": env.headers,
        "content_type": env.content_type,
        "data": env.data,
        "cause": env.cause,
        "corr": env.corr,
        "due_ms": env.due_ms,
    }
    want = {
        "id": expected["id"],
        "publisher": expected["publisher"],
        "seq": expected["seq"],
        "published_at_ms": expected["published_at_ms"],
        "headers": expected["headers"],
        "content_type": expected["content_type"],
        "data": _expected_data(expected),
        "cause": expected.get("cause", ""),
        "corr": expected.get("corr", ""),
        "due_ms": expected.get("due_ms"),
    }
    assert got == want


@pytest.mark.parametrize("vector", VECTORS)
def test_the_page_example_decodes_as_the_page_says(vector: dict[str, str]) -> None:
    expected = orjson.loads(vector["expected"])
    stream_id = expected.get("stream_id", "1767225600000-0")
    if vector["mode"] == "refuses":
        with pytest.raises(DecodeError) as info:
            _decode(vector, stream_id)
        assert info.value.reason == expected["error"]
        return
    _check(_decode(vector, stream_id), expected)


@pytest.mark.parametrize("vector", [v for v in VECTORS if v.values[0]["mode"] == "writes"])
def test_eventbus_writes_exactly_the_page_example(vector: dict[str, str]) -> None:
    expected = orjson.loads(vector["expected"])
    data = _expected_data(expected)
    common: dict[str, Any] = {
        "event_id": expected["id"],
        "publisher": expected["publisher"],
        "seq": expected["seq"],
        "headers": expected["headers"],
        "cause": expected.get("cause", ""),
        "corr": expected.get("corr", ""),
    }
    if vector["lang"] == "json":
        raw, _ms = CODEC.encode("t", data, **common, published_ms=expected["published_at_ms"])
        assert raw == vector["example"].encode()
    else:
        _key, fields = _entry_fields(vector["example"])
        assert CODEC.encode_entry("t", data, **common) == fields


def test_every_field_of_the_tables_is_exercised_by_a_vector() -> None:
    """Each field the two tables list appears in at least one vector's example."""
    text = PAGE.read_text()
    envelope = {"eventbus", "data", "id", "pub", "seq", "ts", "ct", "h", "due"}
    entry = {"i", "p", "s", "h", "c", "d", "b", "v", "t"}
    examples = [v.values[0] for v in VECTORS]
    in_json = set()
    in_entries = set()
    for v in examples:
        if v["lang"] == "json":
            doc = orjson.loads(v["example"])
            in_json |= set(doc) if isinstance(doc, dict) else set()
        else:
            _key, fields = _entry_fields(v["example"])
            in_entries |= {f.decode() for f in fields[0::2]}
    assert envelope <= in_json, envelope - in_json
    assert entry <= in_entries, entry - in_entries
    for name in envelope | entry:
        assert f"| `{name}` |" in text, f"field {name!r} missing from a table"


async def test_stream_vectors_hold_against_redis(redis_url: str) -> None:
    """Every stream example, written with XADD as the page shows, reaches a typed-free
    consumer group as the page says; refused ones are dead-lettered with their reason."""
    entries = [v.values[0] for v in VECTORS if v.values[0]["lang"] == "sh"]
    bus = EventBus(redis_url, prefix="wirevec")
    topic = Topic("orders", durable=True)
    got: dict[str, tuple[Any, Delivery]] = {}

    @bus.on(topic, group="vectors", start="earliest")
    async def handle(event: object, delivery: Delivery) -> None:
        got[delivery.stream_id] = (event, delivery)

    ctl = control_client(redis_url)
    raw = __import__("redis.asyncio", fromlist=["Redis"]).Redis.from_url(redis_url)
    try:
        written: dict[str, dict[str, Any]] = {}
        async with bus:
            for v in entries:
                _key, fields = _entry_fields(v["example"])
                pairs = dict(zip(fields[0::2], fields[1::2], strict=True))
                stream_id = (await raw.xadd("wirevec:{orders}:stream", pairs)).decode()
                written[stream_id] = {**v, "expected": orjson.loads(v["expected"])}
            refused = [s for s, v in written.items() if v["mode"] == "refuses"]
            accepted = [s for s in written if s not in refused]
            try:
                await wait_until(lambda: set(accepted) <= set(got), timeout=10)
            except TimeoutError:
                missing = [written[s]["name"] for s in accepted if s not in got]
                pytest.fail(f"not handled: {missing}; got {len(got)}")

            async def all_dead_lettered() -> bool:
                return int(await ctl.xlen("wirevec:{orders}:dlq")) == len(refused)

            await wait_until(all_dead_lettered, timeout=10)
            dead = await bus.dead_letters(topic)
        for stream_id in accepted:
            event, delivery = got[stream_id]
            expected = written[stream_id]["expected"]
            assert delivery.id == expected["id"]
            assert delivery.publisher == expected["publisher"]
            assert delivery.seq == expected["seq"]
            assert delivery.headers == expected["headers"]
            assert event == _expected_data(expected)
            ms = expected["published_at_ms"]
            if ms is not None and written[stream_id]["name"].startswith("entry-v2"):
                # Version 2: the time is the stream id's (Redis's clock).
                assert delivery.published_at is not None
                assert int(delivery.published_at.timestamp() * 1000) == int(stream_id.split("-")[0])
        reasons = {d.original_id: d.reason for d in dead}
        for stream_id in refused:
            assert reasons[stream_id] == written[stream_id]["expected"]["error"]
    finally:
        await raw.aclose()
        await ctl.aclose()


def test_an_i_field_is_the_ids_bytes_in_base64url() -> None:
    # The rule the page gives to readers in other languages.
    event_id = "5b1f0c9e2d7a4e1f8c3b6a9d0e2f4a61"
    name, value = CODEC.encode_entry("t", 1, event_id=event_id, publisher="p", seq=1, headers={})[
        :2
    ]
    assert name == b"i"
    assert base64.urlsafe_b64decode(value + b"==").hex() == event_id
