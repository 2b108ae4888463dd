"""The wire codec: cattrs structuring (preconf style) plus the JSON envelope.

``make_converter()`` gives the converter eventbus uses by default;
``configure_converter()`` applies eventbus's wire rules to a converter of your
own, so you can register hooks first and keep them::

    conv = cattrs.preconf.orjson.make_converter()
    conv.register_structure_hook(Money, parse_money)
    eventbus.configure_converter(conv)
    bus = EventBus(url, converter=conv)
"""

from __future__ import annotations

import base64
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

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
    id: str
    pub: str
    seq: int
    ts: int
    ct: str
    data: Any
    h: dict[str, str] = {}
    cause: str = ""
    corr: str = ""


_decode_wire: Final = msgspec.json.Decoder(_WireV1).decode


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

    def __init__(self, converter: cattrs.Converter | None, limits: Limits) -> None:
        self.converter = converter if converter is not None else make_converter()
        self.limits = limits

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
    ) -> tuple[bytes, int]:
        """Encode one event as an envelope; return (bytes, published_at_ms).

        :raises eventbus.errors.PayloadTooLarge: before any I/O.
        """
        if type(event) in _JSON_NATIVE:
            # orjson writes these as they are; cattrs would only copy them. If a
            # container holds something orjson cannot write (bytes, a set, an
            # attrs instance), the cattrs path below handles it.
            content_type, data = CONTENT_JSON, event
        else:
            content_type, data = self.unstructure(topic, event)
        now_ms = time.time_ns() // 1_000_000
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
        if type(doc) is dict and doc.get("eventbus") == WIRE_VERSION:
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
            w.corr,
        )

    def _from_doc(self, topic: str, doc: dict[str, Any]) -> Envelope:
        try:
            event_id = doc["id"]
            publisher = doc["pub"]
            seq = doc["seq"]
            ts = doc["ts"]
            content_type = doc["ct"]
            data = doc["data"]
            headers = doc.get("h") or {}
            if content_type != CONTENT_JSON:
                if content_type != CONTENT_BYTES:
                    raise ValueError(f"unknown content type {content_type!r}")
                data = base64.b64decode(data, validate=True)
        except (KeyError, ValueError, TypeError) as exc:
            raise self._malformed(topic, doc, exc) from exc
        # Exact types: orjson makes exactly these (and a bool is not a sequence number).
        if not (
            type(event_id) is str
            and type(publisher) is str
            and type(seq) is int
            and type(ts) is int
            and type(headers) is dict
        ):
            error = ValueError("envelope field of the wrong type")
            raise self._malformed(topic, doc, error) from error
        cause = doc.get("cause")
        corr = doc.get("corr")
        if cause is None and corr is None:  # the usual case: not published by a chained handler
            return Envelope(topic, event_id, publisher, seq, ts, headers, content_type, data, {})
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
            cause if isinstance(cause, str) else "",
            corr if isinstance(corr, str) else "",
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
        """Decode one stream entry of a durable topic (fields ``id`` and ``env``).

        ``fields``: a dict, or ``[name, value, ...]`` as Redis sent them.

        An entry with a ``data`` field and no ``env`` (written by another client)
        is a bare payload: its JSON value if it parses, else its bytes.

        :raises eventbus.errors.DecodeError: with ``reason`` one of
            ``too_many_fields``, ``too_large``, ``decode_error``,
            ``unsupported_version``: the entry can never be handled, retrying
            cannot help (it goes to the dead-letter stream at once).
        """
        limit = self.limits.max_payload_bytes
        # The usual entry (id + env, written by eventbus): the checks below cannot
        # fail on the sizes, so only the envelope itself is checked.
        if isinstance(fields, list):
            usual = len(fields) == 4 and fields[0] == b"id" and fields[2] == b"env"
            event_id = fields[1] if usual else None
            raw = fields[3] if usual else None
        else:
            raw = fields.get(b"env")
            event_id = fields.get(b"id")
            usual = len(fields) == 2
        if usual and raw is not None and event_id is not None and len(raw) + len(event_id) <= limit:
            env = self._decode_fast(topic, raw, stream_id)
            if env is not None:
                return env
        if isinstance(fields, list):
            fields = field_map(fields)
            raw = fields.get(b"env")
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
        if raw is not None:
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
            if doc["eventbus"] != WIRE_VERSION:
                raise DecodeError(
                    f"entry {stream_id}: envelope version {doc['eventbus']!r} is not supported"
                    f" (this eventbus reads version {WIRE_VERSION})",
                    topic=topic,
                    reason="unsupported_version",
                )
            env = self._from_doc(topic, doc)
        elif b"data" in fields:
            data = fields[b"data"]
            try:
                env = Envelope.bare(topic, orjson.loads(data), CONTENT_JSON)
                env.cache[bytes] = data
            except orjson.JSONDecodeError:
                env = Envelope.bare(topic, data, CONTENT_BYTES)
            event_id = fields.get(b"id")
            if event_id is not None:
                env.id = event_id.decode("utf-8", "replace")
        else:
            names = b", ".join(list(fields)[:5]).decode("utf-8", "replace")
            raise DecodeError(
                f"entry {stream_id} has no 'env' or 'data' field (fields: {names or 'none'})",
                topic=topic,
                reason="decode_error",
            )
        env.stream_id = stream_id
        return env

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
