"""The wire codec: cattrs structuring (preconf style) plus the JSON envelope.

``make_converter()`` gives the converter eventbus uses by default;
``configure_converter()`` applies eventbus's wire rules to a converter of your
own, so you can register hooks first and keep them::

    conv = cattrs.preconf.orjson.make_converter()
    conv.register_structure_hook(Money, parse_money)
    eventbus.configure_converter(conv)
    bus = EventBus(url, converter=conv)

``Codec`` turns events into what goes on the wire and back: the JSON envelope of
live topics (version 1) and the fields of stream entries (version 2, and version 1
still read), as docs/wire-format.md describes them.

Why one module past 600 lines: it is the wire format, one concept, and both
directions of both encodings stay together so that a reader and its writer
cannot drift apart (tests/test_wire_format.py holds them to the page). Most of
its length is the decoders' checks, each naming what is wrong with a message.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec
import orjson

from ._config import Limits
from ._envelope import CONTENT_BYTES, CONTENT_JSON, WIRE_VERSION, Envelope
from .errors import ConfigurationError, DecodeError, EncodeError, PayloadTooLarge

if TYPE_CHECKING:  # cattrs is imported by the functions that use it (import time)
    import cattrs

__all__ = ["Codec", "configure_converter", "make_converter"]

_MAX_HEADER_LEN: Final = 8192
_MISSING: Final = object()

# Stream entries of wire version 2 (docs/wire-format.md, "Stream entries"): one short
# field per piece of metadata, the payload as it is, nothing said twice.
F_ID: Final = b"i"
"""The event id's 16 bytes as 22 characters of base64url (no padding)."""
F_ID_TEXT: Final = b"id"
"""An event id that is not 32 lowercase hex digits, as it is (and version 1's id)."""
F_PUB: Final = b"p"
F_SEQ: Final = b"s"
F_HEADERS: Final = b"h"
F_CAUSE: Final = b"c"
F_CORR: Final = b"r"
F_JSON: Final = b"d"
F_BYTES: Final = b"b"
F_VERSION: Final = b"v"
"""Absent in version 2; a later version that older readers must not misread sets it."""
F_DUE: Final = b"t"
"""A delayed event's due time (epoch ms, Redis server clock), added at release."""
F_ENV: Final = b"env"
F_DATA: Final = b"data"
ENTRY_VERSION: Final = 2
_B64_ALT: Final = b"-_"
_URLSAFE: Final = bytes.maketrans(b"+/", _B64_ALT)
_b2a: Final = binascii.b2a_base64


def id_field(event_id: str) -> tuple[bytes, bytes]:
    """The (name, value) of ``event_id`` in a version 2 entry."""
    if len(event_id) == 32:
        try:
            raw = bytes.fromhex(event_id)
        except ValueError:
            raw = b""
        if raw and raw.hex() == event_id:
            return F_ID, _b2a(raw, newline=False)[:22].translate(_URLSAFE)
    return F_ID_TEXT, event_id.encode()


def id_of(value: bytes) -> str:
    """The event id of an ``i`` field (the inverse of :func:`id_field`)."""
    if len(value) != 22:
        raise ValueError(f"field 'i' must be 22 base64url characters, got {len(value)}")
    return base64.b64decode(value + b"==", altchars=_B64_ALT, validate=True).hex()


_JSON_NATIVE: Final = frozenset({dict, list, str, int, float, bool, type(None)})


