"""Codec round trips (hypothesis over generated attrs classes) and decode errors."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from eventbus import Limits, make_converter
from eventbus._codec import Codec
from eventbus.errors import DecodeError, EncodeError, PayloadTooLarge

FIELD_TYPES: dict[Any, st.SearchStrategy[Any]] = {
    int: st.integers(min_value=-(2**63), max_value=2**63 - 1),
    str: st.text(),
    float: st.floats(allow_nan=False, allow_infinity=False),
    bool: st.booleans(),
    bytes: st.binary(max_size=64),
    list[int]: st.lists(st.integers(min_value=-1000, max_value=1000), max_size=5),
    dict[str, str]: st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
    datetime: st.datetimes(timezones=st.just(timezone.utc)),
    str | None: st.none() | st.text(max_size=5),
}


@st.composite
def attrs_classes_and_values(draw: st.DrawFn, depth: int = 0) -> tuple[type, Any]:
    n = draw(st.integers(min_value=0, max_value=6))
    types = [draw(st.sampled_from(list(FIELD_TYPES))) for _ in range(n)]
    fields = {f"f{i}": attrs.field(type=tp) for i, tp in enumerate(types)}
    values = {f"f{i}": draw(FIELD_TYPES[tp]) for i, tp in enumerate(types)}
    if depth < 1 and draw(st.booleans()):
        inner_cls, inner_value = draw(attrs_classes_and_values(depth=depth + 1))
        fields["nested"] = attrs.field(type=inner_cls)
        values["nested"] = inner_value
    frozen = draw(st.booleans())
    cls = attrs.make_class(f"Event{depth}", fields, frozen=frozen)
    return cls, cls(**values)


def _codec() -> Codec:
    return Codec(make_converter(), Limits())


@given(attrs_classes_and_values())
def test_attrs_events_round_trip(case: tuple[type, Any]) -> None:
    cls, event = case
    codec = _codec()
    raw, _ = codec.encode("t", event, event_id="id1", publisher="p", seq=1, headers={"k": "v"})
    env = codec.decode("t", raw)
    assert (env.id, env.publisher, env.seq, env.headers) == ("id1", "p", 1, {"k": "v"})
    assert codec.structure(env, cls) == event
    # Structured once per (message, type): the same object comes back.
    assert codec.structure(env, cls) is codec.structure(env, cls)


@dataclasses.dataclass(frozen=True)
class Order:
    id: int
    items: list[str]


@given(st.integers(-(2**63), 2**63 - 1), st.lists(st.text(max_size=10), max_size=5))
def test_dataclass_events_round_trip(order_id: int, items: list[str]) -> None:
    codec = _codec()
    raw, _ = codec.encode(
        "t", Order(order_id, items), event_id="x", publisher="p", seq=1, headers={}
    )
    assert codec.structure(codec.decode("t", raw), Order) == Order(order_id, items)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=10,
    )
)
def test_plain_json_values_round_trip(value: Any) -> None:
    codec = _codec()
    raw, _ = codec.encode("t", value, event_id="x", publisher="p", seq=1, headers={})
    assert codec.structure(codec.decode("t", raw), object) == value


@given(st.binary(max_size=256))
def test_bytes_round_trip(value: bytes) -> None:
    codec = _codec()
    raw, _ = codec.encode("t", value, event_id="x", publisher="p", seq=1, headers={})
    assert codec.structure(codec.decode("t", raw), bytes) == value


def test_bytes_fields_use_standard_base64() -> None:
    @attrs.frozen
    class Blob:
        data: bytes

    assert make_converter().unstructure(Blob(b"\x00\xff")) == {"data": "AP8="}


def test_validation_error_names_the_field_path() -> None:
    @attrs.frozen
    class Payment:
        amount: int

    codec = _codec()
    env = codec.decode("pay", b'{"amount": "lots"}')
    with pytest.raises(DecodeError) as info:
        codec.structure(env, Payment)
    assert info.value.reason == "validation_error"
    assert "$.amount" in str(info.value)
    assert "pay" in str(info.value)
    # The failure is cached too: a hundred subscribers do not retry it.
    with pytest.raises(DecodeError) as again:
        codec.structure(env, Payment)
    assert again.value is info.value


_ENVELOPE = b'{"eventbus": 1, "id": "a", "pub": "p", "ts": 1, %b}'


@pytest.mark.parametrize(
    "raw",
    [
        b'{"eventbus": 1, "id": "a"}',  # missing fields
        _ENVELOPE % b'"seq": "1", "ct": "application/json", "data": 1',  # seq not an int
        _ENVELOPE % b'"seq": 1, "ct": "text/x-pickle", "data": 1',  # unknown content type
        _ENVELOPE % b'"seq": 1, "ct": "application/octet-stream", "data": "!!"',  # bad base64
    ],
)
def test_malformed_envelopes_raise_decode_error(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        _codec().decode("t", raw)
    assert info.value.reason == "decode_error"


_JSON_SCALARS = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=4) | st.floats()
)
_ANY_JSON = st.recursive(
    _JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=2) | st.dictionaries(st.text(max_size=3), children, max_size=2)
    ),
    max_leaves=4,
)


@st.composite
def envelope_documents(draw: st.DrawFn) -> dict[str, Any]:
    """Envelopes, mostly well formed, with fields missing, mistyped or unusual."""
    doc: dict[str, Any] = {
        "eventbus": 1,
        "id": "e1",
        "pub": "p",
        "seq": 3,
        "ts": 1_700_000_000_000,
        "ct": "application/json",
        "data": draw(_ANY_JSON),
    }
    optional = {"h": {"k": "v"}, "cause": "c1", "corr": "c0"}
    for name in draw(st.sets(st.sampled_from(sorted(optional)))):
        doc[name] = optional[name]
    for name in draw(st.sets(st.sampled_from([*doc, "h", "cause", "corr"]), max_size=2)):
        if draw(st.booleans()):
            doc.pop(name, None)
        else:
            doc[name] = draw(
                _ANY_JSON | st.sampled_from([1, 2, "application/octet-stream", "AP8=", {"k": 1}])
            )
    return doc


def _outcome(decode: Any) -> tuple[Any, ...]:
    try:
        env = decode()
    except DecodeError as exc:
        return ("refused", exc.reason, exc.event_id)
    fields = attrs.asdict(env, recurse=False)
    del fields["_delivery"]
    return ("accepted", fields)


@given(envelope_documents())
def test_fast_and_full_envelope_paths_agree(doc: dict[str, Any]) -> None:
    """Received envelopes are parsed by msgspec first; anything it refuses goes
    through the full path. Both must accept and refuse the same documents."""
    codec = _codec()
    raw = orjson.dumps(doc)
    full = _outcome(lambda: codec._from_doc("t", orjson.loads(raw)))
    if type(doc.get("eventbus")) is int and doc["eventbus"] == 1:  # true == 1, but is no version
        assert _outcome(lambda: codec.decode("t", raw)) == full
        entry = {b"id": b"e1", b"env": raw}
        full_entry = _outcome(lambda: codec._from_doc("t", orjson.loads(raw)))
        if full_entry[0] == "accepted":
            full_entry[1]["stream_id"] = "1-1"
        assert _outcome(lambda: codec.decode_entry("t", "1-1", entry)) == full_entry


def test_usual_envelopes_take_the_fast_path() -> None:
    codec = _codec()
    raw, _ = codec.encode(
        "t", {"a": 1}, event_id="e", publisher="p", seq=1, headers={"k": "v"}, cause="c"
    )
    env = Codec._decode_fast("t", raw, "")
    assert env is not None
    assert (env.id, env.headers, env.cause, env.corr, env.data) == (
        "e",
        {"k": "v"},
        "c",
        "c",
        {"a": 1},
    )


@pytest.mark.parametrize(
    "raw",
    [
        _ENVELOPE % b'"seq": 1, "ct": "application/json", "data": "\xff"',  # not UTF-8
        _ENVELOPE % (b'"seq": 1, "ct": "application/json", "data": ' + b"[" * 5000),  # too deep
    ],
)
def test_envelopes_no_parser_takes_are_refused_with_a_reason(raw: bytes) -> None:
    codec = _codec()
    # A live message that is not JSON is a bare binary payload ...
    assert codec.decode("t", raw).data == raw
    # ... a stream entry whose envelope is not JSON is dead-lettered with the reason.
    with pytest.raises(DecodeError, match="not JSON") as info:
        codec.decode_entry("t", "1-1", [b"id", b"a", b"env", raw])
    assert info.value.reason == "decode_error"


def test_non_json_bytes_are_a_bare_binary_payload() -> None:
    env = _codec().decode("t", b"\x80\x04not json")
    assert env.data == b"\x80\x04not json"
    assert env.seq == 0


def test_oversized_inbound_is_refused_without_decoding() -> None:
    codec = Codec(make_converter(), Limits(max_payload_bytes=10))
    with pytest.raises(PayloadTooLarge):
        codec.decode("t", b'"' + b"x" * 20 + b'"')


def test_unencodable_event_raises_encode_error() -> None:
    with pytest.raises(EncodeError, match="topic 't'"):
        _codec().encode("t", {1, object()}, event_id="x", publisher="p", seq=1, headers={})


def test_forbid_extra_keys_is_configurable() -> None:
    @attrs.frozen
    class Small:
        a: int

    strict = Codec(make_converter(forbid_extra_keys=True), Limits())
    lenient = _codec()
    raw = b'{"a": 1, "b": 2}'
    assert lenient.structure(lenient.decode("t", raw), Small) == Small(1)
    with pytest.raises(DecodeError):
        strict.structure(strict.decode("t", raw), Small)