class _WireV1(msgspec.Struct, gc=False):
    """A well-formed eventbus envelope of wire version 1 (docs/wire-format.md).

    msgspec parses and type-checks it in one pass in C: 3x faster than
    ``orjson.loads`` followed by the same checks in Python, which is most of
    what a consumer spends per event. Whatever this refuses (another version, a
    bare payload, a field of the wrong type, bytes content) takes the full path,
    ``Codec._from_doc``, which decides and names the reason: both paths accept
    and refuse the same envelopes (tests/test_codec.py compares them). One
    difference in what they return: an integer in ``data`` beyond 64 bits stays
    exact here, where orjson makes it a float (eventbus never writes one).
    """

    eventbus: int
    data: Any
    id: str = ""
    pub: str = ""
    seq: Annotated[int, msgspec.Meta(ge=0)] = 0
    ts: int | None = None
    ct: str = CONTENT_JSON
    h: dict[str, str] = {}
    cause: str = ""
    corr: str = ""
    due: int | None = None
    att: Annotated[int, msgspec.Meta(ge=0)] = 0


_decode_wire: Final = msgspec.json.Decoder(_WireV1).decode
_loads: Final = msgspec.json.Decoder().decode
_dumps: Final = orjson.dumps
"""JSON to Python values, integers of any size kept exact."""


def configure_converter(converter: cattrs.Converter) -> None:
    """Apply eventbus's wire rules to ``converter``.

    * everything the cattrs orjson preconf does (datetimes as RFC 3339 strings,
      sets as lists, enums by value, mapping keys as strings);
    * ``bytes`` fields as standard base64 strings (base85 in the plain preconf,
      which few non-Python clients decode);
    * integers must fit in 64 bits (orjson; most JSON readers use doubles or int64);
    * structuring errors carry the path of the failing field
      (``detailed_validation``), reported as ``$.amount: ...``.
    """
    from cattrs.preconf.orjson import configure_converter as _configure_orjson

    _configure_orjson(converter)
    converter.register_unstructure_hook(bytes, lambda v: base64.b64encode(v).decode("ascii"))
    converter.register_structure_hook(bytes, lambda v, _: base64.b64decode(v, validate=True))


def make_converter(*, forbid_extra_keys: bool = False) -> cattrs.Converter:
    """A new converter configured with :func:`configure_converter`.

    :param forbid_extra_keys: refuse events carrying fields the class does not
        declare (default: ignore them, so newer publishers can add fields).
    """
    import cattrs

    converter = cattrs.Converter(detailed_validation=True, forbid_extra_keys=forbid_extra_keys)
    configure_converter(converter)
    return converter


def _error_path(exc: BaseException) -> str:
    """Flatten a cattrs error group into ``$.field: message`` lines."""
    import cattrs

    if isinstance(exc, cattrs.ClassValidationError | cattrs.IterableValidationError):
        return "; ".join(cattrs.transform_error(exc, path="$"))
    return f"{type(exc).__name__}: {exc}"


def field_map(flat: list[bytes]) -> dict[bytes, bytes]:
    """A stream entry's ``[name, value, ...]``, as Redis sends it, as a dict."""
    it = iter(flat)
    return dict(zip(it, it, strict=False))


class Codec:
    """Turns events into envelope bytes and back, once per message."""

    __slots__ = ("converter", "limits")

    converter: cattrs.Converter

    def __init__(self, converter: cattrs.Converter | None, limits: Limits) -> None:
        if converter is not None:
            self.converter = converter
        self.limits = limits

    def __getattr__(self, name: str) -> Any:
        # The default converter is built on first use (importing cattrs then): a
        # bus whose events are plain JSON values never needs it.
        if name == "converter":
            self.converter = make_converter()
            return self.converter
        raise AttributeError(name)

    def unstructure(self, topic: str, event: object) -> tuple[str, Any]:
        """Return (content type, JSON-ready value) of ``event``."""
        if isinstance(event, bytes | bytearray | memoryview):
            return CONTENT_BYTES, base64.b64encode(bytes(event)).decode("ascii")
        try:
            return CONTENT_JSON, self.converter.unstructure(event)
        except Exception as exc:
            raise EncodeError(
                f"cannot unstructure {type(event).__name__}: {exc}", topic=topic
            ) from exc

    def check_event(self, topic: str, event: object, tp: Any) -> None:
        """Refuse an event that does not fit its topic's type ``tp``, before any I/O.

        An untyped topic (``object``, ``Any``) takes any JSON value or bytes. For a
        class, ``event`` must be an instance (an ``int`` counts as a ``float``, as
        in Python's typing); an instance of a structured type (attrs class,
        dataclass), or a value of a generic type (``list[int]``, a union), must
        also make the round trip through the converter (unstructure, then
        structure as ``tp``), so a field of the wrong type is caught here rather
        than at every receiver.

        :raises eventbus.errors.EncodeError: naming the topic and the expected type.
        """
        if tp is object or tp is Any:
            return
        name = getattr(tp, "__qualname__", None) or repr(tp)
        if isinstance(tp, type):
            if not isinstance(event, tp) and not (
                tp is float and isinstance(event, int) and not isinstance(event, bool)
            ):
                got = type(event).__qualname__
                raise EncodeError(f"expected a {name}, got a {got}: {event!r:.200}", topic=topic)
            if tp in _JSON_NATIVE or tp is bytes:
                return  # a plain value of its own type: nothing inside to check
        try:
            self.converter.structure(self.converter.unstructure(event, tp), tp)
        except Exception as exc:
            raise EncodeError(
                f"event is not a valid {name}: {_error_path(exc)}", topic=topic
            ) from exc

    def check_headers(self, topic: str, headers: Mapping[str, str] | None) -> dict[str, str]:
        if not headers:
            return {}
        if len(headers) > self.limits.max_headers:
            raise ConfigurationError(
                f"topic {topic!r}: {len(headers)} headers, the limit is {self.limits.max_headers}"
            )
        for key, value in headers.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ConfigurationError(f"topic {topic!r}: headers must map str to str")
            if len(key) + len(value) > _MAX_HEADER_LEN:
                raise ConfigurationError(f"topic {topic!r}: header {key!r} is too long")
        return dict(headers)

    def encode(
        self,
        topic: str,
        event: object,
        *,
        event_id: str,
        publisher: str,
        seq: int,
        headers: dict[str, str],
        cause: str = "",
        corr: str = "",
        published_ms: int | None = None,
    ) -> tuple[bytes, int]:
        """Encode one event as an envelope; return (bytes, published_at_ms).

        ``published_ms``: the publish time to write (default: now).

        :raises eventbus.errors.PayloadTooLarge: before any I/O.
        """
        if type(event) in _JSON_NATIVE:
            # orjson writes these as they are; cattrs would only copy them. If a
            # container holds something orjson cannot write (bytes, a set, an
            # attrs instance), the cattrs path below handles it.
            content_type, data = CONTENT_JSON, event
        else:
            content_type, data = self.unstructure(topic, event)
        now_ms = time.time_ns() // 1_000_000 if published_ms is None else published_ms
        doc: dict[str, Any] = {
            "eventbus": WIRE_VERSION,
            "id": event_id,
            "pub": publisher,
            "seq": seq,
            "ts": now_ms,
            "ct": content_type,
            "data": data,
        }
        if headers:
            doc["h"] = headers
        if cause:
            doc["cause"] = cause
            doc["corr"] = corr or cause
        try:
            raw = orjson.dumps(doc)
        except TypeError as exc:
            if data is not event:
                raise EncodeError(f"event is not JSON-representable: {exc}", topic=topic) from exc
            doc["ct"], doc["data"] = self.unstructure(topic, event)
            try:
                raw = orjson.dumps(doc)
            except TypeError as exc2:
                raise EncodeError(f"event is not JSON-representable: {exc2}", topic=topic) from exc2
        if len(raw) > self.limits.max_payload_bytes:
            raise PayloadTooLarge(
                topic=topic, size=len(raw), limit=self.limits.max_payload_bytes, event_id=event_id
            )
        return raw, now_ms

    def encode_entry(
        self,
        topic: str,
        event: object,
        *,
        event_id: str,
        publisher: str,
        seq: int,
        headers: dict[str, str],
        cause: str = "",
        corr: str = "",
    ) -> list[bytes]:
        """Encode one event as the fields of a stream entry (wire version 2), flat:
        ``[name, value, ...]``. Its time is the entry's id, given by Redis.

        :raises eventbus.errors.EncodeError: the event cannot be unstructured to JSON.
        :raises eventbus.errors.PayloadTooLarge: over the limit, before any I/O.
        """
        name = F_JSON
        if type(event) in _JSON_NATIVE:
            try:
                payload = _dumps(event)
            except TypeError:  # a container holding what orjson cannot write
                name, payload = self._payload(topic, event)
        else:
            name, payload = self._payload(topic, event)
        id_name, id_value = id_field(event_id)
        fields = [id_name, id_value, F_PUB, publisher.encode(), F_SEQ, b"%d" % seq]
        # An upper bound of the entry's size (field names and the seq: under 64 bytes);
        # the exact sum only when the bound is over the limit.
        size = len(payload) + len(id_value) + len(publisher) + 64
        if headers:
            hdrs = _dumps(headers)
            size += len(hdrs)
            fields += (F_HEADERS, hdrs)
        if cause:
            fields += (F_CAUSE, cause.encode())
            size += len(cause)
            if corr and corr != cause:
                fields += (F_CORR, corr.encode())
                size += len(corr)
        fields += (name, payload)
        limit = self.limits.max_payload_bytes
        if size > limit and sum(map(len, fields)) > limit:
            raise PayloadTooLarge(
                topic=topic, size=sum(map(len, fields)), limit=limit, event_id=event_id
            )
        return fields

    def _payload(self, topic: str, event: object) -> tuple[bytes, bytes]:
        """(field name, bytes) of ``event``'s payload in a stream entry."""
        if type(event) in _JSON_NATIVE:
            try:
                return F_JSON, orjson.dumps(event)
            except TypeError:
                pass  # a container holding what orjson cannot write: cattrs below
        elif isinstance(event, bytes | bytearray | memoryview):
            return F_BYTES, bytes(event)
        _content_type, data = self.unstructure(topic, event)  # JSON: bytes were above
        try:
            return F_JSON, orjson.dumps(data)
        except TypeError as exc:
            raise EncodeError(f"event is not JSON-representable: {exc}", topic=topic) from exc

    def decode(self, topic: str, raw: bytes) -> Envelope:
        """Decode bytes received on a live channel.

        An eventbus envelope keeps its metadata. Anything else (a raw ``PUBLISH``
        from redis-cli or another client) is accepted as a bare payload: its JSON
        value if it parses, else its bytes.

        :raises eventbus.errors.PayloadTooLarge: over ``max_payload_bytes``.
        :raises eventbus.errors.DecodeError: a malformed eventbus envelope.
        """
        if len(raw) > self.limits.max_payload_bytes:
            raise PayloadTooLarge(topic=topic, size=len(raw), limit=self.limits.max_payload_bytes)
        env = self._decode_fast(topic, raw, "")
        if env is not None:
            return env
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return Envelope.bare(topic, raw, CONTENT_BYTES)
        if (
            type(doc) is dict
            and type(doc.get("eventbus")) is int
            and doc["eventbus"] == WIRE_VERSION
        ):
            return self._from_doc(topic, doc)
        env = Envelope.bare(topic, doc, CONTENT_JSON)
        env.cache[bytes] = raw  # a bytes subscriber gets exactly what was published
        return env

    @staticmethod
    def _decode_fast(topic: str, raw: bytes, stream_id: str) -> Envelope | None:
        """The usual envelope (version 1, JSON content), or ``None``: take the full path."""
        try:
            w = _decode_wire(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            return None  # (msgspec's nesting limit is the stack's)
        if w.eventbus != WIRE_VERSION or w.ct != CONTENT_JSON:
            return None
        return Envelope(
            topic,
            w.id,
            w.pub,
            w.seq,
            w.ts,
            w.h,
            CONTENT_JSON,
            w.data,
            {},
            stream_id,
            w.cause,
            w.corr or w.cause,
            w.due,
            w.att,
        )

    def _from_doc(self, topic: str, doc: dict[str, Any]) -> Envelope:
        """A version 1 envelope: ``data`` required, every other field optional, each
        of its type when present (docs/wire-format.md, "The envelope")."""
        try:
            data = doc["data"]
            content_type = doc.get("ct", CONTENT_JSON)
            if content_type != CONTENT_JSON:
                if content_type != CONTENT_BYTES:
                    raise ValueError(f"unknown content type {content_type!r}")
                data = base64.b64decode(data, validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise self._malformed(topic, doc, exc) from exc
        event_id = doc.get("id", "")
        publisher = doc.get("pub", "")
        seq = doc.get("seq", 0)
        ts = doc.get("ts")
        headers = doc.get("h", {})
        cause = doc.get("cause", "")
        corr = doc.get("corr", "")
        due = doc.get("due")
        att = doc.get("att", 0)
        # Exact types: orjson makes exactly these (and a bool is not a sequence number).
        wrong = [
            name
            for name, value, tp in (
                ("id", event_id, str),
                ("pub", publisher, str),
                ("seq", seq, int),
                ("h", headers, dict),
                ("cause", cause, str),
                ("corr", corr, str),
            )
            if type(value) is not tp
        ]
        if ts is not None and type(ts) is not int:
            wrong.append("ts")
        if due is not None and type(due) is not int:
            wrong.append("due")
        if type(att) is not int or att < 0:
            wrong.append("att")
        if type(headers) is dict and not all(type(v) is str for v in headers.values()):
            wrong.append("h")
        if type(seq) is int and seq < 0:
            wrong.append("seq")
        if wrong:
            error = ValueError(f"envelope field(s) of the wrong type: {', '.join(wrong)}")
            raise self._malformed(topic, doc, error) from error
        return Envelope(
            topic,
            event_id,
            publisher,
            seq,
            ts,
            headers,
            content_type,
            data,
            {},
            "",
            cause,
            corr or cause,
            due,
            att,
        )

    @staticmethod
    def _malformed(topic: str, doc: dict[str, Any], error: Exception) -> DecodeError:
        event_id = doc.get("id")
        return DecodeError(
            f"malformed envelope: {error}",
            topic=topic,
            reason="decode_error",
            event_id=event_id if isinstance(event_id, str) else None,
        )

    def decode_entry(
        self, topic: str, stream_id: str, fields: Mapping[bytes, bytes] | list[bytes]
    ) -> Envelope:
        """Decode one stream entry of a durable topic.

        ``fields``: a dict, or ``[name, value, ...]`` as Redis sent them. What is
        read, in this order (docs/wire-format.md, "Stream entries"):

        1. an ``env`` field: a version 1 envelope (with ``id`` beside it);
        2. a ``d`` or ``b`` field: a version 2 entry (``i``, ``p``, ``s``, ``h``, ...);
        3. a ``data`` field, as another client would write it: a bare payload, its
           JSON value if it parses, else its bytes (an ``id`` beside it is its id).

        :raises eventbus.errors.DecodeError: with ``reason`` one of
            ``too_many_fields``, ``too_large``, ``decode_error``,
            ``unsupported_version``: the entry can never be handled, retrying
            cannot help (it goes to the dead-letter stream at once).
        """
        limit = self.limits.max_payload_bytes
        if isinstance(fields, list):
            # The usual entries, read without building a dict. Anything unusual (or
            # wrong) takes the full path below, which names what is wrong.
            n = len(fields)
            if (
                n == 8
                and fields[6] == F_JSON
                and fields[0] == F_ID
                and fields[2] == F_PUB
                and fields[4] == F_SEQ
                and len(fields[7]) <= limit
                and fields[5].isdigit()
                and len(fields[5]) <= 19
            ):
                try:
                    return Envelope(
                        topic,
                        id_of(fields[1]),
                        fields[3].decode(),
                        int(fields[5]),
                        int(stream_id.partition("-")[0]),
                        {},
                        CONTENT_JSON,
                        _loads(fields[7]),
                        {},
                        stream_id,
                    )
                except (ValueError, msgspec.DecodeError, RecursionError):
                    pass
            elif n == 4 and fields[0] == F_ID_TEXT and fields[2] == F_ENV:
                raw = fields[3]
                if len(raw) + len(fields[1]) <= limit:
                    env = self._decode_fast(topic, raw, stream_id)
                    if env is not None:
                        return env
            fields = field_map(fields)
        elif len(fields) == 2 and F_ENV in fields and F_ID_TEXT in fields:
            raw = fields[F_ENV]
            if len(raw) + len(fields[F_ID_TEXT]) <= limit:
                env = self._decode_fast(topic, raw, stream_id)
                if env is not None:
                    return env
        if len(fields) > self.limits.max_entry_fields:
            raise DecodeError(
                f"entry {stream_id} has {len(fields)} fields, the limit is"
                f" {self.limits.max_entry_fields}",
                topic=topic,
                reason="too_many_fields",
            )
        size = sum(len(k) + len(v) for k, v in fields.items())
        if size > limit + 1024:
            raise DecodeError(
                f"entry {stream_id} is {size} bytes, the limit is {limit}",
                topic=topic,
                reason="too_large",
            )
        env_field = fields.get(F_ENV)
        if env_field is not None:
            env = self._from_env_field(topic, stream_id, env_field)
        elif F_JSON in fields or F_BYTES in fields:
            env = self._from_entry_v2(topic, stream_id, fields)
        elif F_DATA in fields:
            data = fields[F_DATA]
            try:
                env = Envelope.bare(topic, orjson.loads(data), CONTENT_JSON)
                env.cache[bytes] = data
            except orjson.JSONDecodeError:
                env = Envelope.bare(topic, data, CONTENT_BYTES)
            event_id = fields.get(F_ID_TEXT)
            if event_id is not None:
                env.id = event_id.decode("utf-8", "replace")
        else:
            names = b", ".join(list(fields)[:5]).decode("utf-8", "replace")
            raise DecodeError(
                f"entry {stream_id} has no 'env', 'd', 'b' or 'data' field"
                f" (fields: {names or 'none'})",
                topic=topic,
                reason="decode_error",
            )
        env.stream_id = stream_id
        return env

    def _from_env_field(self, topic: str, stream_id: str, raw: bytes) -> Envelope:
        """A version 1 entry: its ``env`` field (the envelope's own ``id`` wins)."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(
                f"entry {stream_id}: envelope is not JSON: {exc}",
                topic=topic,
                reason="decode_error",
            ) from exc
        if type(doc) is not dict or "eventbus" not in doc:
            raise DecodeError(
                f"entry {stream_id}: env is not an eventbus envelope",
                topic=topic,
                reason="decode_error",
            )
        if type(doc["eventbus"]) is not int or doc["eventbus"] != WIRE_VERSION:
            raise DecodeError(
                f"entry {stream_id}: envelope version {doc['eventbus']!r} is not supported"
                f" (this eventbus reads version {WIRE_VERSION})",
                topic=topic,
                reason="unsupported_version",
            )
        return self._from_doc(topic, doc)

    @staticmethod
    def _from_entry_v2(topic: str, stream_id: str, fields: Mapping[bytes, bytes]) -> Envelope:
        """A version 2 entry, every field checked; a wrong one is named."""

        def malformed(message: str, exc: BaseException | None = None) -> DecodeError:
            error = DecodeError(f"entry {stream_id}: {message}", topic=topic, reason="decode_error")
            error.__cause__ = exc
            return error

        version = fields.get(F_VERSION)
        if version is not None and version != b"%d" % ENTRY_VERSION:
            raise DecodeError(
                f"entry {stream_id}: entry version {version.decode('utf-8', 'replace')!r} is"
                f" not supported (this eventbus reads versions 1 and {ENTRY_VERSION})",
                topic=topic,
                reason="unsupported_version",
            )
        if F_JSON in fields and F_BYTES in fields:
            raise malformed("has both 'd' and 'b'; a payload is one or the other")
        try:
            if F_ID in fields:
                event_id = id_of(fields[F_ID])
            else:
                event_id = fields.get(F_ID_TEXT, b"").decode()
        except ValueError as exc:
            raise malformed(f"bad event id: {exc}", exc) from exc
        try:
            publisher = fields.get(F_PUB, b"").decode()
            cause = fields.get(F_CAUSE, b"").decode()
            corr = fields.get(F_CORR, b"").decode() or cause
        except UnicodeDecodeError as exc:
            raise malformed(f"'p', 'c' and 'r' must be UTF-8 text: {exc}", exc) from exc
        due_text = fields.get(F_DUE)
        due: int | None = None
        if due_text is not None:
            if not (due_text.isdigit() and len(due_text) <= 19):
                raise malformed(f"'t' must be a decimal integer, got {due_text[:40]!r}")
            due = int(due_text)
        seq_text = fields.get(F_SEQ)
        if seq_text is None:
            seq = 0
        elif seq_text.isdigit() and len(seq_text) <= 19:
            seq = int(seq_text)
        else:
            raise malformed(f"'s' must be a decimal integer, got {seq_text[:40]!r}")
        headers: Any = {}
        if F_HEADERS in fields:
            try:
                headers = orjson.loads(fields[F_HEADERS])
            except orjson.JSONDecodeError as exc:
                raise malformed(f"'h' is not JSON: {exc}", exc) from exc
            if type(headers) is not dict or not all(type(v) is str for v in headers.values()):
                raise malformed("'h' must be a JSON object of strings")
        if F_BYTES in fields:
            content_type, data = CONTENT_BYTES, fields[F_BYTES]
        else:
            content_type = CONTENT_JSON
            try:
                data = _loads(fields[F_JSON])
            except (msgspec.DecodeError, RecursionError) as exc:
                raise malformed(f"'d' is not JSON: {exc}", exc) from exc
        return Envelope(
            topic,
            event_id,
            publisher,
            seq,
            int(stream_id.partition("-")[0]),
            headers,
            content_type,
            data,
            {},
            stream_id,
            cause,
            corr,
            due,
        )

    def structure(self, envelope: Envelope, tp: Any) -> Any:
        """The payload of ``envelope`` as ``tp``; computed once per (message, type).

        :raises eventbus.errors.DecodeError: the payload does not fit ``tp``.
        """
        cache = envelope.cache
        if cache:  # most envelopes are structured once: no lookup (and no KeyError)
            result = cache.get(tp, _MISSING)
            if result is not _MISSING:
                if isinstance(result, DecodeError):
                    raise result
                return result
        data = envelope.data
        if tp is object or tp is Any or (type(data) is tp and tp in _JSON_NATIVE):
            value: Any = data  # cattrs would only copy a plain JSON value of its own type
        elif tp is bytes:
            value = data if isinstance(data, bytes) else orjson.dumps(data)
        else:
            try:
                value = self.converter.structure(data, tp)
            except Exception as exc:
                name = getattr(tp, "__qualname__", repr(tp))
                error = DecodeError(
                    f"payload is not a {name}: {_error_path(exc)}",
                    topic=envelope.topic,
                    reason="validation_error",
                    event_id=envelope.id,
                )
                error.__cause__ = exc
                cache[tp] = error
                raise error from exc
        cache[tp] = value
        return value
